"""One read of the checkpoint, every output written: the read, quantize and write stages of a conversion.

convert.py opens each output (its plan, imatrix and resumable GGUF, a `Target`); `write_targets` runs
them all through one rioquant.pipeline pass. Each source tensor (each expert slab of an expert stack)
is read and transformed once, quantized into every output that still lacks it, and handed to that
output's writer thread. Each output gets exactly the bytes, journal and report of its own
single-output run, since every stage works per output as that run does, in the same tensor order.

The weights come through the run's `Source` (rioquant.source): its `read` gives the float32; a tensor
it `copies` for an output (a GGUF tensor already of that output's type) goes to that output as the
file's bytes, unquantized; its `holding(spec)` window opens before a tensor's first read and closes
once every output has written that tensor (`_Holdings`).

`ReadStage` and `QuantizeStage` hold plain data (no open files), so another executor can ship them
to other processes; `write_targets(..., executor=, in_flight=)` is where it plugs in.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import gguf
import numpy as np

from rioquant.errors import BadRowError, CheckpointError, QuantInputError
from rioquant.export.gguf_out import ShardedGGUFOutput
from rioquant.export.qwen35moe import load_tensor
from rioquant.export.tensor_map import TensorSpec, load_piece
from rioquant.pipeline import PREFETCH_BYTES, Stages, Submitter, run_pipeline
from rioquant.progress import progress_bar
from rioquant.quant import quantize
from rioquant.quant.imatrix import Imatrix
from rioquant.quant.metrics import Slice, TensorErrorTracker, quantize_slice
from rioquant.quant.plan import PlanEntry
from rioquant.source import Source

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
    copied: tuple[int, ...]  # the targets the source copies it into as its file bytes (no float32 needed)
    nbytes: int  # float32 bytes once read (none when every target copies)


@dataclass(frozen=True)
class QuantizedPiece:
    """One output's bytes of a work item, in row blocks, and their measured error (when reported)."""

    chunks: list[np.ndarray]
    measured: list[Slice]
    copied: bool = False  # the source's bytes, not quantized here: nothing measured


@dataclass(frozen=True)
class ReadStage:
    source: Source

    def __call__(self, item: WorkItem) -> np.ndarray | None:
        """The item's float32 rows (rows, n): read and transformed, exactly what each output quantizes
        (None when every output copies it)."""
        if len(item.copied) == len(item.targets):
            return None
        spec, read = self.source.specs[item.index], self.source.read
        if item.expert is not None:
            slab = load_piece(spec.pieces[item.expert], read)
        else:
            slab = load_tensor(spec, self.source.args, read)
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
    source: Source
    entries: Sequence[Sequence[PlanEntry]]  # per output
    imatrices: Sequence[Imatrix | None]  # per output
    reports: Sequence[bool]  # per output
    row_block_bytes: int
    threads: int | None

    def __call__(self, item: WorkItem, rows: np.ndarray | None) -> list[QuantizedPiece]:
        """The item quantized into each output that needs it (expert e with slice e of the importance,
        as llama-quantize does), each row measured against its bytes as it is quantized; or, for an output
        the source copies it into, the source's bytes as they are (as llama-quantize copies them)."""
        spec = self.source.specs[item.index]
        return [QuantizedPiece(list(self.source.raw_chunks(spec, item.expert)), [], copied=True) if t in item.copied
                else self._one(spec, self.entries[t][item.index], self.imatrices[t], self.reports[t], item.expert, rows)
                for t in item.targets]

    def _one(self, spec: TensorSpec, entry: PlanEntry, imatrix: Imatrix | None, report: bool,
             expert: int | None, rows: np.ndarray) -> QuantizedPiece:
        weights = imatrix.importance(entry.name, rows.shape[1], expert) if imatrix else None
        no_data = imatrix is not None and (expert or 0) in imatrix.experts_without_data(entry.name, entry.shape[-1])
        measure = report and entry.qtype != "F32"
        chunks, measured = [], []
        for start, block in row_blocks(rows, spec.is_expert_stack, self.row_block_bytes):
            try:
                if measure:
                    data, slab = quantize_slice(block, entry.qtype, weights, no_data, self.threads)
                    measured.append(slab)
                else:
                    data = quantize(block, T[entry.qtype], imatrix=weights, threads=self.threads)
            except QuantInputError as err:
                source = spec.pieces[0].source
                if isinstance(err, BadRowError):
                    err = err.shifted(start)
                raise CheckpointError(f"{source.file.name}: tensor {source.name}: {err}") from None
            chunks.append(data)
        return QuantizedPiece(chunks, measured)


@dataclass(frozen=True)
class ReadQuantizeStage:
    """Read and quantize in one call, for an executor on other machines that read the source themselves
    (a Ray cluster, `Source.on_nodes`): the float32 rows never cross the network, only the quantized
    bytes come back."""

    read: ReadStage
    quantize: QuantizeStage

    def __call__(self, item: WorkItem, _: None) -> list[QuantizedPiece]:
        return self.quantize(item, self.read(item))


class _Stopped(Exception):
    """The run stopped while this writer waited for the rest of a tensor (or a read for its window)."""


