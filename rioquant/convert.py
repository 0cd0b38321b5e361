"""The conversion pipeline, top to bottom: read → map → plan → quantize → write.

Only headers are read until the plan is complete; then each tensor (each expert slab of an expert
stack) is read, transformed, quantized and appended, so memory is bounded by the largest tensor,
never by the model.
"""

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np

from rioquant.errors import ImatrixError, PlanError
from rioquant.export.gguf_out import (
    OutputFS,
    OutputTensor,
    ShardedGGUFOutput,
    SplitOptions,
    expected_total_bytes,
    planned_file_sizes,
)
from rioquant.export.qwen35moe import KEEP_F32, ModelArgs, load_rows
from rioquant.export.tensor_map import TensorSpec, mtp_layer_count
from rioquant.fanout import Target, write_targets
from rioquant.gguf_metadata import imatrix_metadata, metadata_writer, parameter_counts
from rioquant.pipeline import PREFETCH_BYTES, Submitter
from rioquant.quant import budget
from rioquant.quant.imatrix import check_fit, read_imatrix, uses_importance
from rioquant.quant.plan import Overrides, PlanEntry, needs_imatrix, plan_fingerprint, recipe_entries
from rioquant.quant.recipes import check_type, get_recipe, load_recipe, parse_tensor_type
from rioquant.quant.report import build_report, write_report
from rioquant.quant.rules import ModelFacts, Recipe
from rioquant.source import HubOptions, Source, open_source

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType

@dataclass(frozen=True)
class MetadataOptions:
    """`general.*` the user sets: a merge's parents (--base-model), the model name, who quantized it; and
    the pre-tokenizer llama.cpp should use when the vocabulary does not say (--pre-tokenizer)."""

    base_models: tuple[str, ...] = ()
    name: str | None = None
    quantized_by: str | None = None
    pre_tokenizer: str | None = None


@dataclass(frozen=True)
class ConvertOptions:
    """What the output is: the tensors and their types, the file layout and the metadata. Every field
    decides output bytes, so `--resume` fingerprints the whole of it (with the imatrix's sha256)."""

    qtype: str = "Q8_0"  # a recipe name (rioquant.quant.recipes.RECIPES); ignored when `recipe` is given
    recipe: Path | None = None  # a user recipe (TOML), instead of the built-in `qtype`
    tensor_types: tuple[str, ...] = ()  # llama-quantize's --tensor-type REGEX=TYPE, first match wins
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    target_size: int | None = None  # bytes of the whole output: raise the worst tensors until it is met
    target_bpw: float | None = None  # bits per weight of the tensor data, as llama.cpp reports it
    imatrix: Path | None = None  # llama.cpp imatrix (GGUF or legacy .dat)
    with_mtp: bool = True
    split: SplitOptions = SplitOptions()
    metadata: MetadataOptions = MetadataOptions()


@dataclass(frozen=True)
class RunOptions:
    """How a conversion runs; nothing here changes a byte of the output."""

    resume: bool = False  # continue an interrupted run of the same ConvertOptions
    force: bool = False  # overwrite an existing output
    threads: int | None = None
    progress: bool = True
    report: bool = True  # measure every tensor's error into NAME.report.json / .csv
    ray: str | None = None  # a Ray cluster's address: its nodes read and quantize (rioquant.cluster)
    hub: HubOptions = HubOptions()  # an ORG/REPO source's cache folder and its limit


@dataclass
class ConversionPlan:
    src: Path
    args: ModelArgs
    config: dict
    specs: list[TensorSpec]
    entries: list[PlanEntry]
    n_mtp_layers: int
    options: ConvertOptions = field(default_factory=ConvertOptions)
    recipe: Recipe = field(default_factory=lambda: get_recipe("Q8_0"))
    source: Source | None = None  # where the weights are read from (rioquant.source)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _overrides(options: ConvertOptions) -> Overrides:
    return Overrides(
        tensor_types=tuple(parse_tensor_type(t) for t in options.tensor_types),
        output_type=options.output_tensor_type and check_type(options.output_tensor_type, "--output-tensor-type"),
        token_embd_type=options.token_embedding_type and check_type(options.token_embedding_type, "--token-embedding-type"),
    )


