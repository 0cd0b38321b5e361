"""Read a Hugging Face safetensors checkpoint lazily: headers first, bytes only when asked.

Why our own header parser instead of `safe_open`: we need each tensor's byte range to (1) detect a
truncated or corrupt shard before converting anything, and (2) read one expert slab of a fused
[E, rows, cols] tensor with a single positioned read, without memory-mapping the shard (mapped pages
count against the process and would grow with the model). The format is 8 bytes of little-endian
header length, a JSON header, then raw little-endian data; that is all we parse. Pickled `.bin`
checkpoints are refused: unpickling untrusted files runs code.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rioquant.errors import CheckpointError
from rioquant.files.disk import is_confined_name, read_at

# safetensors dtype → (bytes per element, converter from the raw little-endian array to float32)
SOURCE_DTYPES: dict[str, tuple[int, str]] = {
    "BF16": (2, "<u2"),
    "F16": (2, "<f2"),
    "F32": (4, "<f4"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the checkpoint as its header describes it; no data is held."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    data_start: int  # absolute byte offset in `file`

    @property
    def itemsize(self) -> int:
        return SOURCE_DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize


def read_header(path: Path) -> dict[str, SourceTensor]:
    """Parse one shard's header and check that every tensor's bytes lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (declared length {header_len})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_base = 8 + header_len
    tensors: dict[str, SourceTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        if dtype not in SOURCE_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; rioquant reads BF16, F16 and F32")
        tensor = SourceTensor(name, path, dtype, shape, data_base + int(start))
        if int(end) - int(start) != tensor.nbytes:
            raise CheckpointError(f"{path}: tensor {name} byte range does not match its shape {shape}")
        if data_base + int(end) > size:
            raise CheckpointError(
                f"{path}: truncated shard: tensor {name} ends at byte {data_base + int(end)}, file has {size}"
            )
        tensors[name] = tensor
    return tensors


def read_config(src: Path) -> dict:
    """The checkpoint's config.json, parsed."""
    path = src / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (is {src} a Hugging Face checkpoint?)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def checkpoint_files(src: Path) -> dict[Path, set[str] | None]:
    """Shard files of a checkpoint, with the tensor names the index promises for each (None: no index)."""
    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        files: dict[Path, set[str] | None] = {}
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (weight_map is not an object)")
        for tensor_name, shard in weight_map.items():
            if not isinstance(shard, str) or not is_confined_name(shard):
                raise CheckpointError(f"{index_path}: weight_map names {shard!r} for tensor {tensor_name}, a file "
                                      f"outside {src}; refusing to read it")
            expected = files.setdefault(src / shard, set())
            assert expected is not None
            expected.add(tensor_name)
        return files
    single = src / "model.safetensors"
    if single.is_file():
        return {single: None}
    if any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise CheckpointError(f"{src}: only pickled .bin/.pt weights found; rioquant reads safetensors only")
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")


def scan_tensors(src: Path) -> dict[str, SourceTensor]:
    """All tensors of the checkpoint from the headers, with every index promise checked."""
    tensors: dict[str, SourceTensor] = {}
    for path, promised in checkpoint_files(src).items():
        found = read_header(path)
        if promised is not None:
            missing = sorted(promised - found.keys())
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]} is listed in the index but absent from the shard")
        tensors.update(found)
    return tensors


def read_float32(tensor: SourceTensor, index: int | None = None) -> np.ndarray:
    """The tensor (or its slab `index` along axis 0) as float32, read with one positioned read."""
    shape = tensor.shape if index is None else tensor.shape[1:]
    count = int(np.prod(shape, dtype=np.int64))
    offset = tensor.data_start + (0 if index is None else index * count * tensor.itemsize)
    raw = np.empty(count, dtype=SOURCE_DTYPES[tensor.dtype][1])
    with open(tensor.file, "rb", buffering=0) as f:
        if not read_at(f.fileno(), memoryview(raw).cast("B"), offset):
            raise CheckpointError(f"{tensor.file}: truncated while reading tensor {tensor.name}")
    if tensor.dtype == "BF16":  # widened inside the ufunc: no uint32 temporary beside the result
        values = np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)
    else:
        values = raw.astype(np.float32)
    return values.reshape(shape)


def read_rows_float32(tensor: SourceTensor, index: int | None, rows: list[int]) -> np.ndarray:
    """Selected rows (of slab `index` along axis 0, if given) as float32 (len(rows), cols).

    For sampling (`--target-size` error measurement): one positioned read per run of consecutive rows,
    so measuring a few rows of each expert never reads the rest of the shard.
    """
    cols = tensor.shape[-1]
    per_slab = int(np.prod(tensor.shape[1:-1], dtype=np.int64)) if index is not None else 0
    base = tensor.data_start + (index * per_slab * cols * tensor.itemsize if index is not None else 0)
    out = np.empty((len(rows), cols), dtype=SOURCE_DTYPES[tensor.dtype][1])
    with open(tensor.file, "rb", buffering=0) as f:
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            if not read_at(f.fileno(), memoryview(out[start:end]).cast("B"), base + rows[start] * cols * tensor.itemsize):
                raise CheckpointError(f"{tensor.file}: truncated while reading tensor {tensor.name}")
            start = end
    if tensor.dtype == "BF16":
        return (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(np.float32)