class _Holdings:
    """Each tensor's `source.holding(spec)` window, from before its first piece is read until every output
    that needs it has written it (in the writer threads), so a Hub source deletes a shard only once no
    read-ahead piece and no writer still needs it.

    For a source that `streams` (the Hub), a window opens only once the previous one has closed: its
    shards on disk are then exactly those --cache-max was checked against, the plan's one tensor at a time
    (read-ahead would hold the next tensors' shards too). Such a source is network-bound, so little
    overlap is lost. `stop` wakes a read waiting for a window when the run stops.
    """

    def __init__(self, source: Source, items: Sequence[WorkItem]) -> None:
        self.source, self.one_at_a_time = source, source.streams
        self.outputs_left = {item.index: len(item.targets) for item in items}
        self.open: dict[int, AbstractContextManager] = {}
        self.cond = threading.Condition()
        self.stopped = False

    def enter(self, item: WorkItem) -> None:
        """Open the item's tensor's window before its first piece is read."""
        if item.expert not in (None, 0):
            return
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or not (self.one_at_a_time and self.open))
            if self.stopped:
                raise _Stopped
        window = self.source.holding(self.source.specs[item.index])  # a download: outside the lock
        window.__enter__()
        with self.cond:
            self.open[item.index] = window

    def written(self, index: int) -> None:
        """One output has written tensor `index`; the last one closes its window."""
        with self.cond:
            self.outputs_left[index] -= 1
            if self.outputs_left[index] == 0:
                self.open.pop(index).__exit__(None, None, None)
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class _Writer:
    """Writes one output's tensors, piece by piece as they arrive, in its own thread (fsync included)."""

    def __init__(self, target: Target, specs: Sequence[TensorSpec], on_tensor: Callable[[PlanEntry], None],
                 holdings: _Holdings) -> None:
        self.target, self.specs, self.on_tensor, self.holdings = target, specs, on_tensor, holdings
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
            self.holdings.stop()

    def _write_tensor(self, item: WorkItem, piece: QuantizedPiece) -> None:
        entry = self.target.entries[item.index]
        tracker = TensorErrorTracker(entry.name, entry.qtype, entry.shape, self.specs[item.index].layer) \
            if self.target.report and entry.qtype != "F32" and not piece.copied else None

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
        self.holdings.written(item.index)


def work_items(source: Source, targets: Sequence[Target]) -> list[WorkItem]:
    """Every piece some output still needs, in plan order (a resumed output skips its written tensors)."""
    items = []
    for i, spec in enumerate(source.specs):
        need = tuple(t for t, target in enumerate(targets) if not target.output.is_done(target.entries[i].name))
        if not need:
            continue
        copied = tuple(t for t in need if source.copies(spec, targets[t].entries[i].qtype))
        read = len(copied) < len(need)
        if spec.is_expert_stack:
            slab = int(np.prod(spec.shape[1:], dtype=np.int64)) * 4 * read
            items += [WorkItem(i, e, e == len(spec.pieces) - 1, need, copied, slab) for e in range(len(spec.pieces))]
        else:
            items.append(WorkItem(i, None, True, need, copied, int(np.prod(spec.shape, dtype=np.int64)) * 4 * read))
    return items


def write_targets(
    source: Source, targets: Sequence[Target], *,
    on_tensor: Callable[[PlanEntry], None], row_block_bytes: int, threads: int | None = None,
    progress: bool = False, desc: str = "", prefetch_bytes: int = PREFETCH_BYTES,
    executor: Submitter | None = None, in_flight: int = 1, read_on_executor: bool = False,
) -> None:
    """Read each piece once, quantize it into every target that needs it, write each target in order.

    With `read_on_executor` the executor reads too (ReadQuantizeStage). Targets are left open (finish or
    close them); on any error every writer thread is stopped first.
    """
    specs = source.specs
    quantize_stage = QuantizeStage(source, [t.entries for t in targets], [t.imatrix for t in targets],
                                   [t.report for t in targets], row_block_bytes, threads)
    items = work_items(source, targets)
    bar = progress_bar(progress, total=sum(i.nbytes for i in items), unit="B", unit_scale=True, desc=desc)  # float32 bytes read: one read feeds every output
    holdings = _Holdings(source, items)
    writers = [_Writer(t, specs, on_tensor, holdings) for t in targets]
    read = ReadStage(source)

    def read_held(item: WorkItem) -> np.ndarray | None:
        holdings.enter(item)
        return read(item)

    def held_for_executor(item: WorkItem) -> None:
        holdings.enter(item)

    def write(item: WorkItem, pieces: list[QuantizedPiece]) -> None:
        for t, piece in zip(item.targets, pieces, strict=True):
            writers[t].put((item, piece))
        bar.set_postfix_str(specs[item.index].name, refresh=False)
        bar.update(item.nbytes)

    try:
        if read_on_executor:
            stages = Stages(held_for_executor, ReadQuantizeStage(read, quantize_stage), write, lambda item: 0,
                            holdings.stop)
        else:
            stages = Stages(read_held, quantize_stage, write, lambda item: item.nbytes, holdings.stop)
        run_pipeline(items, stages, prefetch_bytes, executor, in_flight)
        for writer in writers:
            writer.finish()
    except BaseException as err:
        for writer in writers:
            writer.abort()
        failed = next((w.error for w in writers if w.error is not None and not isinstance(w.error, _Stopped)), None)
        if isinstance(err, _Stopped) and failed is not None:  # a read stopped by a writer's error: that error
            raise failed from None
        raise
    finally:
        bar.close()
