"""Read a Hugging Face safetensors checkpoint lazily: headers first, bytes only when asked.

Why our own header parser instead of `safe_open`: we need each tensor's byte range to (1) detect a
truncated or corrupt shard before converting anything, and (2) read one expert slab of a fused
[E, rows, cols] tensor with a single positioned read, without memory-mapping the shard (mapped pages
count against the process and would grow with the model). The format is 8 bytes of little-endian
header length, a JSON header, then raw little-endian data; that is all we parse. Pickled `.bin`
checkpoints are refused: unpickling untrusted files runs code.

FP8 checkpoints (Qwen's `-FP8` releases, `quantization_config.quant_method: fp8`) hold `F8_E4M3`
weights, each with a float32 `NAME_scale_inv` of one multiplier per `weight_block_size` block; the
modules the config leaves out stay BF16. A weight is dequantized as llama.cpp's converter does
(`ModelBase.dequant_model`, `dequant_simple`): its exact float32 values times the block's scale,
repeated over the block and cut to the weight's shape, one float32 product per value.
"""

import functools
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rioquant.errors import CheckpointError
from rioquant.files.disk import is_confined_name, read_at

# safetensors dtype → (bytes per element, converter from the raw little-endian array to float32)
SOURCE_DTYPES: dict[str, tuple[int, str]] = {
    "BF16": (2, "<u2"),
    "F16": (2, "<f2"),
    "F32": (4, "<f4"),
    "F8_E4M3": (1, "u1"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@functools.cache
def _e4m3_values() -> np.ndarray:
    """The float32 value of every F8_E4M3 byte, as torch's float8_e4m3fn decodes it (the type llama.cpp's
    converter reads FP8 weights with; every value is exact in float32). torch only on first FP8 use."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the checkpoint as its header describes it; no data is held."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    data_start: int  # absolute byte offset in `file`
    scale: "BlockScale | None" = None  # an FP8 weight's NAME_scale_inv

    @property
    def itemsize(self) -> int:
        return SOURCE_DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize


@dataclass(frozen=True)
class BlockScale:
    """An FP8 weight's multipliers: `tensor` (..., ceil(rows / block[0]), ceil(cols / block[1]))."""

    tensor: SourceTensor
    block: tuple[int, int]


def read_header(path: Path, fetch: Callable[[int, int], bytes] | None = None, size: int | None = None) -> dict[str, SourceTensor]:
    """Parse one shard's header and check that every tensor's bytes lie inside the file.

    `fetch(start, length)` and `size` read a shard that is not on disk yet (the first bytes of a Hub
    shard, by HTTP range requests); the tensors still name `path`, where the shard will be."""
    try:
        if fetch is None:
            size = path.stat().st_size
            with open(path, "rb") as f:
                header_len, header = _parse_json_header(path, f.read(8), size, f.read)
        else:
            assert size is not None
            header_len, header = _parse_json_header(path, fetch(0, 8), size, lambda n: fetch(8, n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard not found") from None
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
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; rioquant reads BF16, F16, F32 and "
                                  "F8_E4M3 (with block scales)")
        tensor = SourceTensor(name, path, dtype, shape, data_base + int(start))
        if int(end) - int(start) != tensor.nbytes:
            raise CheckpointError(f"{path}: tensor {name} byte range does not match its shape {shape}")
        if data_base + int(end) > size:
            raise CheckpointError(
                f"{path}: truncated shard: tensor {name} ends at byte {data_base + int(end)}, file has {size}"
            )
        tensors[name] = tensor
    return tensors


def _parse_json_header(path: Path, prefix: bytes, size: int, read: Callable[[int], bytes]) -> tuple[int, object]:
    """(header length, parsed JSON header) from the 8-byte prefix and a reader of the next bytes."""
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(f"{path}: corrupt safetensors header (declared length {header_len})")
    try:
        return header_len, json.loads(read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err.__class__.__name__})") from None


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
    """All tensors of the checkpoint from the headers, with every index promise checked and an FP8
    checkpoint's scales attached to their weights."""
    tensors: dict[str, SourceTensor] = {}
    for path, promised in checkpoint_files(src).items():
        found = read_header(path)
        if promised is not None:
            missing = sorted(promised - found.keys())
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]} is listed in the index but absent from the shard")
        tensors.update(found)
    return with_block_scales(tensors, read_config(src), src / "config.json")


