"""imatrix files written the way llama.cpp's llama-imatrix writes them, and the importance
llama-quantize derives from them, computed here in plain numpy (tools/imatrix/imatrix.cpp,
tools/quantize/quantize.cpp). Independent of rioquant.

- GGUF: `general.type = imatrix`, `imatrix.datasets` (string array), `imatrix.chunk_count` and
  `imatrix.chunk_size` (u32); per entry `<name>.in_sum2` F32 ggml [n_per_row, n_mat] (numpy
  (n_mat, n_per_row)) holding Σx², and `<name>.counts` F32 ggml [1, n_mat] (numpy (n_mat, 1)).
- Legacy .dat: int32 n_entries; per entry int32 len, name, int32 ncall, int32 nval,
  float32[nval] = (Σx²/count)·ncall with 1·ncall for a matrix of count 0; int32 chunk count,
  int32 len, dataset name. ncall = ceil(max count / chunk_size).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, Keys


@dataclass(frozen=True)
class RawEntry:
    sums: np.ndarray  # float32 (n_mat, n_per_row): Σx² over the tokens each matrix saw
    counts: np.ndarray  # int (n_mat,): tokens per matrix (0: an expert never routed)


def random_entries(shapes: dict[str, tuple[int, ...]], seed: int = 0,
                   zero_counts: dict[str, list[int]] | None = None) -> dict[str, RawEntry]:
    """Plausible statistics for each tensor: counts in the hundreds, Σx² = count · E[x²] per column."""
    rng = np.random.default_rng(seed)
    entries = {}
    for name, shape in shapes.items():
        n_mat = shape[0] if len(shape) == 3 else 1
        counts = rng.integers(50, 600, size=n_mat)
        for e in (zero_counts or {}).get(name, []):
            counts[e] = 0
        mean_sq = rng.gamma(0.6, 1.5, size=(n_mat, shape[-1]))  # heavy-tailed column energies
        sums = (mean_sq * counts[:, None]).astype(np.float32)
        entries[name] = RawEntry(sums, counts)
    return entries


def write_gguf_imatrix(path: Path, entries: dict[str, RawEntry], datasets: list[str], chunk_count: int,
                       chunk_size: int = 512) -> Path:
    writer = GGUFWriter(path, arch="imatrix")
    writer.kv_data[0].pop(Keys.General.ARCHITECTURE)  # llama-imatrix writes no architecture
    writer.add_type("imatrix")
    writer.add_array(Keys.IMatrix.DATASETS, datasets)
    writer.add_uint32(Keys.IMatrix.CHUNK_COUNT, chunk_count)
    writer.add_uint32(Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name in sorted(entries):  # llama-imatrix sorts its entries by name
        e = entries[name]
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
        writer.add_tensor(f"{name}.counts", e.counts.astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_dat_imatrix(path: Path, entries: dict[str, RawEntry], dataset: str, chunk_count: int,
                      chunk_size: int = 512) -> Path:
    out = [struct.pack("<i", len(entries))]
    for name in sorted(entries):
        e = entries[name]
        ncall = int((e.counts.max() + chunk_size - 1) // chunk_size)
        count = e.counts.astype(np.float32)[:, None]
        value = np.where(count == 0, np.float32(1), e.sums)
        stored = (value / np.where(count == 0, np.float32(1), count)) * np.float32(ncall)  # float32 throughout
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, e.sums.size),
                stored.astype(np.float32).tobytes()]
    raw = dataset.encode()
    out += [struct.pack("<i", chunk_count), struct.pack("<i", len(raw)), raw]
    path.write_bytes(b"".join(out))
    return path


def gguf_importance(e: RawEntry) -> np.ndarray:
    """llama-quantize on a GGUF imatrix: in_sum2 / count per matrix, 1 where count is 0 (float32)."""
    count = e.counts.astype(np.float32)[:, None]
    safe = np.where(count > 0, count, np.float32(1))
    return np.where(count > 0, e.sums / safe, np.float32(1)).astype(np.float32)  # (n_mat, n_per_row)


def dat_importance(path: Path) -> dict[str, np.ndarray]:
    """llama-quantize on a legacy .dat: stored values / ncall, parsed here independently (flat arrays)."""
    buf = path.read_bytes()
    (n,) = struct.unpack_from("<i", buf, 0)
    pos, result = 4, {}
    for _ in range(n):
        (length,) = struct.unpack_from("<i", buf, pos)
        name = buf[pos + 4 : pos + 4 + length].decode()
        pos += 4 + length
        ncall, nval = struct.unpack_from("<ii", buf, pos)
        pos += 8
        values = np.frombuffer(buf, np.float32, nval, pos)
        pos += 4 * nval
        result[name] = (values / np.float32(ncall)).astype(np.float32) if ncall > 0 else values.copy()
    return result
