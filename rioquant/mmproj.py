"""The vision projector pipeline: read → map → plan → quantize → write, for `mmproj-<TYPE>.gguf`.

The same steps as convert.py on the checkpoint's vision tower (export/qwen35moe_vision.py): headers
only until the plan is complete, then one tensor at a time through the same resumable writer (temporary
name, journal, `--resume`, `--force`). `convert_with_mmproj` plans both files before writing either,
so a bad input (no vision tower, an unknown type) fails before a byte is written.

From ORG/REPO[@REVISION] only the small files and the shards holding tower tensors are fetched (the
index says which; their headers by range requests), each through the Hub source's verified download
(`source.hub.HubShards`) just before its first tower tensor is written and deleted after its last; the
high-water mark is checked against --cache-max before any download.
"""

import json
import logging
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from rioquant.convert import ConvertHooks, ConvertOptions, MetadataOptions, RunOptions, convert_many
from rioquant.errors import CheckpointError, PlanError, QuantInputError
from rioquant.export.checkpoint import read_config, read_float32, scan_tensors
from rioquant.export.gguf_out import OutputTensor, ShardedGGUFOutput, expected_total_bytes, planned_file_sizes
from rioquant.export.metadata import general_metadata
from rioquant.export.qwen35moe_vision import (
    ARCH,
    MMPROJ_TYPES,
    PREPROCESSOR,
    VisionArgs,
    add_clip_metadata,
    config_vision_tensors,
    has_vision,
    load_vision_tensor,
    parameter_count,
    tensor_type,
    vision_args,
    vision_specs,
)
from rioquant.export.tensor_map import TensorSpec
from rioquant.files.gguf_file import nbytes
from rioquant.progress import progress_bar
from rioquant.quant import quantize
from rioquant.quant.plan import Origin, PlanEntry, plan_fingerprint
from rioquant.quant.recipes import get_recipe
from rioquant.source import HubOptions, hub_repo_id
from rioquant.source.hub import HubShards, check_cache_limit, hub_tower

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType


def mmproj_filename(qtype: str) -> str:
    """`mmproj-F16.gguf`: the name releases ship and llama.cpp's `-hf` download looks for ("mmproj")."""
    return f"mmproj-{qtype}.gguf"


@dataclass
class MmprojPlan:
    src: Path
    args: VisionArgs
    specs: list[TensorSpec]
    entries: list[PlanEntry]
    qtype: str
    metadata: MetadataOptions
    identity: str = ""  # what the resume key records as the source (a Hub source: ORG/REPO@COMMIT)
    shards: HubShards | None = None  # a Hub source's tower shards, on disk only while their tensors are written

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _check_type(qtype: str) -> str:
    name = qtype.upper()
    if name not in MMPROJ_TYPES:
        raise PlanError(f"--mmproj {qtype}: choose one of {', '.join(MMPROJ_TYPES)}")
    return name


def _preprocessor(src: Path, required: bool) -> dict | None:
    path = src / PREPROCESSOR
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise CheckpointError(f"{path}: not found; the mmproj records the image mean/std from it") from None
        return None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def build_mmproj_plan(src: Path | str, qtype: str = "F16", metadata: MetadataOptions | None = None,
                      weights_optional: bool = False, hub: HubOptions | None = None) -> MmprojPlan:
    """read → map → plan for the projector, from config.json, preprocessor_config.json and the headers.

    With `weights_optional` (the `plan` command) a directory with config.json alone is planned from the
    shapes config.json implies, as `convert.build_plan` does for the text model. SRC may be
    ORG/REPO[@REVISION]: `hub` says where its files go and how much disk they may use at once.
    """
    qtype = _check_type(qtype)
    repo = hub_repo_id(src)
    tower = hub_tower(repo["repo"], repo["revision"], hub or HubOptions()) if repo else None
    src = tower[0].folder if tower else Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    config = read_config(src)
    from_config = weights_optional and not any(src.glob("*.safetensors"))
    preprocessor = _preprocessor(src, required=not from_config) if has_vision(config) else None
    args = vision_args(config, preprocessor, src)  # first: a checkpoint without a tower is refused
    if tower:
        tensors = tower[1]
    else:
        tensors = config_vision_tensors(args, src / "config.json") if from_config else scan_tensors(src)
    specs = vision_specs(tensors, args, src)
    entries = []
    for spec in specs:
        chosen, why = tensor_type(spec.name, spec.shape, qtype)
        origin = Origin.UNIFORM if chosen == qtype and why.startswith("--mmproj") else Origin.KEPT_F32
        entries.append(PlanEntry(spec.name, spec.shape, chosen, why, nbytes(T[chosen], spec.shape), origin))
    plan = MmprojPlan(src, args, specs, entries, qtype, metadata or MetadataOptions(), str(src.resolve()))
    if tower:
        plan.identity, plan.shards = f"{tower[0].repo}@{tower[0].commit}", HubShards(tower[0], specs)
        check_cache_limit([plan.shards], (hub or HubOptions()).cache_max)
    return plan


