"""Importance matrices from llama.cpp's `llama-imatrix`, mapped onto the tensors we write.

Two file formats, read as llama-quantize reads them (common/imatrix-loader.cpp, tools/quantize):
- GGUF (`general.type = imatrix`): per weight `<name>.in_sum2` F32 [n_per_row, n_mat] holding Σx² and
  `<name>.counts` F32 [1, n_mat] holding the tokens seen by each matrix (n_mat = n_expert for the 3-D
  expert tensors, 1 otherwise); keys `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`.
  Importance of matrix e = in_sum2[e] / counts[e], or 1 where counts[e] is 0 (an expert never routed).
- Legacy `.dat`: int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval,
  float32[nval] = (Σx²/count)·ncall (llama-imatrix writes 1·ncall for experts without data); then,
  optionally, int32 chunk count, int32 length and the dataset name. Importance = values / ncall.

Entries are keyed by GGUF tensor name (`blk.0.ffn_down_exps.weight`); expert e of a 3-D tensor takes
the slice e of its importance, exactly as llama-quantize hands `imatrix + e·n_per_row` to
ggml_quantize_chunk for that expert's rows. Slices are computed on demand from the memory-mapped
file, so memory stays bounded by one slice, not by the imatrix.
"""

import logging
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from rioquant.errors import ImatrixError
from rioquant.files.gguf_file import block_index

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType

# ggml quantizes these without looking at importance weights: an imatrix changes nothing for them
IGNORES_IMATRIX = frozenset({T.F32, T.F16, T.BF16, T.Q8_0})

# llama-quantize tolerates a wrongly sized entry for the token embedding (it is a lookup, not a
# matmul, so llama-imatrix never measures it) and quantizes it without importance.
LENIENT_TENSORS = ("token_embd.weight",)



@dataclass(frozen=True)
class ImatrixEntry:
    """One entry as stored: Σx² (or the legacy scaled mean) and how many tokens each matrix saw."""

    sums: np.ndarray  # float32 (nval,), a view into the file
    counts: np.ndarray  # int64 (n_mat,) tokens per matrix (GGUF); (1,) holding ncall (legacy)

    @property
    def nval(self) -> int:
        return int(self.sums.size)


@dataclass(frozen=True)
class Imatrix:
    """A loaded imatrix file; `importance(name, n_per_row, expert)` gives what ggml is handed."""

    path: Path
    legacy: bool
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int
    entries: Mapping[str, ImatrixEntry]

    def importance(self, name: str, n_per_row: int, expert: int | None = None) -> np.ndarray | None:
        """float32 (n_per_row,) importance of matrix `expert` (None for a 2-D tensor), or None if absent."""
        entry = self.entries.get(name)
        if entry is None or entry.nval % n_per_row:
            return None
        e = expert or 0
        sums = entry.sums[e * n_per_row : (e + 1) * n_per_row]
        if sums.size != n_per_row:
            return None
        if self.legacy:
            ncall = int(entry.counts[0])
            return sums / np.float32(ncall) if ncall > 0 else sums.copy()
        count = int(entry.counts[e])
        if count <= 0:
            return np.ones(n_per_row, dtype=np.float32)  # no token reached this expert: neutral weights
        return sums / np.float32(count)

    def experts_without_data(self, name: str, n_per_row: int) -> list[int]:
        """Matrices of entry `name` that saw no token (legacy: slices llama-imatrix filled with 1s)."""
        entry = self.entries.get(name)
        if entry is None:
            return []
        if not self.legacy:
            return [int(e) for e in np.flatnonzero(entry.counts <= 0)]
        per_matrix = entry.sums.reshape(-1, n_per_row)  # (n_mat, n_per_row)
        ncall = np.float32(max(int(entry.counts[0]), 1))
        return [int(e) for e in np.flatnonzero(np.all(per_matrix == ncall, axis=1))] if len(per_matrix) > 1 else []

    @property
    def dataset(self) -> str:
        return self.datasets[0] if self.datasets else ""

    def restricted_to(self, names: Collection[str]) -> "Imatrix":
        """The same file with only the entries `check_fit` found usable."""
        return replace(self, entries={n: e for n, e in self.entries.items() if n in names})


