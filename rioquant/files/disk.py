"""Two disk idioms every writer and reader shares: replace a file only when its new content is
complete, and fill a buffer with positioned reads.

Why a temporary name: a reader (llama.cpp, the Hub upload, a later `--resume`) must see the old file
or the new one, never half of one; a crash leaves only a hidden `.NAME.tmp` beside it. Why positioned
reads (`os.preadv`) instead of `mmap`: mapped pages count against the process and grow with the
model; one read per tensor or expert slab keeps memory at what the caller asked for.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; when the block completes it is renamed onto `path`
    (atomic on one file system), when the block fails it is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8, newlines as given) to `path` through a temporary name, fsynced before the rename."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_at(fd: int, view: memoryview, offset: int) -> bool:
    """Fill the byte view from `offset` of the open file `fd`; False when the file ends first.

    preadv may return less than asked (Linux caps one call at 2 GiB), so it loops."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            return False
        done += n
    return True


def is_confined_name(name: str) -> bool:
    """Whether a file name taken from an untrusted listing (a safetensors index, a Hub repo's file list)
    stays inside the folder it is relative to: relative, no `..`, no drive, no backslash tricks.

    The name is judged, not the path it resolves to: a Hugging Face cache snapshot is a folder of
    symlinks into the cache's blob store, so resolving would refuse every honest download."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return (bool(name) and "\\" not in name and "\0" not in name and not posix.is_absolute()
            and not windows.drive and ".." not in posix.parts)