def build_plan(src: Path | str, options: ConvertOptions, weights_optional: bool = False,
               hub: HubOptions | None = None, source: Source | None = None) -> ConversionPlan:
    """read → map → plan, from headers only (rioquant.source: a checkpoint folder, a GGUF, ORG/REPO).

    With `weights_optional` (the `plan` command) a directory holding config.json but no weights (and
    any Hub repository) is planned from the shapes config.json implies: the same tensors, types and
    sizes, without a download. `source` is one already opened (several outputs share one).
    """
    source = source or open_source(src, options.with_mtp, weights_optional, hub)
    src, config, args, specs, from_config = source.path, source.config, source.args, source.specs, source.from_config
    if from_config:
        log.info("%s: no weights; planning from config.json alone", src)
    n_mtp = mtp_layer_count(specs, args.num_hidden_layers)
    recipe = load_recipe(options.recipe) if options.recipe else get_recipe(options.qtype)
    facts = model_facts(args, n_mtp, has_imatrix=options.imatrix is not None)
    entries = source.kept_entries(recipe_entries([(s.name, s.shape) for s in specs], recipe, facts, _overrides(options)))
    unweighted = next((e for e in entries if needs_imatrix(e)), None) if options.imatrix is None else None
    if unweighted is not None:
        raise PlanError(f"{unweighted.name} → {unweighted.qtype} ({unweighted.rule}) needs an importance matrix, "
                        "as in llama-quantize: give --imatrix FILE (from `rioquant imatrix` or llama-imatrix)")
    plan = ConversionPlan(src, args, config, specs, entries, n_mtp, options, recipe, source)
    if options.target_size is not None or options.target_bpw is not None:
        if from_config:
            raise PlanError(f"--target-size/--target-bpw: {src} has no weights to measure errors on")
        plan.entries = _fit_budget(plan)
    return plan


def model_facts(args: ModelArgs, n_mtp: int, has_imatrix: bool) -> ModelFacts:
    """What the recipes' rules look at besides a tensor's name, from the architecture's arguments (and
    whether an imatrix is given: some of llama.cpp's rules read that too)."""
    return ModelFacts(
        n_expert=args.num_experts,
        n_gqa=args.num_attention_heads // args.num_key_value_heads if args.num_key_value_heads else 0,
        n_blocks=args.num_hidden_layers + n_mtp,
        keep_f32=KEEP_F32,
        has_imatrix=has_imatrix,
    )


def planned_sizes(plan: ConversionPlan) -> list[int]:
    """The exact size of each output file (one, or each shard of a split), before anything is written."""
    tensors = [OutputTensor(e.name, e.shape, T[e.qtype], e.nbytes) for e in plan.entries]
    return planned_file_sizes(tensors, metadata_writer(plan), plan.options.split)


