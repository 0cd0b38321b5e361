"""read → quantize → write with the three stages overlapping: the seam every conversion runs through.

A conversion is a sequence of work items (a tensor, or one expert slab of an expert stack). Each is
read (and transformed) into float32, quantized into every output, and written. Done one after the
other, the disk waits for the cores and the cores for the disk; here a reader thread reads ahead,
bounded by the bytes its results hold (known from the plan before reading), while the quantize stage
runs on an executor and results are written in item order. Numba's drivers release the GIL (nogil),
so reading, quantizing and writing run at once in one process.

The executor is the seam for other schedulers: anything with `submit(fn, *args) -> Future` (a
`concurrent.futures.Executor`, or Ray through `ObjectRef.future()`) runs the quantize stage, with up
to `in_flight` items submitted at once. The default runs it in the calling thread, one item at a time:
Numba's parallel drivers already use every core, and its default threading layer must not be entered
from two threads at once.
"""

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

Item = TypeVar("Item")
Read = TypeVar("Read")
Done = TypeVar("Done")

PREFETCH_BYTES = 1 << 30  # float32 read ahead of the quantize stage, beyond the item being quantized


class Submitter(Protocol):
    """What the quantize stage runs on: `concurrent.futures.Executor.submit`'s shape."""

    def submit(self, fn: Callable, /, *args) -> Future: ...


class InlineExecutor:
    """Runs each submitted call at once in the calling thread (the default: see the module docstring)."""

    def submit(self, fn: Callable, /, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 — handed to the caller through the future
            future.set_exception(err)
        return future


@dataclass(frozen=True)
class Stages(Generic[Item, Read, Done]):
    """The three stages of one run. `read_bytes(item)` is the memory `read(item)` will hold, from the plan.

    `read` runs in the reader thread, `quantize` on the executor, `write` in the calling thread in item
    order (a write that must not block the next quantize hands its bytes to a writer thread itself).
    """

    read: Callable[[Item], Read]
    quantize: Callable[[Item, Read], Done]
    write: Callable[[Item, Done], None]
    read_bytes: Callable[[Item], int]
    stop: Callable[[], None] = lambda: None  # when the run ends: wakes a read waiting on the write stage


class _ByteBudget:
    """A counting semaphore in bytes: an item larger than the whole budget waits until nothing is held."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self.cond = threading.Condition()
        self.closed = False

    def acquire(self, n: int) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or self.held == 0 or self.held + n <= self.limit)
            if self.closed:
                return False
            self.held += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.held -= n
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


_END = object()


def run_pipeline(
    items: Iterable[Item], stages: Stages[Item, Read, Done], prefetch_bytes: int = PREFETCH_BYTES,
    executor: Submitter | None = None, in_flight: int = 1,
) -> None:
    """Run every item through read → quantize → write; the first error of any stage stops all and is raised."""
    executor = executor or InlineExecutor()
    budget = _ByteBudget(prefetch_bytes)
    ready: queue.Queue = queue.Queue()  # (item, read result, bytes) or (_END, error)

    def reader() -> None:
        error = None
        try:
            for item in items:
                n = stages.read_bytes(item)
                if not budget.acquire(n):
                    break
                ready.put((item, stages.read(item), n))
        except BaseException as err:  # noqa: BLE001 — re-raised in the calling thread
            error = err
        ready.put((_END, error, 0))

    thread = threading.Thread(target=reader, name="rioquant-reader", daemon=True)
    thread.start()
    pending: deque[tuple[Item, Future, int]] = deque()
    try:
        while True:
            item, data, n = ready.get()
            if item is _END:
                if data is not None:
                    raise data
                break
            pending.append((item, executor.submit(stages.quantize, item, data), n))
            del data
            while len(pending) >= in_flight:
                _write_oldest(pending, stages, budget)
        while pending:
            _write_oldest(pending, stages, budget)
    finally:
        budget.close()
        stages.stop()
        while thread.is_alive():  # unblock a reader waiting to put, then let it finish its read
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _write_oldest(pending: deque, stages: Stages, budget: _ByteBudget) -> None:
    item, future, n = pending.popleft()
    try:
        done = future.result()
    finally:
        budget.release(n)
    stages.write(item, done)
