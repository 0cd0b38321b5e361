"""Work spread over a Ray cluster (`--ray [ADDRESS]`), results taken back in a fixed order.

Ray (the optional extra `rioquant[ray]`) does what a cluster needs and rioquant does not write by hand:
scheduling by resources, moving arguments and results between nodes, retrying a task whose node died,
rebuilding a lost result from its task. rioquant gives it units of work that are pure functions of
their arguments (a tensor to quantize, a group of chunks to evaluate), reading the model from a path
every node sees, and takes the results back in submission order: what is merged from them (a GGUF's
bytes, a sum of statistics) never depends on which node finished first.

Every node runs the same rioquant (installed on each, or from a shared directory on PYTHONPATH).
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from rioquant.errors import ClusterError, RioquantError

INSTALL_HINT = "pip install 'rioquant[ray]'"
LOCAL = "local"  # --ray local: a one-machine Ray started by the driver (bench, trying it out)
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
            ray.init(address=None if address == LOCAL else address, logging_level="WARNING",
                     log_to_driver=False, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ClusterError(f"--ray {address}: cannot join the cluster: {str(err).splitlines()[0]}") from None
    return ray


def _call(fn: Callable, *args: Any) -> Any:
    """The one remote function: a unit of work is any importable rioquant function and its arguments."""
    return fn(*args)


@dataclass(frozen=True)
class Resources:
    """What one task holds on its node: Ray schedules by these (GPU work only where a GPU is)."""

    num_cpus: float = 1
    num_gpus: float = 0


def node_count(ray: Any) -> int:
    """Alive nodes that can run a task (a head started with --num-cpus 0 runs none)."""
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0) or 1


def ordered_map(ray: Any, fn: Callable, calls: Iterable[tuple], resources: Resources = Resources(),
                window: int | None = None, shared: tuple = ()) -> Iterator[Any]:
    """fn(*shared, *call) for each call, on the cluster, yielded in the order of `calls`.

    At most `window` tasks are out at once (default: twice the CPUs of the cluster), so the driver holds
    a bounded number of results however long the list; `shared` values are put in the object store once
    and reach every task by reference. A task that raised a RioquantError re-raises it here as itself.
    """
    remote = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False, num_cpus=resources.num_cpus,
                        num_gpus=resources.num_gpus)(_call)
    refs = [ray.put(value) for value in shared]
    window = window or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list = []
    calls = iter(calls)
    try:
        while True:
            while len(pending) < window and (call := next(calls, None)) is not None:
                pending.append(remote.remote(fn, *refs, *call))
            if not pending:
                return
            yield _result(ray, pending.pop(0))
    finally:
        for ref in pending:  # an error or an abandoned iteration: stop what is still out
            ray.cancel(ref)


def _result(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, RioquantError):
            raise err.cause from None
        raise
