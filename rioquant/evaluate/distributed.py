"""ppl / kld / imatrix on a Ray cluster (`--ray`): one task per group of chunks, merged in group order.

A group of chunks is the batch the engine runs at once, so a task that evaluates exactly one group
does the very arithmetic the local run does for that group: the same batch through the same layers,
the same roundings. What the tasks return is merged as the local run merges it, in chunk order:
per-token values (NLL, KLD, Δp, same-top) are concatenated, and the imatrix's float64 sums are added
group after group starting from zero. Hence the figures equal one machine's bit for bit, given the
same group size (--group-chunks; without it the cluster's run splits the chunks evenly over its nodes,
and a local run may batch them differently: change the batch and float32 matmuls round differently).

Each task streams every layer for its group from the model's path, which every node must see (a
shared file system). On a node with a GPU a `--device cuda` task holds one GPU.
"""

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from rioquant.cluster import RayExecutor, Resources, connect, node_count
from rioquant.evaluate.engine import EngineOptions


def group_slices(n_chunks: int, group_chunks: int | None, nodes: int) -> list[slice]:
    """The chunk groups the cluster evaluates, one task each: --group-chunks, or an even split over nodes."""
    size = group_chunks or -(-n_chunks // nodes)
    return [slice(start, min(n_chunks, start + size)) for start in range(0, n_chunks, size)]


def map_groups(fn: Callable, tokens: np.ndarray, options: EngineOptions, *shared: Any) -> Iterator[tuple[slice, Any]]:
    """(group, fn(*shared, group's tokens, options for that group)) for each group, in chunk order."""
    ray = connect(options.ray)
    groups = group_slices(tokens.shape[0], options.group_chunks, node_count(ray))
    cuda = options.device.startswith("cuda")
    task_options = replace(options, ray=None, progress=False, device="cuda" if cuda else options.device)
    executor = RayExecutor(ray, Resources(num_cpus=options.threads or 1, num_gpus=1 if cuda else 0))
    futures = [executor.submit(fn, *shared, np.ascontiguousarray(tokens[g]), replace(task_options, group_chunks=g.stop - g.start))
               for g in groups]  # all at once: a run has a few groups, each holding only its tokens
    return ((g, f.result()) for g, f in zip(groups, futures, strict=True))


def group_label(name: str, group: slice) -> str:
    """A profile's name for one group's run: 'model chunks 0-3'."""
    return f"{name} chunks {group.start}-{group.stop - 1}"
