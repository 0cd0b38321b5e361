"""Work spread over a Ray cluster (`--ray [ADDRESS]`), results taken back in a fixed order.

Ray (the optional extra `rioquant[ray]`) does what a cluster needs and rioquant does not write by hand:
scheduling by resources, moving arguments and results between nodes, retrying a task whose node died,
rebuilding a lost result from its task. rioquant gives it units of work that are pure functions of
their arguments (a tensor to quantize, a group of chunks to evaluate), reading the model from a path
every node sees, and takes the results back in submission order: what is merged from them (a GGUF's
bytes, a sum of statistics) never depends on which node finished first.

Every node runs the same rioquant (installed on each, or from a shared directory on PYTHONPATH).
"""

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from rioquant.errors import ClusterError, RioquantError

INSTALL_HINT = "pip install 'rioquant[ray]'"
TASK_RETRIES = 3  # a task whose node died runs again, up to this many times


def ray_module():
    """`ray`, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray: Ray is not installed; install it with {INSTALL_HINT}") from None
    return ray


def connect(address: str) -> Any:
    """Join the cluster at `address` ("auto": the one `ray start` runs on this machine, "local": start
    one here, "ray://host:10001" or "host:6379") unless this process already has; returns `ray`."""
    ray = ray_module()
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="WARNING",
                     log_to_driver=False, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ClusterError(f"--ray {address}: cannot join the cluster: {str(err).splitlines()[0]}") from None
    return ray


def _call(fn: Callable, *args: Any) -> Any:
    """The one remote function: a unit of work is any importable rioquant callable and its arguments."""
    return fn(*args)


@dataclass(frozen=True)
class Resources:
    """What one task holds on its node: Ray schedules by these (GPU work only where a GPU is)."""

    num_cpus: float = 1
    num_gpus: float = 0


def node_count(ray: Any) -> int:
    """Alive nodes that can run a task (a head started with --num-cpus 0 runs none)."""
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0) or 1


class RayExecutor:
    """rioquant.pipeline's executor on a Ray cluster: `submit(fn, *args)` runs fn(*args) as a Ray task.

    The callable (a conversion's quantize stage holds the plan and the imatrix) is put in the object
    store once and reaches every task by reference; each task's result comes back through a Future
    whose error is the task's own RioquantError, not Ray's wrapper. A task whose node dies runs again
    (TASK_RETRIES); an error raised by the task itself is not retried (the input would not change).
    """

    def __init__(self, ray: Any, resources: Resources = Resources()) -> None:
        self.ray = ray
        self._remote = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False, num_cpus=resources.num_cpus,
                                  num_gpus=resources.num_gpus)(_call)
        self._fn: Callable | None = None
        self._fn_ref: Any = None

    @property
    def in_flight(self) -> int:
        """Tasks worth having out at once: twice the cluster's CPUs, so no node waits for the driver."""
        return max(2, 2 * int(self.ray.cluster_resources().get("CPU", 1)))

    def submit(self, fn: Callable, /, *args: Any) -> Future:
        if fn is not self._fn:
            self._fn, self._fn_ref = fn, self.ray.put(fn)
        ref = self._remote.remote(self._fn_ref, *args)
        future: Future = Future()
        future.ref = ref  # held until the result is taken: Ray rebuilds a lost result only while referenced
        ref.future().add_done_callback(lambda done: _settle(future, done))
        return future


def _settle(future: Future, done: Future) -> None:
    error = done.exception()
    if error is None:
        future.set_result(done.result())
    else:
        cause = getattr(error, "cause", None)
        future.set_exception(cause if isinstance(cause, RioquantError) else error)
