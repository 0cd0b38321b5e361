"""Check every GGUF of a release before anything is uploaded, and record each file's sha256.

A quant is one file or a split set `{stem}-00001-of-0000N.gguf` … `-0000N-of-0000N.gguf` (the names
gguf-py's writer and llama.cpp's gguf-split give). A set is accepted when every header reads, every
shard is present and agrees with its name and the others (`split.no` is the 0-based shard index,
`split.count` the shard count, `split.tensors.count` the tensors of the whole set, each tensor in
exactly one shard), and each file is exactly as long as its header says: data start + every tensor's
bytes padded to the alignment, with the tensors laid out back to back. Anything else is the partial
download or conversion that users keep reporting as "invalid magic" or missing shards.

sha256 sums are cached in `DIR/.rioquant-sha256.json` by (name, size, mtime), so a dry run followed by
the real upload hashes a 200 GB release once.
"""

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rioquant.errors import GGUFError, PublishError
from rioquant.export.gguf_header import GGUFHeader, read_header

log = logging.getLogger(__name__)

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
HASH_CACHE = ".rioquant-sha256.json"
HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class QuantSet:
    """One verified GGUF (single file or complete split set), shards in order."""

    stem: str
    files: tuple[Path, ...]
    headers: tuple[GGUFHeader, ...]

    @property
    def first(self) -> GGUFHeader:
        return self.headers[0]

    @property
    def meta(self) -> dict[str, object]:
        """The first shard's metadata (the others hold only the split keys)."""
        return self.headers[0].metadata

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


def set_stem(path: Path) -> str:
    """'x-00002-of-00004.gguf' → 'x'; 'x.gguf' → 'x'."""
    match = SPLIT_NAME.match(path.name)
    return match["stem"] if match else path.name.removesuffix(".gguf")


def first_shard(path: Path) -> Path:
    """The file to load (Ollama's FROM, llama.cpp's -m): the first shard of a split set, or the file."""
    match = SPLIT_NAME.match(path.name)
    if not match or int(match["no"]) == 1:
        return path
    first = path.with_name(f"{match['stem']}-00001-of-{match['count']}.gguf")
    if not first.is_file():
        raise GGUFError(f"{first}: first shard of {path.name}'s split set is missing")
    return first


def _check_layout(header: GGUFHeader) -> None:
    """Tensors back to back from the data start, and the file as long as the header says: up to the
    last tensor's end, plus at most its padding to the alignment (writers pad it; the format does not ask)."""
    align = int(header.metadata.get("general.alignment", 32))  # type: ignore[arg-type]
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


def verify_set(stem: str, files: list[Path]) -> QuantSet:
    """Read and check one single-file GGUF or one split set (files: every shard found on disk)."""
    matches = [SPLIT_NAME.match(f.name) for f in files]
    if not any(matches):
        (path,) = files
        header = read_header(path)
        count = header.metadata.get("split.count", 1)
        if isinstance(count, int) and count > 1:
            raise GGUFError(f"{path}: shard {int(header.metadata.get('split.no', 0)) + 1} of a {count}-file split set "
                            "(split.count) but not named as one; restore its -0000i-of-0000N name")
        _check_layout(header)
        return QuantSet(stem, (path,), (header,))
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
        name = f"{stem}-{missing[0]:05d}-of-{count:05d}.gguf"
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
        _check_layout(header)
        for t in header.tensors:
            if t.name in seen:
                raise GGUFError(f"{path}: tensor {t.name} is also in {seen[t.name].name}")
            seen[t.name] = path
    declared = {h.metadata.get("split.tensors.count") for h in headers}
    if declared != {len(seen)}:
        raise GGUFError(f"{paths[0]}: split.tensors.count says {sorted(map(str, declared))}, "
                        f"the {count} shards hold {len(seen)} tensors")
    return QuantSet(stem, tuple(paths), tuple(headers))


def find_sets(folder: Path) -> list[QuantSet]:
    """Every GGUF under `folder` (hidden folders, e.g. convert's `.NAME.partial`, skipped), verified."""
    if not folder.is_dir():
        raise PublishError(f"{folder}: not a directory")
    groups: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in sorted(folder.rglob("*.gguf")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        groups[(path.parent, set_stem(path))].append(path)
    if not groups:
        raise PublishError(f"{folder}: no .gguf files to publish")
    return [verify_set(stem, files) for (_, stem), files in sorted(groups.items())]


def sha256_files(folder: Path, paths: list[Path], progress: bool = True) -> dict[Path, str]:
    """sha256 of each file, cached by (path, size, mtime) in folder/.rioquant-sha256.json."""
    cache_path = folder / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    out: dict[Path, str] = {}
    todo = []
    for path in paths:
        st = path.stat()
        key = path.relative_to(folder).as_posix()
        hit = cache.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            out[path] = hit["sha256"]
        else:
            todo.append((path, key, st))
    with tqdm(total=sum(st.st_size for _, _, st in todo), unit="B", unit_scale=True, desc="sha256",
              disable=not progress or not todo, dynamic_ncols=True, mininterval=1.0) as bar:
        for path, key, st in todo:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    digest.update(chunk)
                    bar.update(len(chunk))
            out[path] = digest.hexdigest()
            cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": out[path]}
    if todo:
        try:
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, cache_path)
        except OSError as err:  # a read-only release folder: hash again next time
            log.warning("%s: cannot cache sha256 sums (%s)", cache_path, err.strerror)
    return out
