"""A fast, minimal GGUF parser for tests: raw metadata values and tensor bytes, nothing decoded.

gguf-py's GGUFReader builds a numpy view per array element and takes ~25 s on a 248K-token vocabulary;
comparing two files needs only each value's raw bytes, so this scans the header once with `struct`.
It is independent of the writer under test (gguf-py's GGUFWriter) and of rioquant.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value type → struct format of one scalar (8 = string, 9 = array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class ScannedTensor:
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order
    data: bytes


@dataclass(frozen=True)
class ScannedGGUF:
    kv: dict[str, tuple[int, bytes]]  # key → (value type, raw value bytes)
    tensors: dict[str, ScannedTensor]  # in file order


def _skip_value(buf, pos: int, vtype: int) -> int:
    if vtype == STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in SCALARS:
            return pos + count * struct.calcsize("<" + SCALARS[etype])
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    return pos + struct.calcsize("<" + SCALARS[vtype])


def scan(path: Path | str) -> ScannedGGUF:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        assert magic == b"GGUF" and version == 3, f"{path}: not a GGUF v3 file"
        pos = 24
        kv: dict[str, tuple[int, bytes]] = {}
        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", buf, pos)
            key = bytes(buf[pos + 8 : pos + 8 + n]).decode()
            (vtype,) = struct.unpack_from("<I", buf, pos + 8 + n)
            start = pos + 12 + n
            pos = _skip_value(buf, start, vtype)
            kv[key] = (vtype, bytes(buf[start:pos]))
        infos = []
        for _ in range(n_tensors):
            (n,) = struct.unpack_from("<Q", buf, pos)
            name = bytes(buf[pos + 8 : pos + 8 + n]).decode()
            pos += 8 + n
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, GGMLQuantizationType(qtype), tuple(reversed(ne)), offset))
        alignment = struct.unpack("<I", kv["general.alignment"][1])[0] if "general.alignment" in kv else 32
        data_start = (pos + alignment - 1) // alignment * alignment
        tensors = {}
        for name, qtype, shape, offset in infos:
            block, type_bytes = GGML_QUANT_SIZES[qtype]
            count = 1
            for d in shape:
                count *= d
            nbytes = count // block * type_bytes
            tensors[name] = ScannedTensor(qtype, shape, bytes(buf[data_start + offset : data_start + offset + nbytes]))
        return ScannedGGUF(kv, tensors)
