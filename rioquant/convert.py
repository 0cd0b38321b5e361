"""The conversion pipeline, top to bottom: read → map → plan → quantize → write.

Only headers are read until the plan is complete; then each tensor (each expert slab of an expert
stack) is read, transformed, quantized and appended, so memory is bounded by the largest tensor,
never by the model.
"""

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from rioquant.errors import CheckpointError, PlanError, QuantInputError
from rioquant.export.checkpoint import read_float32, scan_tensors
from rioquant.export.gguf_out import OutputTensor, ShardedGGUFOutput, expected_total_bytes
from rioquant.export.metadata import add_arch_metadata, general_metadata
from rioquant.export.qwen35moe import ModelArgs, TensorSpec, load_piece, load_tensor, model_args, mtp_layer_count, tensor_specs
from rioquant.export.vocab import add_vocab, read_vocab
from rioquant.quant import quantize
from rioquant.quant.plan import PlanEntry, plan_fingerprint, uniform_entry

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType

# llama.cpp's file_type for a uniform target (the nearest named mix for K types)
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
}


@dataclass(frozen=True)
class ConvertOptions:
    qtype: str = "Q8_0"
    with_mtp: bool = True
    split_max_size: int = 0
    split_max_tensors: int = 0
    base_models: tuple[str, ...] = ()
    name: str | None = None
    quantized_by: str | None = None
    resume: bool = False
    force: bool = False
    threads: int | None = None
    progress: bool = True


@dataclass
class ConversionPlan:
    src: Path
    args: ModelArgs
    config: dict
    specs: list[TensorSpec]
    entries: list[PlanEntry]
    n_mtp_layers: int
    options: ConvertOptions = field(default_factory=ConvertOptions)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def read_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (is {src} a Hugging Face checkpoint?)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def build_plan(src: Path, options: ConvertOptions) -> ConversionPlan:
    """read → map → plan, from config.json and the safetensors headers only."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    config = read_config(src)
    tensors = scan_tensors(src)  # first: a pickled or broken checkpoint is refused before anything else
    args = model_args(config, str(src / "config.json"))
    specs = tensor_specs(tensors, args, options.with_mtp)
    try:
        target = T[options.qtype.upper()]
    except KeyError:
        raise PlanError(f"--type {options.qtype}: unknown; choose one of {', '.join(FILE_TYPES)}") from None
    if target.name not in FILE_TYPES:
        raise PlanError(f"--type {options.qtype}: unknown; choose one of {', '.join(FILE_TYPES)}")
    entries = [uniform_entry(s.name, s.shape, target) for s in specs]
    return ConversionPlan(src, args, config, specs, entries, mtp_layer_count(specs, args), options)


def _parameter_counts(plan: ConversionPlan) -> tuple[int, int, int]:
    total = expert = 0
    for spec in plan.specs:
        n = int(np.prod(spec.shape, dtype=np.int64))
        total += n
        expert += n if spec.is_expert_stack else 0
    return total, total - expert, expert


def _metadata_writer(plan: ConversionPlan):
    options = plan.options
    vocab = read_vocab(plan.src, plan.args.vocab_size)
    total, shared, expert = _parameter_counts(plan)
    general = general_metadata(plan.src, total, shared, expert, plan.args.num_experts, options.base_models, options.name)

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        general.set_gguf_meta_model(writer)
        if options.quantized_by:
            writer.add_quantized_by(options.quantized_by)
        add_arch_metadata(writer, plan.args, plan.n_mtp_layers)
        writer.add_file_type(FILE_TYPES[options.qtype.upper()])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, vocab)

    return add


def _tensor_chunks(spec: TensorSpec, entry: PlanEntry, plan: ConversionPlan) -> Iterator[np.ndarray]:
    """Quantized bytes of one tensor: whole for ordinary tensors, one slab at a time for experts."""
    qtype = T[entry.qtype]
    slabs = (
        (load_piece(p, read_float32) for p in spec.pieces)
        if spec.is_expert_stack
        else iter([load_tensor(spec, plan.args, read_float32)])
    )
    for slab in slabs:
        rows = slab.reshape(-1, slab.shape[-1]) if slab.ndim > 1 else slab.reshape(1, -1)
        try:
            yield quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype, threads=plan.options.threads)
        except QuantInputError as err:
            source = spec.pieces[0].source
            raise CheckpointError(f"{source.file.name}: tensor {source.name}: {err}") from None


def convert(src: Path, out: Path, options: ConvertOptions) -> list[Path]:
    """Convert the checkpoint at `src` into `out` (or its split set); returns the files written."""
    plan = build_plan(src, options)
    add_metadata = _metadata_writer(plan)
    tensors = [OutputTensor(e.name, e.shape, T[e.qtype], e.nbytes) for e in plan.entries]
    out.parent.mkdir(parents=True, exist_ok=True)
    needed = expected_total_bytes(tensors)
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise PlanError(f"{out.parent}: {needed / 1e9:.2f} GB needed for the output, {free / 1e9:.2f} GB free")
    fingerprint = plan_fingerprint(plan.entries, {"src": str(src.resolve()), **options.__dict__, "resume": None, "force": None, "progress": None, "threads": None})
    output = ShardedGGUFOutput(
        out, tensors, add_metadata, fingerprint,
        split_max_size=options.split_max_size, split_max_tensors=options.split_max_tensors,
        resume=options.resume, force=options.force,
    )
    done_bytes = sum(e.nbytes for e in plan.entries if output.is_done(e.name))
    bar = tqdm(total=plan.total_bytes, initial=done_bytes, unit="B", unit_scale=True, disable=not options.progress,
               desc=f"{out.name}", dynamic_ncols=True, mininterval=1.0)
    try:
        for i, (spec, entry) in enumerate(zip(plan.specs, plan.entries)):
            if output.is_done(entry.name):
                continue
            bar.set_postfix_str(f"tensor {i + 1}/{len(plan.entries)} {entry.name} {entry.qtype}")
            output.write_tensor(entry.name, _tensor_chunks(spec, entry, plan))
            bar.update(entry.nbytes)
        files = output.finish()
    except BaseException:
        output.close()
        raise
    finally:
        bar.close()
    log.info("wrote %s", ", ".join(str(f) for f in files))
    return files
