"""Find and check every GGUF of a release before anything is uploaded, and record each file's sha256.

What makes a set complete and consistent is `rioquant.files.gguf_set.verify_set`; this module groups
a release folder's files into sets and hashes them. sha256 sums are cached in
`DIR/.rioquant-sha256.json` by (name, size, mtime), so a dry run followed by the real upload hashes a
200 GB release once.
"""

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

from rioquant.errors import PublishError
from rioquant.files.disk import write_atomic
from rioquant.files.gguf_set import GGUFSet, set_stem, verify_set
from rioquant.progress import progress_bar

log = logging.getLogger(__name__)

HASH_CACHE = ".rioquant-sha256.json"
HASH_CHUNK = 8 << 20


def find_sets(folder: Path) -> list[GGUFSet]:
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
    with progress_bar(progress and bool(todo), total=sum(st.st_size for _, _, st in todo), unit="B", unit_scale=True,
                      desc="sha256") as bar:
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
            write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
        except OSError as err:  # a read-only release folder: hash again next time
            log.warning("%s: cannot cache sha256 sums (%s)", cache_path, err.strerror)
    return out
