"""The llama.cpp source tree that the pinned llama-cpp-python vendors, fetched once and cached.

The reference converter (`convert_hf_to_gguf.py`, `conversion/qwen.py`), its own gguf-py (which,
unlike gguf 0.19.0 on PyPI, knows the qwen35moe NEXTN tensors) and the chat templates under
`models/templates/` ship only inside the llama-cpp-python sdist. A developer machine may have an
extracted copy lying around, a clean CI machine does not: `llama_cpp_source()` downloads the sdist
with the venv's own pip and extracts `vendor/llama.cpp` under `<repo>/.cache/` (git-ignored).

Failure raises `LlamaSourceError`: tests that need the tree fail loudly, they never skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # must match the llama-cpp-python pin in pyproject.toml
REPO_ROOT = Path(__file__).resolve().parents[2]  # rioquant/testing/llama_src.py → the checkout (editable install)
CACHE_DIR = REPO_ROOT / ".cache"
_SDIST_TOP = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"  # top folder inside the sdist tarball
_VENDOR = "vendor/llama.cpp"


class LlamaSourceError(RuntimeError):
    """The llama.cpp source tree could not be obtained."""


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Holds `.cache/NAME.lock`: the first use of a cache entry is built by one process while the others
    (pytest-xdist workers, a second shell) wait, then find it complete."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def llama_cpp_source() -> Path:
    """Path of the extracted `vendor/llama.cpp` tree, downloading the sdist on first use.

    Cached at `<repo>/.cache/llama-cpp-python-<version>/vendor/llama.cpp`. A lock file serialises
    concurrent first uses (two pytest processes, two engineers' shells); extraction goes to a
    temporary folder that is renamed into place, so a crash never leaves a half tree behind.
    """
    root = CACHE_DIR / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    src = root / _VENDOR
    if _is_complete(src):
        return src
    with cache_lock(root.name):
        if _is_complete(src):  # another process finished while we waited
            return src
        with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=f".{root.name}-") as tmp:
            tarball = _download_sdist(Path(tmp))
            staged = Path(tmp) / "staged"
            _extract_vendor_tree(tarball, staged)
            if root.exists():  # a stale, incomplete tree from an older layout
                shutil.rmtree(root)
            (staged / _SDIST_TOP).rename(root)
    if not _is_complete(src):
        raise LlamaSourceError(f"{src}: extracted sdist lacks convert_hf_to_gguf.py; delete {root}, retry")
    return src


def _is_complete(src: Path) -> bool:
    return (src / "convert_hf_to_gguf.py").is_file() and (src / "gguf-py" / "gguf").is_dir()


def _download_sdist(dest: Path) -> Path:
    """`pip download` the sdist (never a wheel: only the sdist carries the llama.cpp tree)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    tarballs = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not tarballs:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise LlamaSourceError(
            f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist with "
            f"`{' '.join(cmd)}` (exit {proc.returncode}): " + " | ".join(tail)
        )
    return tarballs[0]


def _extract_vendor_tree(tarball: Path, dest: Path) -> None:
    """Extract only `<top>/vendor/llama.cpp/` with tarfile's "data" filter (no links out, no devices)."""
    prefix = f"{_SDIST_TOP}/{_VENDOR}/"
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise LlamaSourceError(f"{tarball.name}: no {prefix} inside the sdist")
        tar.extractall(dest, members=members, filter="data")
