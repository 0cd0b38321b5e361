"""A GGUF model (one file or a split set) for evaluation: metadata, tensor locations, raw tensor bytes.

Headers are parsed by `export.gguf_header.read_header` (fast: gguf-py's GGUFReader needs ~25 s for a
248K-token vocabulary); this module joins the files of a split set and reads one tensor's bytes (or one
expert slab of it) with positioned reads, like the safetensors reader: nothing is memory-mapped while
the model runs.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from rioquant.errors import CheckpointError
from rioquant.export.gguf_header import read_header

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the header describes it; `shape` in numpy order (ne reversed)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    file: Path
    data_start: int  # absolute byte offset in `file`

    @property
    def nbytes(self) -> int:
        block, type_bytes = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * type_bytes


@dataclass(frozen=True)
class GGUFModel:
    """Metadata of the first file and the tensors of every file of the set, keyed by name."""

    path: Path
    files: tuple[Path, ...]
    kv: dict[str, object]
    tensors: dict[str, GGUFTensor]

    def get(self, key: str, default: object = None) -> object:
        return self.kv.get(key, default)


def _read_one(path: Path) -> tuple[dict[str, object], dict[str, GGUFTensor]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    header = read_header(path)
    tensors = {}
    for info in header.tensors:
        tensor = GGUFTensor(info.name, info.qtype, info.shape, path, header.data_offset + info.offset)
        if tensor.data_start + tensor.nbytes > header.file_size:
            raise CheckpointError(f"{path}: truncated: tensor {info.name} ends past the end of the file")
        tensors[info.name] = tensor
    return header.metadata, tensors


def split_files(path: Path, count: int) -> list[Path]:
    """All files of a split set from any one of them (`stem-0000i-of-0000N.gguf`)."""
    match = SPLIT_NAME.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: split.count is {count} but the name is not STEM-0000i-of-0000N.gguf")
    return [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def open_gguf(path: Path) -> GGUFModel:
    """Parse the header of `path` and, for a split set, of every other file of the set."""
    path = Path(path)
    kv, tensors = _read_one(path)
    count = int(kv.get(Keys.Split.LLM_KV_SPLIT_COUNT, 1))
    files = [path]
    if count > 1:
        files = split_files(path, count)
        if files[0] != path:
            kv, tensors = _read_one(files[0])  # metadata lives in the first file
        for other in files[1:]:
            tensors.update(_read_one(other)[1])
    return GGUFModel(files[0], tuple(files), kv, tensors)


def read_tensor_bytes(tensor: GGUFTensor, index: int | None = None) -> np.ndarray:
    """The tensor's raw bytes (or slab `index` along its first axis) with positioned reads: uint8 (n,)."""
    nbytes = tensor.nbytes if index is None else tensor.nbytes // tensor.shape[0]
    offset = tensor.data_start + (0 if index is None else index * nbytes)
    out = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(out)
    with open(tensor.file, "rb", buffering=0) as f:
        done = 0
        while done < nbytes:  # pread may return less than asked (2 GiB cap per call)
            n = os.preadv(f.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(f"{tensor.file}: truncated while reading tensor {tensor.name}")
            done += n
    return out