def _metadata_writer(plan: MmprojPlan):
    n = parameter_count(plan.specs)
    general = general_metadata(plan.src, n, n, 0, 0, plan.metadata.base_models, plan.metadata.name)
    file_type = get_recipe(plan.qtype).file_type

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        general.set_gguf_meta_model(writer)
        if plan.metadata.quantized_by:
            writer.add_quantized_by(plan.metadata.quantized_by)
        writer.add_file_type(file_type)
        add_clip_metadata(writer, plan.args)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return add


def _tensors(plan: MmprojPlan) -> list[OutputTensor]:
    return [OutputTensor(e.name, e.shape, T[e.qtype], e.nbytes) for e in plan.entries]


def mmproj_size(plan: MmprojPlan) -> int:
    """The exact size of the mmproj file, before anything is written."""
    (size,) = planned_file_sizes(_tensors(plan), _metadata_writer(plan), arch=ARCH)
    return size


def describe_mmproj(plan: MmprojPlan) -> dict:
    """The projector's plan as data (`rioquant plan --mmproj … --json`)."""
    return {
        "file": mmproj_filename(plan.qtype), "type": plan.qtype, "file_bytes": mmproj_size(plan),
        "tensor_bytes": plan.total_bytes, "parameters": parameter_count(plan.specs),
        "types": dict(sorted(Counter(e.qtype for e in plan.entries).items())),
        "tensors": [{"name": e.name, "shape": list(e.shape), "type": e.qtype, "bytes": e.nbytes, "rule": e.rule}
                    for e in plan.entries],
    }


def _quantized(spec: TensorSpec, entry: PlanEntry, args: VisionArgs, threads: int | None) -> np.ndarray:
    """One tower tensor's bytes; a row the quantizer refuses (NaN, Inf) is named by file and tensor."""
    values = load_vision_tensor(spec, args, read_float32)
    rows = np.ascontiguousarray(values.reshape(-1, values.shape[-1]), dtype=np.float32)
    try:
        return quantize(rows, T[entry.qtype], threads=threads)
    except QuantInputError as err:
        source = spec.pieces[0].source
        raise CheckpointError(f"{source.file.name}: tensor {source.name}: {err}") from None


def write_mmproj(plan: MmprojPlan, out: Path, run: RunOptions | None = None, hooks: ConvertHooks | None = None) -> Path:
    """quantize → write: each tower tensor read, transformed, typed and appended; returns the file."""
    run, hooks = run or RunOptions(), hooks or ConvertHooks()
    tensors = _tensors(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    needed, free = expected_total_bytes(tensors), hooks.fs.free_bytes(out.parent)
    if needed > free:
        raise PlanError(f"{out.parent}: {needed / 1e9:.2f} GB needed for the mmproj, {free / 1e9:.2f} GB free")
    fingerprint = plan_fingerprint(plan.entries, {"src": plan.identity, "qtype": plan.qtype,
                                                  "metadata": asdict(plan.metadata), "args": asdict(plan.args)})
    output = ShardedGGUFOutput(out, tensors, _metadata_writer(plan), fingerprint, resume=run.resume,
                               force=run.force, fs=hooks.fs, arch=ARCH)
    bar = progress_bar(run.progress, total=plan.total_bytes, unit="B", unit_scale=True, desc=out.name)
    try:
        for spec, entry in zip(plan.specs, plan.entries, strict=True):
            if not output.is_done(entry.name):
                hooks.on_tensor(entry)
                with plan.shards.holding(spec) if plan.shards else nullcontext():
                    output.write_tensor(entry.name, iter([_quantized(spec, entry, plan.args, run.threads)]))
            bar.update(entry.nbytes)
        (path,) = output.finish()
        if plan.shards:
            plan.shards.finish()
    except BaseException:
        output.close()
        raise
    finally:
        bar.close()
    log.info("wrote %s", path)
    return path


def convert_with_mmproj(src: Path, outputs: Sequence[tuple[Path, ConvertOptions]], mmproj_type: str = "F16",
                        run: RunOptions | None = None, hooks: ConvertHooks | None = None) -> list[list[Path]]:
    """`convert --mmproj`: the text GGUF(s) of every (out, options) from one read (`convert_many`), and
    `mmproj-<TYPE>.gguf` beside the first, in one run.

    The projector is planned first, so a checkpoint without a vision tower fails before any byte of
    the (long) text conversion is written; it is written last, from the same checkpoint.

    From the Hub the two run one after the other: the text conversion has deleted every shard it held
    before the projector fetches the (few) shards holding tower tensors, so each peak is checked
    against --cache-max on its own and the disk never holds both. Sharing a shard between them would
    save its second download (the 397B's tower is 0.9 GB, in one or two shards) but keep it on disk
    through the whole text conversion, which would then have to fit beside it.
    """
    run = run or RunOptions()
    first_out, first_options = outputs[0]
    plan = build_mmproj_plan(src, mmproj_type, first_options.metadata, hub=run.hub)
    written = convert_many(src, outputs, run, hooks)
    return [*written, [write_mmproj(plan, first_out.parent / mmproj_filename(plan.qtype), run, hooks)]]