def read_imatrix(path: Path) -> Imatrix:
    """Read a GGUF or legacy `.dat` imatrix; the format is told by the file's magic, as llama.cpp does."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ImatrixError(f"{path}: cannot read imatrix ({err.strerror})") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ImatrixError(f"{path}: not a readable GGUF ({err})") from None
    kind = reader.get_field(gguf.Keys.General.TYPE)
    if kind is None or kind.contents() != gguf.GGUFType.IMATRIX:
        got = kind.contents() if kind is not None else "no general.type"
        raise ImatrixError(f"{path}: general.type is {got!r}, not 'imatrix' (is this a model file?)")
    keys = (gguf.Keys.IMatrix.DATASETS, gguf.Keys.IMatrix.CHUNK_COUNT, gguf.Keys.IMatrix.CHUNK_SIZE)
    missing = [k for k in keys if reader.get_field(k) is None]
    if missing:
        raise ImatrixError(f"{path}: imatrix metadata {', '.join(missing)} missing (llama-quantize refuses it too)")
    datasets = tuple(reader.get_field(gguf.Keys.IMatrix.DATASETS).contents())
    chunk_count = int(reader.get_field(gguf.Keys.IMatrix.CHUNK_COUNT).contents())
    chunk_size = int(reader.get_field(gguf.Keys.IMatrix.CHUNK_SIZE).contents())

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != T.F32:
                    raise ImatrixError(f"{path}: {t.name} is {t.tensor_type.name}; imatrix tensors must be F32")
                into[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    unpaired = sorted(sums.keys() ^ counts.keys())
    if unpaired:
        raise ImatrixError(f"{path}: entry {unpaired[0]} lacks its {'counts' if unpaired[0] in sums else 'in_sum2'} tensor")
    entries = {}
    for name, s in sums.items():
        c = counts[name]
        if c.size == 0 or s.size % c.size:
            raise ImatrixError(f"{path}: {name}.in_sum2 has {s.size} values, not a multiple of its {c.size} counts")
        rounded = np.sign(c) * np.floor(np.abs(c) + 0.5)  # std::lround, as llama.cpp reads counts
        entries[name] = ImatrixEntry(s, rounded.astype(np.int64))
    if not entries:
        raise ImatrixError(f"{path}: the imatrix holds no entries")
    return Imatrix(path, False, datasets, chunk_count, chunk_size, entries)


def _read_legacy(path: Path) -> Imatrix:
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    buf = memoryview(data)
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise ImatrixError(f"{path}: truncated legacy imatrix while reading {what} (byte {pos})")
        values = struct.unpack_from(fmt, buf, pos)
        pos += size
        return values

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1:
        raise ImatrixError(f"{path}: neither a GGUF imatrix nor a legacy .dat one (entry count {n_entries})")
    entries = {}
    for i in range(n_entries):
        (length,) = take("<i", f"entry {i}'s name length")
        if not 0 < length <= 4096:
            raise ImatrixError(f"{path}: entry {i} has a name length of {length}: not an imatrix file")
        (raw_name,) = take(f"<{length}s", f"entry {i}'s name")
        name = raw_name.decode(errors="replace")
        ncall, nval = take("<ii", f"entry {name}'s sizes")
        if nval < 1 or pos + 4 * nval > len(buf):
            raise ImatrixError(f"{path}: truncated legacy imatrix in entry {name} ({nval} values)")
        sums = np.frombuffer(data, dtype=np.float32, count=nval, offset=pos)  # may be unaligned: sliced, never fed raw
        pos += 4 * nval
        entries[name] = ImatrixEntry(sums, np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, ()
    if pos + 4 <= len(buf):  # optional trailer: chunk count and the dataset name
        (chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(buf):
            (length,) = take("<i", "the dataset name length")
            if 0 < length <= len(buf) - pos:
                (raw,) = take(f"<{length}s", "the dataset name")
                datasets = (raw.decode(errors="replace"),)
    return Imatrix(path, True, datasets, max(chunk_count, 0), 0, entries)


def check_fit(
    imatrix: Imatrix,
    shapes: Mapping[str, tuple[int, ...]],
    uses_importance: Collection[str],
    n_layers: int,
) -> set[str]:
    """Raise ImatrixError unless the imatrix was made for this model; warn about experts without data.

    shapes: every GGUF tensor written (numpy order); uses_importance: the tensors whose type takes
    importance weights; n_layers: main decoder blocks (blocks beyond are the MTP layer, which
    llama-imatrix does not run, so their entries may be missing or left over after `--no-mtp`).
    Returns the entries to use: those that match a written tensor in name and size.
    """
    path = imatrix.path
    usable = set()
    for name, entry in imatrix.entries.items():
        shape = shapes.get(name)
        if shape is None:
            block = block_index(name)
            if block is not None and block >= n_layers:
                continue  # the MTP layer, not written (--no-mtp)
            raise ImatrixError(f"{path}: entry {name} matches no tensor of this model (made for another model?)")
        n_per_row = shape[-1]
        n_mat = shape[0] if len(shape) == 3 else 1
        wrong_size = entry.nval != n_mat * n_per_row
        wrong_count = not imatrix.legacy and entry.counts.size != n_mat
        if wrong_size or wrong_count:
            got = f"{entry.nval} values" + ("" if imatrix.legacy else f" for {entry.counts.size} matrices")
            message = f"{path}: entry {name} has {got}; the tensor needs {n_per_row} per row × {n_mat} matrices"
            if name in LENIENT_TENSORS:
                log.warning("%s; quantizing it without importance, as llama-quantize does", message)
                continue
            raise ImatrixError(message + " (imatrix made for another model?)")
        if not np.all(np.isfinite(entry.sums)):
            raise ImatrixError(f"{path}: entry {name} holds NaN or Inf (llama-quantize refuses it too)")
        usable.add(name)
        empty = imatrix.experts_without_data(name, n_per_row) if name in uses_importance else []
        if empty:
            listed = ", ".join(map(str, empty[:32])) + (f", … ({len(empty)} in all)" if len(empty) > 32 else "")
            log.warning("%s: %s: no data for expert%s %s: neutral importance (1) used",
                        path.name, name, "s" if len(empty) > 1 else "", listed)
    missing = [n for n in uses_importance if n not in imatrix.entries]
    required = [n for n in missing if (b := block_index(n)) is not None and b < n_layers]
    if required:
        raise ImatrixError(
            f"{path}: no entry for {required[0]}" + (f" and {len(required) - 1} more tensors" if len(required) > 1 else "")
            + " (imatrix made for another model, or an incomplete run?)"
        )
    if missing:
        log.warning("%s: no entry for %s: quantized without importance, as llama-quantize does",
                    path.name, ", ".join(sorted(missing)))
    return usable


def uses_importance(qtype: "str | gguf.GGMLQuantizationType") -> bool:
    """Whether ggml's quantizer for this type looks at importance weights."""
    return (T[qtype] if isinstance(qtype, str) else qtype) not in IGNORES_IMATRIX