def with_block_scales(tensors: dict[str, SourceTensor], config: dict, where: Path) -> dict[str, SourceTensor]:
    """Each `NAME_scale_inv` attached to tensor NAME (and dropped, with the unused `.activation_scale`s, as
    llama.cpp's converter drops them); every F8_E4M3 tensor must have one, of the shape the block implies."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method not in (None, "fp8"):
        raise CheckpointError(f"{where}: quantization_config.quant_method {method!r}; rioquant reads unquantized "
                              "and fp8 (block-scaled F8_E4M3) checkpoints")
    scales = {n: t for n, t in tensors.items() if n.endswith("_scale_inv")}
    fp8 = sorted(n for n, t in tensors.items() if t.dtype == "F8_E4M3")
    if method is None:
        if fp8 or scales:
            raise CheckpointError(f"{where}: tensor {(fp8 or sorted(scales))[0]} is FP8 data, but there is no "
                                  'quantization_config with quant_method "fp8"')
        return tensors
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size {block!r}; expected [rows, cols]")
    out = {n: t for n, t in tensors.items() if n not in scales and not n.endswith(".activation_scale")}
    for name, scale in scales.items():
        weight = out.get(name.removesuffix("_scale_inv"))
        if weight is None or len(weight.shape) < 2:
            raise CheckpointError(f"{scale.file}: scale {name} belongs to no weight matrix")
        implied = (*weight.shape[:-2], *(math.ceil(d / b) for d, b in zip(weight.shape[-2:], block, strict=True)))
        if scale.shape != implied:
            raise CheckpointError(f"{scale.file}: scale {name} has shape {list(scale.shape)}; weight {weight.name} "
                                  f"{list(weight.shape)} in {block[0]}×{block[1]} blocks needs {list(implied)}")
        out[weight.name] = replace(weight, scale=BlockScale(scale, (block[0], block[1])))
    unscaled = next((n for n in fp8 if n in out and out[n].scale is None), None)
    if unscaled is not None:
        raise CheckpointError(f"{out[unscaled].file}: FP8 tensor {unscaled} has no {unscaled}_scale_inv")
    return out


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian source values as float32 (exact for every source dtype)."""
    if dtype == "BF16":  # widened inside the ufunc: no uint32 temporary beside the result
        return np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)
    if dtype == "F8_E4M3":
        return _e4m3_values()[raw]
    return raw.astype(np.float32)


def _scaled(values: np.ndarray, scale: BlockScale, index: int | None, rows: list[int] | None = None) -> np.ndarray:
    """FP8 values (..., rows, cols) times their block's multiplier, as llama.cpp's `dequant_simple`."""
    multipliers = read_float32(scale.tensor, index)  # (..., ceil(R / b0), ceil(C / b1))
    row_ids = np.arange(values.shape[-2]) if rows is None else np.asarray(rows)
    multipliers = np.take(multipliers, row_ids // scale.block[0], axis=-2)  # (..., rows, ceil(C / b1))
    multipliers = np.repeat(multipliers, scale.block[1], axis=-1)[..., : values.shape[-1]]  # (..., rows, cols)
    return values * multipliers


def read_float32(tensor: SourceTensor, index: int | None = None) -> np.ndarray:
    """The tensor (or its slab `index` along axis 0) as float32, read with one positioned read."""
    shape = tensor.shape if index is None else tensor.shape[1:]
    count = int(np.prod(shape, dtype=np.int64))
    offset = tensor.data_start + (0 if index is None else index * count * tensor.itemsize)
    raw = np.empty(count, dtype=SOURCE_DTYPES[tensor.dtype][1])
    with open(tensor.file, "rb", buffering=0) as f:
        if not read_at(f.fileno(), memoryview(raw).cast("B"), offset):
            raise CheckpointError(f"{tensor.file}: truncated while reading tensor {tensor.name}")
    values = _as_float32(raw, tensor.dtype).reshape(shape)
    return _scaled(values, tensor.scale, index) if tensor.scale else values


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
    values = _as_float32(out, tensor.dtype)
    return _scaled(values, tensor.scale, index, rows) if tensor.scale else values
