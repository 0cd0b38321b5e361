"""The models of a lineage comparison: opened, checked against each other, and read piece by piece.

A source is a Hugging Face checkpoint directory (read by `export.checkpoint` through the converter's
own name table, `export.qwen35moe.tensor_specs`) or a float/Q8_0 GGUF (read by `files.gguf_set` /
`files.gguf_file` and dequantized by `quant.dequantize`). Tensors are matched by their GGUF name. When every source is a
checkpoint the stored values are compared as they are; when a GGUF takes part, checkpoint tensors go
through the converter's transforms (+1 on norms, V heads tiled, A = −exp(A_log)) so that both sides
hold the same quantity.

A piece is a run of rows of one tensor (or of one expert slab): the unit of reading. Every source's
piece is one positioned read, through a view of the reader's own tensor record moved to the piece's
first byte; a transformed tensor is read whole, once.

A model may also be ORG/REPO[@REVISION] on the Hub: its headers are read by range requests and its
shards fetched by the Hub source's own holding (`source.hub.HubShards`), in the order lineage walks the
child's tensors, and deleted after the last tensor read from them. While any source streams, the
stream drains at each tensor's end before the next tensor's shards are fetched, so at most one
tensor's shards per model are on disk; --cache-max bounds all Hub models' shards together (one disk),
checked before the first download.
"""

import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from gguf import GGMLQuantizationType

from rioquant.errors import CheckpointError, LineageError
from rioquant.export.checkpoint import SourceTensor, read_float32, scan_tensors
from rioquant.export.metadata import gguf_model_args
from rioquant.export.qwen35moe import ARCH, ModelArgs, load_tensor, model_args, tensor_specs
from rioquant.export.tensor_map import TensorSpec
from rioquant.files.gguf_file import TensorInfo, nbytes, read_tensor_bytes
from rioquant.files.gguf_set import open_set
from rioquant.quant import dequantize
from rioquant.source import HubOptions, hub_repo_id
from rioquant.source.hub import INDEX, HubRepo, HubShards, check_cache_limit, hub_checkpoint

T = TypeVar("T")
PIECE_ELEMENTS = 1 << 22  # 4 M elements: 16 MB of float32 per source and piece
PREFETCH = 8  # pieces beyond those in flight that the kernel is asked to read ahead (page cache, not ours)
GGUF_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
              GGMLQuantizationType.Q8_0}
# ModelArgs fields that do not decide any tensor's name or shape (a GGUF does not even record some)
NOT_SHAPE = {"rms_norm_eps", "max_position_embeddings", "rope_theta", "partial_rotary_factor",
             "mrope_section", "num_experts_per_tok", "tie_word_embeddings", "mtp_num_hidden_layers"}


@dataclass(frozen=True)
class Tensor:
    """One tensor of one source: its GGUF name and shape, how it is stored, and the reader's record."""

    name: str
    shape: tuple[int, ...]  # GGUF numpy order; an expert stack is (experts, rows, cols)
    storage: str  # BF16, F16, F32 or Q8_0
    record: TensorSpec | TensorInfo
    transform: str | None  # applied on reading (checkpoint tensors compared with a GGUF)

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 0

    @property
    def slab_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.experts else self.shape


