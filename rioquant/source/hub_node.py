"""A Hub source as a Ray cluster's tasks read it (`convert ORG/REPO --ray`): each node fetches the shards
its tasks read into its own cache folder, once, and keeps them.

The driver resolved the revision to a commit and listed the files (sizes, sha256); each task gets that
listing and fetches a shard through the same verified download as a local run (`hub.fetch_verified`:
huggingface_hub's `hf_hub_download`, pinned to the commit, from the Hub the driver used), then reads it
with the checkpoint readers. The node's folder is `--cache-dir`/ORG/REPO, or the node's own default
($HF_HOME/rioquant/ORG/REPO there). A shard stays there for the node's later tasks and later runs of
the same commit: tasks go to whichever node is free, so each node soon reads most shards, and deleting
one after a task would download it again for the next. The tasks on one node (one process per CPU)
share a shard through a file lock: the first downloads and checks it and leaves a stamp (its sha256,
size and mtime); the others find the stamp matching the file and read it without hashing it again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from filelock import FileLock

from rioquant.export.checkpoint import SourceTensor, read_float32
from rioquant.source import Source
from rioquant.source.hub import HubRepo, cache_folder, fetch_verified

STAMPS = Path(".cache") / "rioquant"  # under the repo's folder, beside huggingface_hub's own .cache/huggingface


class HubNodeSource(Source):
    """Reads a tensor on a node after fetching its shards (and an FP8 weight's scales) there."""

    hub: HubRepo  # as the driver opened it: its folder is the driver's, the tensors' paths are under it
    cache_dir: Path | None

    def read(self, tensor: SourceTensor, index: int | None = None) -> np.ndarray:
        node = replace(self.hub, folder=cache_folder(self.hub.repo, self.cache_dir))  # this node's folder
        scale = tensor.scale and replace(tensor.scale, tensor=self._fetched(node, tensor.scale.tensor))
        return read_float32(replace(self._fetched(node, tensor), scale=scale), index)

    def _fetched(self, node: HubRepo, tensor: SourceTensor) -> SourceTensor:
        shard = tensor.file.relative_to(self.hub.folder).as_posix()
        fetch_once(node, shard)
        return replace(tensor, file=node.folder / shard)


def fetch_once(hub: HubRepo, shard: str) -> None:
    """The shard in the folder, downloaded and verified by one process of the node; the others wait on
    the lock and find its stamp."""
    stamp = hub.folder / STAMPS / f"{shard}.verified"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(stamp.with_suffix(".lock")):
        if stamp.is_file() and stamp.read_text() == _stamp(hub, shard):
            return
        stamp.unlink(missing_ok=True)
        fetch_verified(hub, shard)
        stamp.write_text(_stamp(hub, shard))


def _stamp(hub: HubRepo, shard: str) -> str:
    """What the Hub lists for the shard (sha256, or the git blob id of a non-LFS file) and the file's size
    and mtime: a file replaced or changed since it was verified no longer matches."""
    listed = hub.listed[shard]
    path = hub.folder / shard
    stat = path.stat() if path.is_file() else None
    return f"{listed.lfs.sha256 if listed.lfs else listed.blob_id} {stat and stat.st_size} {stat and stat.st_mtime_ns}"
