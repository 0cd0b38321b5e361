"""One read of the checkpoint, every output written: the read, quantize and write stages of a conversion.

convert.py opens each output (its plan, imatrix and resumable GGUF, a `Target`); `write_targets` runs
them all through one rioquant.pipeline pass. Each source tensor (each expert slab of an expert stack)
is read and transformed once, quantized into every output that still lacks it, and handed to that
output's writer thread. Each output gets exactly the bytes, journal and report of its own
single-output run, since every stage works per output as that run does, in the same tensor order.

`ReadStage` and `QuantizeStage` hold plain data (no open files), so another executor can ship them
to other processes; `write_targets(..., executor=, in_flight=)` is where it plugs in.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import gguf
import numpy as np

from rioquant.errors import BadRowError, CheckpointError, QuantInputError
from rioquant.export.checkpoint import read_float32
from rioquant.export.gguf_out import ShardedGGUFOutput
from rioquant.export.qwen35moe import ModelArgs, load_tensor
from rioquant.export.tensor_map import TensorSpec, load_piece
from rioquant.pipeline import PREFETCH_BYTES, Stages, Submitter, run_pipeline
from rioquant.progress import progress_bar
from rioquant.quant import quantize
from rioquant.quant.imatrix import Imatrix
from rioquant.quant.metrics import Slice, TensorErrorTracker, measure_slice
from rioquant.quant.plan import PlanEntry

T = gguf.GGMLQuantizationType
WRITE_QUEUE = 2  # quantized pieces waiting for each output's writer thread


@dataclass
class Target:
    """One output of the run: its plan entries (in the shared spec order), imatrix and open GGUF."""

    entries: list[PlanEntry]
    imatrix: Imatrix | None
    output: ShardedGGUFOutput
    report: bool  # measure each tensor's error into the output's journal notes


@dataclass(frozen=True)
class WorkItem:
    """A tensor, or one expert slab of an expert stack, and the outputs that still need it."""

    index: int  # the tensor's position in the plan
    expert: int | None
    last: bool  # the tensor's last piece
    targets: tuple[int, ...]
    nbytes: int  # float32 bytes once read


@dataclass(frozen=True)
class QuantizedPiece:
    """One output's bytes of a work item, in row blocks, and their measured error (when reported)."""

    chunks: list[np.ndarray]
    measured: list[Slice]


@dataclass(frozen=True)
class ReadStage:
    specs: Sequence[TensorSpec]
    args: ModelArgs

    def __call__(self, item: WorkItem) -> np.ndarray:
        """The item's float32 rows (rows, n): read and transformed, exactly what each output quantizes."""
        spec = self.specs[item.index]
        if item.expert is not None:
            slab = load_piece(spec.pieces[item.expert], read_float32)
        else:
            slab = load_tensor(spec, self.args, read_float32)
        rows = slab.reshape(-1, slab.shape[-1]) if slab.ndim > 1 else slab.reshape(1, -1)
        return np.ascontiguousarray(rows, dtype=np.float32)


