"""A GGUF model as one file or a split set, and the name ↔ shard-index rule, written once.

A split set is `{stem}-00001-of-0000N.gguf` … `-0000N-of-0000N.gguf` (the names gguf-py's writer and
llama.cpp's gguf-split give); the first shard holds the metadata, `split.no` is the 0-based shard
index, `split.count` the shard count, `split.tensors.count` the tensors of the whole set, each tensor
in exactly one shard. `open_set` loads a set from any one of its files (evaluation, inspection);
`verify_set` is the strict check before a release is uploaded: every shard present and agreeing with
its name and the others, and each file exactly as long as its header says. Anything else is the
partial download or conversion that users keep reporting as "invalid magic" or missing shards.
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from rioquant.errors import GGUFError, PublishError
from rioquant.files.gguf_file import GGUFHeader, TensorInfo, read_header

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_name(stem: str, no: int, count: int) -> str:
    """The file name of shard `no` (1-based) of a `count`-file set."""
    return f"{stem}-{no:05d}-of-{count:05d}.gguf"


def set_stem(path: Path) -> str:
    """'x-00002-of-00004.gguf' → 'x'; 'x.gguf' → 'x'."""
    match = SPLIT_NAME.match(path.name)
    return match["stem"] if match else path.name.removesuffix(".gguf")


def first_shard(path: Path) -> Path:
    """The file to load (Ollama's FROM, llama.cpp's -m): the first shard of a split set, or the file."""
    match = SPLIT_NAME.match(path.name)
    if not match or int(match["no"]) == 1:
        return path
    first = path.with_name(shard_name(match["stem"], 1, int(match["count"])))
    if not first.is_file():
        raise GGUFError(f"{first}: first shard of {path.name}'s split set is missing")
    return first


@dataclass(frozen=True)
class GGUFSet:
    """One GGUF model: a single file or every shard of a split set, in order, with their headers."""

    stem: str
    headers: tuple[GGUFHeader, ...]

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(h.path for h in self.headers)

    @property
    def path(self) -> Path:
        return self.headers[0].path

    @property
    def first(self) -> GGUFHeader:
        return self.headers[0]

    @property
    def meta(self) -> dict[str, object]:
        """The first shard's metadata (the others hold only the split keys)."""
        return self.headers[0].metadata

    def get(self, key: str, default: object = None) -> object:
        return self.meta.get(key, default)

    @functools.cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor of the set by name, each pointing at the shard that holds it."""
        return {t.name: t for h in self.headers for t in h.tensors}

    @property
    def size(self) -> int:
        return sum(h.file_size for h in self.headers)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for h in self.headers for t in h.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for h in self.headers for t in h.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / max(self.n_params, 1)

    @property
    def is_imatrix(self) -> bool:
        return self.meta.get("general.type") == "imatrix"

    @property
    def is_projector(self) -> bool:
        """A multimodal projector (mmproj): llama.cpp's `--mmproj` file, Ollama's projector layer."""
        return self.meta.get("general.type") == "mmproj"


def _read_in_file(path: Path) -> GGUFHeader:
    """A header whose tensors all end inside the file (a truncated file is refused before any read)."""
    if not path.is_file():
        raise GGUFError(f"{path}: file not found")
    header = read_header(path)
    for t in header.tensors:
        if t.data_start + t.nbytes > header.file_size:
            raise GGUFError(f"{path}: truncated: tensor {t.name} ends past the end of the file")
    return header


def open_set(path: Path) -> GGUFSet:
    """The model `path` belongs to: the file itself, or every shard of its split set (from any shard)."""
    path = Path(path)
    header = _read_in_file(path)
    count = int(header.metadata.get("split.count", 1))  # type: ignore[arg-type]
    if count <= 1:
        return GGUFSet(set_stem(path), (header,))
    match = SPLIT_NAME.match(path.name)
    if not match:
        raise GGUFError(f"{path}: split.count is {count} but the name is not STEM-0000i-of-0000N.gguf")
    files = [path.with_name(shard_name(match["stem"], i, count)) for i in range(1, count + 1)]
    return GGUFSet(match["stem"], tuple(header if f == path else _read_in_file(f) for f in files))


def check_layout(header: GGUFHeader) -> None:
    """Tensors back to back from the data start, and the file as long as the header says: up to the
    last tensor's end, plus at most its padding to the alignment (writers pad it; the format does not ask)."""
    align = header.alignment
    end = 0
    for t in header.tensors:
        if t.offset != (end + align - 1) // align * align:
            raise GGUFError(f"{header.path}: tensor {t.name} at data offset {t.offset}, expected "
                            f"{(end + align - 1) // align * align} (corrupt header)")
        end = t.offset + t.nbytes
    low, high = header.data_offset + end, header.data_offset + (end + align - 1) // align * align
    if not low <= header.file_size <= high:
        why = ("truncated: an incomplete download or conversion? fetch or convert it again"
               if header.file_size < low else "trailing bytes: a corrupt or concatenated file?")
        raise GGUFError(f"{header.path}: {header.file_size} bytes on disk, its header describes "
                        f"{high if header.file_size > high else low} ({why})")


