"""One GGUF file: its header (metadata and tensor infos), read fast without touching tensor data; the
one rule for a tensor's size in bytes; a tensor's bytes by positioned reads; what a tensor's name says.

Why not gguf-py's GGUFReader: it builds a numpy view per array element, which takes ~25 s on a
Qwen3.5 file (248K tokens, 500K merges) — too slow for `inspect`, verification before upload, or
a quick look at a 200 GB split set. The format is simple: a fixed prefix, typed key/values, then
tensor infos; scalar arrays are decoded with one `np.frombuffer` each.
"""

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from rioquant.errors import GGUFError
from rioquant.files.disk import read_at

V = GGUFValueType
SCALAR_DTYPES: dict[GGUFValueType, str] = {
    V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
    V.FLOAT32: "<f4", V.BOOL: "?", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8",
}
DEFAULT_ALIGNMENT = 32  # GGUF's, when general.alignment is absent
# gguf-py's TENSOR_NAMES: `blk.{bid}.{kind}[.weight|.bias]` inside a block, `{kind}[.weight]` outside
BLOCK_NAME = re.compile(r"^blk\.(?P<block>\d+)\.(?P<kind>.+?)(\.weight|\.bias)?$")
TOP_NAME = re.compile(r"^(?P<kind>.+?)(\.weight|\.bias)?$")


def block_index(name: str) -> int | None:
    """'blk.3.ffn_down_exps.weight' → 3; None for a tensor outside the blocks (token_embd, output)."""
    match = BLOCK_NAME.match(name)
    return int(match["block"]) if match else None


def tensor_kind(name: str) -> str:
    """'blk.3.ffn_down_exps.weight' → 'ffn_down_exps'; 'blk.3.ssm_a' → 'ssm_a'; 'output.weight' → 'output'."""
    match = BLOCK_NAME.match(name) or TOP_NAME.match(name)
    return match["kind"] if match else name


def align_up(n: int, alignment: int) -> int:
    """n rounded up to a multiple of alignment: where the next GGUF tensor (or llama.cpp buffer) starts."""
    return -(-n // alignment) * alignment


def nbytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of `shape` (numpy order, rows last) stored as `qtype`: whole blocks per row.

    gguf-py's `quant_shape_to_byte_shape`, reduced to a count; a row that is not a whole number of
    blocks cannot be stored in that type (ValueError)."""
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    row = int(shape[-1])
    if row % block:
        raise ValueError(f"row of {row} is not a multiple of {qtype.name}'s block of {block}")
    return math.prod(int(d) for d in shape[:-1]) * (row // block * type_bytes)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it, and where its bytes are."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows last): ggml's ne reversed
    qtype: GGMLQuantizationType
    offset: int  # from the start of the data section
    file: Path
    data_start: int  # absolute byte offset in `file`

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, self.shape)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict[str, object]
    value_types: dict[str, GGUFValueType]
    array_item_types: dict[str, GGUFValueType]  # of each array-valued key: what a copy must write again
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int

    @property
    def alignment(self) -> int:
        return int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))  # type: ignore[arg-type]


class _Cursor:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise GGUFError(f"{self.path}: truncated GGUF header")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> object:
        if vtype == V.STRING:
            return self.string()
        if vtype == V.ARRAY:
            etype, count = self.unpack("<IQ")
            etype = GGUFValueType(etype)
            if etype in SCALAR_DTYPES:
                dtype = np.dtype(SCALAR_DTYPES[etype])
                return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype).tolist()
            return [self.value(etype) for _ in range(count)]
        dtype = np.dtype(SCALAR_DTYPES[vtype])
        return np.frombuffer(self.take(dtype.itemsize), dtype=dtype)[0].item()


def read_header(path: Path, max_header_bytes: int = 256 * 1024 * 1024) -> GGUFHeader:
    """Parse the header of one GGUF file (one shard of a split set)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read(min(size, max_header_bytes))
    except OSError as err:
        raise GGUFError(f"{path}: cannot read ({err.strerror})") from None
    cur = _Cursor(data, path)
    try:
        magic, version, n_tensors, n_kv = cur.unpack("<4sIQQ")
        if magic != b"GGUF":
            raise GGUFError(f"{path}: invalid magic {magic!r}: not a GGUF file (corrupt or partial download?)")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported")
        metadata: dict[str, object] = {}
        types: dict[str, GGUFValueType] = {}
        item_types: dict[str, GGUFValueType] = {}
        for _ in range(n_kv):
            key = cur.string()
            (vtype,) = cur.unpack("<I")
            types[key] = GGUFValueType(vtype)
            if types[key] == V.ARRAY:
                item_types[key] = GGUFValueType(struct.unpack_from("<I", data, cur.pos)[0])
            metadata[key] = cur.value(types[key])
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            (n_dims,) = cur.unpack("<I")
            ne = cur.unpack(f"<{n_dims}Q")
            qtype_id, offset = cur.unpack("<IQ")
            shape = tuple(int(d) for d in reversed(ne))
            raw.append((name, shape, GGMLQuantizationType(qtype_id), int(offset)))
            nbytes(raw[-1][2], shape)  # a row that is not whole blocks: a corrupt header
    except (ValueError, struct.error) as err:
        raise GGUFError(f"{path}: corrupt GGUF header ({err})") from None
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))  # type: ignore[arg-type]
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    infos = [TensorInfo(name, shape, qtype, offset, path, data_offset + offset) for name, shape, qtype, offset in raw]
    return GGUFHeader(path, metadata, types, item_types, infos, data_offset, size)


def read_tensor_bytes(tensor: TensorInfo, index: int | None = None) -> np.ndarray:
    """The tensor's raw bytes (or slab `index` along its first axis), uint8 (n,): one positioned read,
    nothing memory-mapped, so a model being evaluated holds only the layer it runs."""
    size = tensor.nbytes if index is None else tensor.nbytes // tensor.shape[0]
    out = np.empty(size, dtype=np.uint8)
    with open(tensor.file, "rb", buffering=0) as f:
        if not read_at(f.fileno(), memoryview(out), tensor.data_start + (0 if index is None else index * size)):
            raise GGUFError(f"{tensor.file}: truncated while reading tensor {tensor.name}")
    return out
