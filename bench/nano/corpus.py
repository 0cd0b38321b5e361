"""The nano model's text: Python's standard library sources, split by file.

Why this text: it is on every machine that runs rioquant, its licence (PSF License 2.0) allows
training on it, and it mixes English (docstrings, comments) with code, so a small model learns a
lot in a few minutes. Files are assigned to a split by a hash of their relative path, so the
evaluation text never shares a file with the training or calibration text, and adding a file to a
newer Python moves no other file between splits.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Folders of the stdlib left out: installed third-party packages, and the test suites, whose huge
# generated data files (encodings tables, test vectors) are not the text a model should learn.
_SKIP_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_BUCKETS = 50  # split by hash(path) % 50: 1 bucket evaluation, 1 calibration, the rest training
_EVAL_BUCKET, _CALIBRATION_BUCKET = 0, 1
_MAX_FILE_BYTES = 200_000  # very large files are mostly generated tables


@dataclass(frozen=True)
class Corpus:
    train: str
    calibration: str
    evaluation: str
    digest: str  # sha256 of the three texts: names the corpus in the model's cache key and the report

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "calibration": len(self.calibration), "evaluation": len(self.evaluation)}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(relative: str) -> int:
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:4], "little") % _BUCKETS


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's .py files, sorted, without tests and installed packages."""
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIP_PARTS.intersection(relative.parts) or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        files.append(path)
    return files


def load_corpus(root: Path | None = None) -> Corpus:
    """Read the standard library under `root` (default: this Python's) into the three splits."""
    root = root or stdlib_root()
    parts: dict[int, list[str]] = {_EVAL_BUCKET: [], _CALIBRATION_BUCKET: [], -1: []}
    for path in stdlib_files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        bucket = _bucket(path.relative_to(root).as_posix())
        parts[bucket if bucket in (_EVAL_BUCKET, _CALIBRATION_BUCKET) else -1].append(text)
    train, calibration, evaluation = ("\n\n".join(parts[k]) for k in (-1, _CALIBRATION_BUCKET, _EVAL_BUCKET))
    digest = hashlib.sha256("\0".join((train, calibration, evaluation)).encode()).hexdigest()
    return Corpus(train, calibration, evaluation, digest)