def verify_set(stem: str, files: list[Path]) -> GGUFSet:
    """Read and check one single-file GGUF or one split set (files: every shard of `stem` found on disk)."""
    matches = [SPLIT_NAME.match(f.name) for f in files]
    if not any(matches):
        (path,) = files
        header = read_header(path)
        count = header.metadata.get("split.count", 1)
        if isinstance(count, int) and count > 1:
            raise GGUFError(f"{path}: shard {int(header.metadata.get('split.no', 0)) + 1} of a {count}-file split set "  # type: ignore[call-overload]
                            "(split.count) but not named as one; restore its -0000i-of-0000N name")
        check_layout(header)
        return GGUFSet(stem, (header,))
    if not all(matches):
        raise GGUFError(f"{files[0].parent}/{stem}.gguf: both a single file and split shards of that name "
                        f"({', '.join(sorted(f.name for f in files))}); keep one")
    counts = {int(m["count"]) for m in matches if m}
    if len(counts) != 1:
        raise GGUFError(f"{files[0].parent}/{stem}-*.gguf: shards name different shard counts "
                        f"({', '.join(sorted(f.name for f in files))})")
    count = counts.pop()
    by_no = {int(m["no"]): f for m, f in zip(matches, files, strict=True) if m}
    missing = [n for n in range(1, count + 1) if n not in by_no]
    if missing:
        name = shard_name(stem, missing[0], count)
        raise PublishError(f"{files[0].parent / name}: missing from the split set {stem} ({len(by_no)} of {count} "
                           "shards present); finish the download or conversion before publishing")
    extra = sorted(n for n in by_no if n > count)
    if extra:
        raise GGUFError(f"{by_no[extra[0]]}: shard number beyond the set's {count} shards")
    paths = [by_no[n] for n in range(1, count + 1)]
    headers = [read_header(p) for p in paths]
    seen: dict[str, Path] = {}
    for i, (path, header) in enumerate(zip(paths, headers, strict=True)):
        for key, want in (("split.no", i), ("split.count", count)):
            got = header.metadata.get(key)
            if got != want:
                raise GGUFError(f"{path}: {key} is {got}, expected {want} for shard {i + 1} of {count}")
        check_layout(header)
        for t in header.tensors:
            if t.name in seen:
                raise GGUFError(f"{path}: tensor {t.name} is also in {seen[t.name].name}")
            seen[t.name] = path
    declared = {h.metadata.get("split.tensors.count") for h in headers}
    if declared != {len(seen)}:
        raise GGUFError(f"{paths[0]}: split.tensors.count says {sorted(map(str, declared))}, "
                        f"the {count} shards hold {len(seen)} tensors")
    return GGUFSet(stem, tuple(headers))