def error_samples(plan: ConversionPlan, names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Deterministic row samples of the named tensors (budget.sample_rows), read row by row."""
    for spec in plan.specs:
        if spec.name in names:
            with plan.source.holding(spec):
                parts = [load_rows(spec, plan.args, expert, rows, plan.source.read_rows)
                         for expert, rows in budget.sample_rows(spec.shape)]
            yield spec.name, np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _fit_budget(plan: ConversionPlan) -> list[PlanEntry]:
    """--target-size / --target-bpw: measure, then raise the worst tensors while the budget holds."""
    options = plan.options
    if options.target_size is not None and options.target_bpw is not None:
        raise PlanError("--target-size and --target-bpw: give one of them")
    size = sum(planned_sizes(plan)) if options.target_size is not None else 0
    if options.target_size is not None and size > options.target_size:
        raise PlanError(f"--target-size {options.target_size:,}: the {plan.recipe.name} mix alone is {size:,} bytes; "
                        "choose a smaller --type")
    types = {e.name: [e.qtype, *budget.upgrade_types(e)] for e in plan.entries if budget.can_raise(e)}
    types = {name: ts for name, ts in types.items() if len(ts) > 1}
    errors = budget.measure_errors(error_samples(plan, set(types)), types)
    if options.target_size is None:
        limit = int(options.target_bpw * parameter_counts(plan)["total"] // 8)
        return budget.raise_to_budget(plan.entries, errors, limit, "target-bpw")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT  # every tensor's data is padded to it
    limit = options.target_size - (size - sum(-(-e.nbytes // alignment) * alignment for e in plan.entries))
    for _ in range(3):  # a split output may gain a shard (and its header) as tensors grow
        entries = budget.raise_to_budget(plan.entries, errors, limit, "target-size", alignment)
        excess = sum(planned_sizes(replace(plan, entries=entries))) - options.target_size
        if excess <= 0:
            return entries
        limit -= excess
    raise PlanError(f"--target-size {options.target_size:,}: the split headers do not fit; raise it slightly")


ROW_BLOCK_BYTES = 64 << 20  # float32 rows quantized (and measured) at once: the 397B's 4 GB embedding in 64 pieces


def _ignore(entry: PlanEntry) -> None:
    pass


@dataclass(frozen=True)
class ConvertHooks:
    """The seams of one conversion run; the defaults are the real run, tests replace them.

    `on_tensor(entry)` runs just before each tensor's bytes are written (a test interrupts a run there);
    `row_block_bytes` sizes the row pieces matrices are quantized in (the bytes do not depend on it);
    `fs` holds the output's file-system calls (free space, fsync), replaced to simulate a full disk;
    `prefetch_bytes` bounds the float32 read ahead of the quantize stage; `executor` and `in_flight`
    run the quantize stage elsewhere (rioquant.pipeline: the default is this thread, one piece at a time).
    """

    on_tensor: Callable[[PlanEntry], None] = _ignore
    row_block_bytes: int = ROW_BLOCK_BYTES
    fs: OutputFS = OutputFS()
    prefetch_bytes: int = PREFETCH_BYTES
    executor: Submitter | None = None
    in_flight: int = 1


@dataclass
class _OpenOutput:
    out: Path
    plan: ConversionPlan
    imatrix_meta: dict | None
    target: Target


def _open_output(source: Source, out: Path, options: ConvertOptions, run: RunOptions, hooks: ConvertHooks) -> _OpenOutput:
    """Plan one output from the shared source, check its imatrix and free space, and open (or resume) its GGUF."""
    plan = build_plan(source.path, options, source=source)
    imatrix = imatrix_meta = None
    if options.imatrix is not None:
        imatrix = read_imatrix(options.imatrix)
        usable = check_fit(
            imatrix, {e.name: e.shape for e in plan.entries},
            {e.name for e in plan.entries if uses_importance(e.qtype)}, plan.args.num_hidden_layers,
        )
        unweighted = next((e for e in plan.entries if needs_imatrix(e) and e.name not in usable), None)
        if unweighted is not None:  # an MTP tensor: llama-imatrix does not run that block
            raise ImatrixError(f"{options.imatrix}: no entry for {unweighted.name}, which {unweighted.qtype} cannot be "
                               "quantized without (llama-quantize refuses it too); --no-mtp leaves the MTP block out")
        imatrix_meta = imatrix_metadata(imatrix, str(options.imatrix))
        imatrix = imatrix.restricted_to(usable)
    add_metadata = metadata_writer(plan, imatrix_meta)
    tensors = [OutputTensor(e.name, e.shape, T[e.qtype], e.nbytes) for e in plan.entries]
    out.parent.mkdir(parents=True, exist_ok=True)
    needed = expected_total_bytes(tensors)
    free = hooks.fs.free_bytes(out.parent)
    if needed > free:
        raise PlanError(f"{out.parent}: {needed / 1e9:.2f} GB needed for the output, {free / 1e9:.2f} GB free")
    fingerprint = plan_fingerprint(plan.entries, {
        "src": source.identity, "options": asdict(options),
        "imatrix_sha256": _file_digest(options.imatrix) if options.imatrix else None,
    })
    output = ShardedGGUFOutput(out, tensors, add_metadata, fingerprint, options.split, resume=run.resume,
                               force=run.force, fs=hooks.fs)
    return _OpenOutput(out, plan, imatrix_meta, Target(plan.entries, imatrix, output, run.report))


def convert(
    src: Path, out: Path, options: ConvertOptions, run: RunOptions = RunOptions(), hooks: ConvertHooks | None = None,
) -> list[Path]:
    """Convert the checkpoint at `src` into `out` (or its split set); returns the files written."""
    return convert_many(src, [(out, options)], run, hooks)[0]


def convert_many(
    src: Path | str, outputs: Sequence[tuple[Path, ConvertOptions]], run: RunOptions = RunOptions(),
    hooks: ConvertHooks | None = None,
) -> list[list[Path]]:
    """Convert `src` into every (out, options) from one read of its source (rioquant.fanout).

    Each output gets the bytes, report and resume journal of its own `convert`; the outputs must agree on
    the tensors (not on their types), so --no-mtp is all or none. The source is opened once and is
    finished (a Hub source's last shards deleted) once every output is; with --ray the nodes read it.
    """
    hooks = hooks or ConvertHooks()
    mtp = {options.with_mtp for _, options in outputs}
    if len(mtp) > 1:
        raise PlanError(f"{outputs[0][0]}: --no-mtp must be given for every output or none; convert them apart")
    source = open_source(src, mtp.pop(), hub=run.hub)
    stage = _cluster_stage(run) if run.ray is not None else \
        dict(executor=hooks.executor, in_flight=hooks.in_flight, threads=run.threads)
    reader = source.on_nodes() if run.ray is not None else source  # the driver plans with `source` alone
    opened: list[_OpenOutput] = []
    try:
        for out, options in outputs:
            opened.append(_open_output(source, out, options, run, hooks))
        write_targets(reader, [o.target for o in opened], on_tensor=hooks.on_tensor,
                      row_block_bytes=hooks.row_block_bytes, progress=run.progress,
                      desc=opened[0].out.name if len(opened) == 1 else f"{len(opened)} outputs",
                      prefetch_bytes=hooks.prefetch_bytes, **stage)
        written = [o.target.output.finish() for o in opened]
        reader.finish()  # with --ray, the Hub shards in the cache folder stay for the nodes' later tasks
    except BaseException:
        for o in opened:
            o.target.output.close()
        raise
    for o, files in zip(opened, written, strict=True):
        if run.report:
            output, plan = o.target.output, o.plan
            measured = [e for e in plan.entries if e.qtype != "F32"]
            report = build_report([output.notes[e.name] for e in measured if e.name in output.notes], files, source.path,
                                  plan.recipe.name, o.imatrix_meta, [e.name for e in measured if e.name not in output.notes])
            for path in write_report(report, o.out):
                log.info("wrote %s", path)
        log.info("wrote %s", ", ".join(str(f) for f in files))
    return written


def _cluster_stage(run: RunOptions) -> dict:
    """--ray: the quantize stage on the cluster's nodes, which read the weights themselves (`Source.on_nodes`:
    a folder or GGUF at the same path on every node, a Hub repository into each node's cache). A task
    holds --threads CPUs (default 1) and quantizes on as many. Joining comes first, so a missing Ray or
    an unreachable cluster is said before any work."""
    from rioquant.cluster import RayExecutor, Resources, connect

    threads = run.threads or 1
    executor = RayExecutor(connect(run.ray), Resources(num_cpus=threads))
    return dict(executor=executor, in_flight=executor.in_flight, threads=threads, read_on_executor=True)


def _file_digest(path: Path) -> str:
    """sha256 of a file (the imatrix), read in 16 MB pieces: part of the resume key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def describe_plan(plan: ConversionPlan) -> dict:
    """The plan as data (`rioquant plan --json`): every tensor's type, rule and bytes, and the exact file sizes."""
    sizes = planned_sizes(plan)
    params = parameter_counts(plan)
    by_type: dict[str, dict[str, int]] = {}
    for e in plan.entries:
        row = by_type.setdefault(e.qtype, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += e.nbytes
    return {
        "source": str(plan.src),
        "recipe": plan.recipe.name,
        "recipe_source": plan.recipe.source,
        "file_type": plan.recipe.file_type.name,
        "file_bytes": sum(sizes),
        "shard_bytes": sizes,
        "tensor_bytes": plan.total_bytes,
        "bpw": plan.total_bytes * 8 / params["total"],
        "parameters": params,
        "types": by_type,
        "tensors": [{"name": e.name, "shape": list(e.shape), "type": e.qtype, "bytes": e.nbytes, "rule": e.rule}
                    for e in plan.entries],
    }