def row_blocks(rows: np.ndarray, is_expert_slab: bool, block_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """A matrix's rows in pieces of at most block_bytes, so the error report's temporaries are a piece's
    size, not the matrix's; rows are independent, so the bytes are the same.
    An expert slab stays whole: the report keeps one record per expert."""
    step = max(1, block_bytes // (4 * rows.shape[1]))
    if is_expert_slab or rows.shape[0] <= step:
        yield 0, rows
        return
    for start in range(0, rows.shape[0], step):
        yield start, rows[start : start + step]


@dataclass(frozen=True)
class QuantizeStage:
    specs: Sequence[TensorSpec]
    entries: Sequence[Sequence[PlanEntry]]  # per output
    imatrices: Sequence[Imatrix | None]  # per output
    reports: Sequence[bool]  # per output
    row_block_bytes: int
    threads: int | None

    def __call__(self, item: WorkItem, rows: np.ndarray) -> list[QuantizedPiece]:
        """The item quantized into each output that needs it (expert e with slice e of the importance,
        as llama-quantize does), measured against its bytes while both are in memory."""
        spec = self.specs[item.index]
        return [self._one(spec, self.entries[t][item.index], self.imatrices[t], self.reports[t], item.expert, rows)
                for t in item.targets]

    def _one(self, spec: TensorSpec, entry: PlanEntry, imatrix: Imatrix | None, report: bool,
             expert: int | None, rows: np.ndarray) -> QuantizedPiece:
        weights = imatrix.importance(entry.name, rows.shape[1], expert) if imatrix else None
        no_data = imatrix is not None and (expert or 0) in imatrix.experts_without_data(entry.name, entry.shape[-1])
        measure = report and entry.qtype != "F32"
        chunks, measured = [], []
        for start, block in row_blocks(rows, spec.is_expert_stack, self.row_block_bytes):
            try:
                data = quantize(block, T[entry.qtype], imatrix=weights, threads=self.threads)
            except QuantInputError as err:
                source = spec.pieces[0].source
                if isinstance(err, BadRowError):
                    err = err.shifted(start)
                raise CheckpointError(f"{source.file.name}: tensor {source.name}: {err}") from None
            if measure:
                measured.append(measure_slice(block, data, entry.qtype, weights, no_data))
            chunks.append(data)
        return QuantizedPiece(chunks, measured)


@dataclass(frozen=True)
class ReadQuantizeStage:
    """Read and quantize in one call, for an executor on other machines that see the checkpoint's path
    (a Ray cluster): the float32 rows never cross the network, only the quantized bytes come back."""

    read: ReadStage
    quantize: QuantizeStage

    def __call__(self, item: WorkItem, _: None) -> list[QuantizedPiece]:
        return self.quantize(item, self.read(item))


def _read_on_executor(item: WorkItem) -> None:
    """The read stage when the executor reads: nothing here, and no bytes held."""


class _Stopped(Exception):
    """The run stopped while this writer waited for the rest of a tensor."""


class _Writer:
    """Writes one output's tensors, piece by piece as they arrive, in its own thread (fsync included)."""

    def __init__(self, target: Target, specs: Sequence[TensorSpec], on_tensor: Callable[[PlanEntry], None]) -> None:
        self.target, self.specs, self.on_tensor = target, specs, on_tensor
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="rioquant-writer", daemon=True)
        self.thread.start()

    def put(self, message: tuple[WorkItem, QuantizedPiece] | None) -> None:
        """Queue a piece (None: no more), raising the writer's error if it has stopped on one."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(message, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        while True:  # only the calling thread puts, so after draining there is room for the stop
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        try:
            while (message := self.queue.get()) is not None:
                self._write_tensor(*message)
        except BaseException as err:  # noqa: BLE001 — raised again in the calling thread
            self.error = err

    def _write_tensor(self, item: WorkItem, piece: QuantizedPiece) -> None:
        entry = self.target.entries[item.index]
        tracker = TensorErrorTracker(entry.name, entry.qtype, entry.shape, self.specs[item.index].layer) \
            if self.target.report and entry.qtype != "F32" else None

        def chunks() -> Iterator[np.ndarray]:
            message: tuple | None = (item, piece)
            while True:
                if message is None:
                    raise _Stopped
                part, quantized = message
                for measured in quantized.measured:
                    tracker.add_slice(measured)
                yield from quantized.chunks
                if part.last:
                    return
                message = self.queue.get()

        self.on_tensor(entry)
        self.target.output.write_tensor(entry.name, chunks(), note=tracker.result if tracker else None)


def work_items(specs: Sequence[TensorSpec], targets: Sequence[Target]) -> list[WorkItem]:
    """Every piece some output still needs, in plan order (a resumed output skips its written tensors)."""
    items = []
    for i, spec in enumerate(specs):
        need = tuple(t for t, target in enumerate(targets) if not target.output.is_done(target.entries[i].name))
        if not need:
            continue
        if spec.is_expert_stack:
            slab = int(np.prod(spec.shape[1:], dtype=np.int64)) * 4
            items += [WorkItem(i, e, e == len(spec.pieces) - 1, need, slab) for e in range(len(spec.pieces))]
        else:
            items.append(WorkItem(i, None, True, need, int(np.prod(spec.shape, dtype=np.int64)) * 4))
    return items


def write_targets(
    specs: Sequence[TensorSpec], args: ModelArgs, targets: Sequence[Target], *,
    on_tensor: Callable[[PlanEntry], None], row_block_bytes: int, threads: int | None = None,
    progress: bool = False, desc: str = "", prefetch_bytes: int = PREFETCH_BYTES,
    executor: Submitter | None = None, in_flight: int = 1, read_on_executor: bool = False,
) -> None:
    """Read each piece once, quantize it into every target that needs it, write each target in order.

    With `read_on_executor` the executor reads too (ReadQuantizeStage). Targets are left open (finish or
    close them); on any error every writer thread is stopped first.
    """
    quantize_stage = QuantizeStage(specs, [t.entries for t in targets], [t.imatrix for t in targets],
                                   [t.report for t in targets], row_block_bytes, threads)
    items = work_items(specs, targets)
    bar = progress_bar(progress, total=sum(i.nbytes for i in items), unit="B", unit_scale=True, desc=desc)  # float32 bytes read: one read feeds every output
    writers = [_Writer(t, specs, on_tensor) for t in targets]

    def write(item: WorkItem, pieces: list[QuantizedPiece]) -> None:
        for t, piece in zip(item.targets, pieces, strict=True):
            writers[t].put((item, piece))
        bar.set_postfix_str(specs[item.index].name, refresh=False)
        bar.update(item.nbytes)

    try:
        if read_on_executor:
            stages = Stages(_read_on_executor, ReadQuantizeStage(ReadStage(specs, args), quantize_stage), write,
                            lambda item: 0)
        else:
            stages = Stages(ReadStage(specs, args), quantize_stage, write, lambda item: item.nbytes)
        run_pipeline(items, stages, prefetch_bytes, executor, in_flight)
        for writer in writers:
            writer.finish()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        bar.close()