class Source:
    """A model opened for lineage: `given` is how the user named it, `tensors` maps GGUF names."""

    def __init__(self, given: str, path: Path, kind: str, args: ModelArgs, tensors: dict[str, Tensor],
                 hub: HubRepo | None = None) -> None:
        self.given, self.path, self.kind, self.args, self.tensors = given, path, kind, args, tensors
        self.hub = hub  # a Hub model: its shards are fetched inside `holding`
        self.shards: HubShards | None = None  # set once the order of reading is known (`open_sources`)

    @property
    def streams(self) -> bool:
        return self.hub is not None

    def holding(self, name: str) -> AbstractContextManager:
        """The window in which tensor `name`'s bytes are on disk (a Hub model's shards; else always)."""
        return self.shards.holding(self.tensors[name].record) if self.shards else nullcontext()

    def finish(self) -> None:
        if self.shards:
            self.shards.finish()

    def read(self, name: str, expert: int | None, rows: tuple[int, int], raw: bool = False) -> tuple[np.ndarray, int]:
        """Rows [r0, r1) of tensor `name` (of its expert slab) as flat float32 — or, with `raw`, a bfloat16
        tensor's bits as uint16, exactly as stored — and the bytes read."""
        tensor = self.tensors[name]
        record = tensor.record
        if isinstance(record, TensorInfo):
            view = _gguf_view(record, tensor, expert, rows)
            data = read_tensor_bytes(view)
            if raw:
                return data.view(np.uint16), data.nbytes
            return dequantize(data, record.qtype, view.shape).reshape(-1), data.nbytes
        if tensor.transform:  # read whole (the planner makes such a tensor a single piece)
            values = load_tensor(record, self.args, read_float32).reshape(-1)
            return values[rows[0] * _row_elements(tensor) : rows[1] * _row_elements(tensor)], record.pieces[0].source.nbytes
        view = _checkpoint_view(record, expert, rows)
        if raw:  # the same bytes through the GGUF reader's positioned read, which keeps them as stored
            # (a safetensors file has no GGUF data section: `offset` repeats data_start, the read uses data_start)
            bits = TensorInfo(view.name, view.shape, GGMLQuantizationType.BF16, offset=view.data_start,
                              file=view.file, data_start=view.data_start)
            return read_tensor_bytes(bits).view(np.uint16), view.nbytes
        return read_float32(view).reshape(-1), view.nbytes

    def prefetch(self, name: str, expert: int | None, rows: tuple[int, int]) -> None:
        """Ask the kernel to start reading a piece now (posix_fadvise WILLNEED): the disk keeps a deep
        queue of large requests while the pool's positioned reads wait on one piece each."""
        tensor = self.tensors[name]
        record = tensor.record
        if isinstance(record, TensorInfo):
            view = _gguf_view(record, tensor, expert, rows)
        else:
            view = record.pieces[0].source if tensor.transform else _checkpoint_view(record, expert, rows)
        fd = os.open(view.file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, view.data_start, view.nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _gguf_view(record: TensorInfo, tensor: Tensor, expert: int | None, rows: tuple[int, int]) -> TensorInfo:
    """The GGUF reader's record moved to rows [r0, r1) of slab `expert` (offset and data start alike)."""
    row_shape = tensor.slab_shape[1:]
    skip = (expert or 0) * nbytes(record.qtype, tensor.slab_shape) + nbytes(record.qtype, (rows[0], *row_shape))
    return replace(record, shape=(rows[1] - rows[0], *row_shape), offset=record.offset + skip,
                   data_start=record.data_start + skip)


def _checkpoint_view(spec: TensorSpec, expert: int | None, rows: tuple[int, int]) -> SourceTensor:
    """The checkpoint reader's record moved to rows [r0, r1) of the piece (expert slab, fused half) named."""
    piece = spec.pieces[expert or 0]
    src = piece.source
    if src.scale is not None:  # a row view would need its block scales cut to match
        raise LineageError(f"{src.file}: tensor {src.name} is FP8; lineage reads BF16/F16/F32 checkpoints "
                           "(convert the FP8 one with `rioquant convert --type BF16` first)")
    slab_shape = src.shape[1:] if piece.index is not None else src.shape
    row_elements = int(np.prod(slab_shape[1:], dtype=np.int64))
    first_row = (piece.rows[0] if piece.rows else 0) + rows[0]
    slab_start = (piece.index or 0) * int(np.prod(slab_shape, dtype=np.int64))
    return replace(src, shape=(rows[1] - rows[0], *slab_shape[1:]),
                   data_start=src.data_start + (slab_start + first_row * row_elements) * src.itemsize)


def _row_elements(tensor: Tensor) -> int:
    return int(np.prod(tensor.slab_shape[1:], dtype=np.int64))


def _open_checkpoint(given: str, path: Path, transforms: bool) -> Source:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise LineageError(f"{config_path}: not found (is {path} a Hugging Face checkpoint?)") from None
    except json.JSONDecodeError as err:
        raise LineageError(f"{config_path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    args = model_args(config, str(config_path))
    return _checkpoint_source(given, path, args, tensor_specs(scan_tensors(path), args, with_mtp=True), transforms)


def _open_hub(given: str, transforms: bool, options: HubOptions) -> Source:
    """ORG/REPO[@REVISION]: config and index downloaded, every shard's header read by range requests."""
    match = hub_repo_id(given)
    hub, _, args, tensors = hub_checkpoint(match["repo"], match["revision"], options, small=("config.json", INDEX))
    return _checkpoint_source(given, hub.folder, args, tensor_specs(tensors, args, with_mtp=True), transforms, hub)


def _checkpoint_source(given: str, path: Path, args: ModelArgs, specs: list[TensorSpec], transforms: bool,
                       hub: HubRepo | None = None) -> Source:
    tensors = {spec.name: Tensor(spec.name, spec.shape, spec.pieces[0].source.dtype, spec,
                                 spec.transform if transforms else None) for spec in specs}
    return Source(given, path, "checkpoint", args, tensors, hub)


def _open_gguf(given: str, path: Path) -> Source:
    model = open_set(path)
    arch = model.get("general.architecture")
    if arch != ARCH:
        raise LineageError(f"{path}: architecture {arch!r}; lineage compares {ARCH} models")
    tensors = {}
    for name, record in model.tensors.items():
        if record.qtype not in GGUF_TYPES:
            raise LineageError(f"{path}: tensor {name} is {record.qtype.name}; lineage reads F32, F16, BF16 "
                               "and Q8_0 GGUFs (quantize less, or compare the checkpoints)")
        tensors[name] = Tensor(name, record.shape, record.qtype.name, record, None)
    return Source(given, path, "gguf", gguf_model_args(model), tensors)


def open_sources(child: str, parents: list[str], hub: HubOptions | None = None) -> tuple[Source, list[Source]]:
    """Open every model and check that they can be compared: same architecture, same tensors and shapes.
    A Hub model's shards are then planned in the child's tensor order, and --cache-max checked for all."""
    if len(parents) < 2:
        raise LineageError(f"{len(parents)} --parent given: a blend needs at least two parents")
    given = [child, *parents]
    paths = [Path(g) for g in given]
    for g, path in zip(given, paths, strict=True):
        if not path.exists() and not hub_repo_id(g):
            raise LineageError(f"{path}: no such checkpoint directory or GGUF file")
    transforms = any(p.is_file() for p in paths)
    sources = []
    for g, p in zip(given, paths, strict=True):
        try:
            if hub_repo_id(g):
                sources.append(_open_hub(g, transforms, hub or HubOptions()))
            else:
                sources.append(_open_checkpoint(g, p, transforms) if p.is_dir() else _open_gguf(g, p))
        except CheckpointError as err:  # name the model: "checkpoint has no tensor …" does not
            raise LineageError(str(err) if str(p) in str(err) else f"{p}: {err}") from None
    first = sources[0]
    for other in sources[1:]:
        _check_same(first, other)
    _plan_downloads(sources, (hub or HubOptions()).cache_max)
    return first, sources[1:]


def _plan_downloads(sources: list[Source], cache_max: int) -> None:
    """Each Hub model's shards held in the order `stream` reads tensors (the child's), all within --cache-max."""
    streamed = [s for s in sources if s.hub is not None]
    seen: dict[Path, str] = {}
    for source in streamed:
        if source.hub.folder in seen:
            raise LineageError(f"{source.given}: the same repository as {seen[source.hub.folder]} (one cache "
                               "folder); download one of them and give its folder")
        seen[source.hub.folder] = source.given
        source.shards = HubShards(source.hub, [source.tensors[name].record for name in sources[0].tensors])
    check_cache_limit([s.shards for s in streamed], cache_max)


def _check_same(first: Source, other: Source) -> None:
    for f in fields(ModelArgs):
        a, b = getattr(first.args, f.name), getattr(other.args, f.name)
        if f.name not in NOT_SHAPE and a != b:
            raise LineageError(f"{other.path}: {f.name} is {b}, {first.path} has {a}: not the same architecture")
    for name, tensor in first.tensors.items():
        theirs = other.tensors.get(name)
        if theirs is None:
            raise LineageError(f"{other.path}: no tensor {name} (present in {first.path})")
        if theirs.shape != tensor.shape:
            raise LineageError(f"{other.path}: tensor {name} has shape {list(theirs.shape)}, "
                               f"{first.path} has {list(tensor.shape)}")
    extra = sorted(set(other.tensors) - set(first.tensors))
    if extra:
        raise LineageError(f"{first.path}: no tensor {extra[0]} (present in {other.path})")


# ---------------------------------------------------------------------------------------------
# Plan and stream


@dataclass(frozen=True)
class Unit:
    """What a verdict is given for: a tensor, or one expert slab of an expert stack."""

    name: str
    expert: int | None
    pieces: tuple[tuple[int, int], ...]  # row ranges
    elements: int
    raw: bool  # every source stores it as bfloat16, untransformed: read as uint16 bits


def plan_units(sources: list[Source]) -> list[Unit]:
    """Every tensor (every expert slab) of the first source, in its order, cut into row pieces."""
    units = []
    for name, tensor in sources[0].tensors.items():
        rows = tensor.slab_shape[0]
        per_row = _row_elements(tensor)
        whole = any(s.tensors[name].transform for s in sources)
        raw = not whole and all(s.tensors[name].storage == "BF16" for s in sources)
        step = rows if whole else max(1, PIECE_ELEMENTS // max(per_row, 1))
        pieces = tuple((r, min(r + step, rows)) for r in range(0, rows, step))
        for expert in (range(tensor.experts) if tensor.experts else [None]):
            units.append(Unit(name, expert, pieces, rows * per_row, raw))
    return units


def _read_then(sources: list[Source], unit: Unit, index: int, work: Callable[[list[np.ndarray]], T]) -> tuple[T, int]:
    values, nbytes = [], 0
    for source in sources:
        v, n = source.read(unit.name, unit.expert, unit.pieces[index], unit.raw)
        values.append(v)
        nbytes += n
    return work(values), nbytes


def stream(units: list[Unit], sources: list[Source], prepare: Callable[[Unit, int], Callable[[list[np.ndarray]], T]],
           threads: int) -> Iterator[tuple[Unit, int, T, int]]:
    """(unit, piece index, result, bytes read) for every piece, in order.

    `prepare(unit, i)` runs here, in order, and returns the work for that piece; a pool of `threads`
    threads reads the piece from every source (child first) and runs the work on it. Positioned reads,
    numpy conversions and the Numba kernels all release the GIL, so the disk and every core stay busy;
    at most 2 × threads pieces are in flight, which bounds memory, and the kernel is asked to read the
    next PREFETCH pieces ahead (their pages may be dropped again under memory pressure: no harm).

    With a Hub model among the sources, a piece is read only inside every source's `holding` window for
    its tensor, one tensor at a time: the next tensor's shards are fetched once this one's pieces are all
    in. Its work is still prepared at the same point as without (the recipes it tests depend on it, so
    the report does not change), only its read waits; no read-ahead is asked (the shards were just
    written: their pages are in memory)."""
    jobs = [(u, i) for u in units for i in range(len(u.pieces))]
    window: deque[list] = deque()  # [unit, piece index, work, future or None while its tensor is not held]
    depth = 2 * threads
    streaming = any(s.streams for s in sources)
    held = _Held(sources)

    def prefetch(j: int) -> None:
        if j < len(jobs) and not streaming:
            unit, i = jobs[j]
            for source in sources:
                source.prefetch(unit.name, unit.expert, unit.pieces[i])

    with ThreadPoolExecutor(max_workers=threads) as pool:
        def submit(entry: list) -> None:
            if entry[3] is None and (not streaming or entry[0].name == held.name):
                entry[3] = pool.submit(_read_then, sources, entry[0], entry[1], entry[2])

        def add(j: int) -> None:
            if j < len(jobs):
                unit, i = jobs[j]
                window.append([unit, i, prepare(unit, i), None])
                submit(window[-1])

        for j in range(PREFETCH + depth):
            prefetch(j)
        for j in range(depth):
            add(j)
        for j in range(len(jobs)):
            if streaming and window[0][0].name != held.name:  # every piece of the held tensor is in
                held.move_to(window[0][0].name)
                for entry in window:
                    submit(entry)
            unit, i, _, future = window.popleft()
            result, nbytes = future.result()
            yield unit, i, result, nbytes
            add(j + depth)
            prefetch(j + depth + PREFETCH)
        held.move_to(None)


class _Held:
    """The one tensor whose bytes every streaming source keeps on disk while `stream` reads it."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources, self.name, self.windows = sources, None, ExitStack()

    def move_to(self, name: str | None) -> None:
        """Close the held tensor's windows (its shards may go), then open `name`'s (its shards come)."""
        self.windows.close()
        self.windows, self.name = ExitStack(), name
        if name is not None:
            for source in self.sources:
                self.windows.enter_context(source.holding(name))
