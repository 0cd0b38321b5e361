"""Where a conversion's weights come from: a checkpoint folder, a GGUF (one file or a split set), or a
Hugging Face Hub repository streamed through a bounded cache.

`convert` and `plan` see one `Source`: the architecture's arguments, the GGUF tensor list (`TensorSpec`s
whose pieces the source's own `read` turns into float32), and three seams that only some sources use:
`carried` (a GGUF's own keys, copied as llama-quantize copies them), `copies` (a tensor already
of its target type is copied byte for byte, as llama-quantize does) and `holding(spec)` (the window in
which a tensor's bytes are on disk: a Hub source downloads its shards then and deletes them once the
last tensor needing them is written). A checkpoint folder needs none of them. `on_nodes` is the source
`convert --ray` ships to the cluster's tasks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import gguf
import numpy as np

from rioquant.errors import CheckpointError
from rioquant.export.checkpoint import (
    SourceTensor,
    read_config,
    read_float32,
    read_rows_float32,
    scan_tensors,
)
from rioquant.export.qwen35moe import ModelArgs, config_tensors, model_args, tensor_specs
from rioquant.export.tensor_map import TensorSpec
from rioquant.quant.plan import PlanEntry

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


@dataclass(frozen=True)
class HubOptions:
    """Where a Hub source's files go and how much of that disk it may use at once (bytes; 0: no limit)."""

    cache_dir: Path | None = None  # default: $HF_HOME/rioquant (the repo's files in ORG/REPO under it)
    cache_max: int = 120 * 10**9


@dataclass
class Source:
    """A checkpoint folder (the default behaviour of every seam); the other sources subclass it."""

    path: Path  # the folder holding config.json and the tokenizer (a GGUF: its first shard)
    config: dict
    args: ModelArgs
    specs: list[TensorSpec]
    from_config: bool = False  # planned from config.json alone: no weights to read
    identity: str = ""  # what the resume key records as the source
    carried: Callable[[gguf.GGUFWriter], None] | None = None  # a GGUF's own keys, copied into the output
    # Its `holding` windows must not overlap (the Hub: the cache's high-water mark is checked for one).
    streams: ClassVar[bool] = False

    def read(self, tensor: SourceTensor, index: int | None = None) -> np.ndarray:
        return read_float32(tensor, index)

    def read_rows(self, tensor: SourceTensor, index: int | None, rows: list[int]) -> np.ndarray:
        return read_rows_float32(tensor, index, rows)

    @contextmanager
    def holding(self, spec: TensorSpec) -> Iterator[None]:
        yield

    def finish(self) -> None:
        """Called once every tensor is written."""

    def copies(self, spec: TensorSpec, qtype: str) -> bool:
        return False

    def raw_chunks(self, spec: TensorSpec, expert: int | None = None) -> Iterator[np.ndarray]:
        """The file bytes of a tensor `copies` says is copied (of expert slab `expert` alone, if given)."""
        raise NotImplementedError

    def kept_entries(self, entries: list[PlanEntry]) -> list[PlanEntry]:
        """The plan's entries as this source keeps them (a GGUF keeps its unquantizable tensors' types)."""
        return entries

    def on_nodes(self) -> Source:
        """The source a Ray cluster's tasks read with (`convert --ray`), shipped to every node: a folder
        or a GGUF is read by its path (the same on every node: a shared file system), a Hub repository
        from each node's own cache. The driver then reads nothing itself; it plans and writes."""
        return self


def checkpoint_source(src: Path, with_mtp: bool, weights_optional: bool) -> Source:
    """A Hugging Face checkpoint folder: config.json, safetensors headers (or config.json alone for `plan`)."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    config = read_config(src)
    from_config = weights_optional and not _has_weight_files(src)
    tensors = None if from_config else scan_tensors(src)  # first: a pickled or broken checkpoint is refused
    args = model_args(config, str(src / "config.json"))
    if tensors is None:
        tensors = config_tensors(args, src / "config.json")
    return Source(src, config, args, tensor_specs(tensors, args, with_mtp), from_config, str(src.resolve()))


def _has_weight_files(src: Path) -> bool:
    return any(src.glob("*.safetensors")) or (src / "model.safetensors.index.json").exists() or \
        any(src.glob("*.bin")) or any(src.glob("*.pt"))


def open_source(src: str | Path, with_mtp: bool = True, weights_optional: bool = False,
                hub: HubOptions | None = None) -> Source:
    """The source SRC names: a folder, a `.gguf` file (any shard of a split set), or ORG/REPO[@REVISION]."""
    path = Path(src)
    if path.suffix == ".gguf" and path.is_file():
        from rioquant.source.gguf_source import gguf_source

        return gguf_source(path, with_mtp)
    match = hub_repo_id(src)
    if match:
        from rioquant.source.hub import hub_source

        return hub_source(match["repo"], match["revision"], with_mtp, weights_optional, hub or HubOptions())
    return checkpoint_source(path, with_mtp, weights_optional)


def hub_repo_id(src: str | Path) -> re.Match | None:
    """SRC as ORG/REPO[@REVISION] (groups `repo`, `revision`) when it names no local path, else None."""
    match = HUB_ID.match(str(src))
    return match if match and not Path(src).exists() else None
