"""Stream tensor bytes into a (split) GGUF under a temporary name, resumable after any crash.

gguf-py's GGUFWriter lays out the header, metadata, tensor infos and shard split (keys `split.no`,
`split.count`, `split.tensors.count`); it expects every tensor in memory or spooled to a temp file,
so we let it write only the headers and append the data ourselves, tensor by tensor, with the same
alignment rule. Everything goes to a hidden work directory beside the output; a journal records each
completed tensor after its bytes are fsynced, so `resume` truncates to the last journaled byte and
continues, giving the same bytes as an uninterrupted run. Finished shards are renamed into place.
"""

import errno
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from rioquant.errors import OutputError, PlanError
from rioquant.export.qwen35moe import ARCH
from rioquant.files.gguf_file import align_up
from rioquant.files.gguf_writer import GGUFWriter

JOURNAL = "journal.jsonl"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: gguf.GGMLQuantizationType
    nbytes: int


@dataclass(frozen=True)
class SplitOptions:
    """How the output is split into shards (gguf-split's --split-max-size / --split-max-tensors; 0: no limit)."""

    max_size: int = 0
    max_tensors: int = 0


class DiskFullError(OutputError):
    """ENOSPC while writing; the partial output stays in the work directory for --resume."""


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class OutputFS:
    """The file-system calls whose failures the output handles (a full disk): the seam tests replace."""

    free_bytes: Callable[[Path], int] = _free_bytes  # free space on the file system holding a folder
    fsync: Callable[[int], None] = os.fsync


class ShardedGGUFOutput:
    """Writes tensors in plan order into one GGUF or a split set; see the module docstring."""

    def __init__(
        self,
        out_path: Path,
        tensors: Sequence[OutputTensor],
        add_metadata: Callable[[gguf.GGUFWriter], None],
        fingerprint: str,
        split: SplitOptions = SplitOptions(),
        resume: bool = False,
        force: bool = False,
        fs: OutputFS = OutputFS(),
        arch: str = ARCH,
    ) -> None:
        self.out_path = out_path
        self.fs = fs
        self.workdir = out_path.parent / f".{out_path.name}.partial"
        self.fingerprint = fingerprint
        writer = layout_writer(self.workdir / out_path.name, tensors, add_metadata, split, arch)
        self.alignment = writer.data_alignment
        self.shard_of: dict[str, int] = {n: i for i, shard in enumerate(writer.tensors) for n in shard}
        self.nbytes = {t.name: t.nbytes for t in tensors}
        self.work_files = writer.format_shard_names(self.workdir / out_path.name)
        self.final_files = [out_path.parent / p.name for p in self.work_files]
        existing = [p for p in self.final_files if p.exists()]
        if existing and not force:
            raise PlanError(f"{existing[0]}: output exists; pass --force to overwrite it")
        self.done: dict[str, int] = {}
        self.notes: dict[str, dict] = {}  # tensor → note() of write_tensor, restored on resume
        self.ends: list[int] = []
        if not (resume and self._load_journal()):
            self._start_fresh(writer)
        writer.close()
        self.handles = [open(p, "r+b") for p in self.work_files]
        for handle, end in zip(self.handles, self.ends, strict=True):
            handle.truncate(end)  # drop bytes written after the last journaled tensor
            handle.seek(end)
        self.journal = open(self.workdir / JOURNAL, "a")

    # -- set-up -------------------------------------------------------------------------------
    def _start_fresh(self, writer: gguf.GGUFWriter) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        self.ends = [f.tell() for f in writer.fout]
        writer.flush()
        for f in writer.fout:
            self.fs.fsync(f.fileno())
        with open(self.workdir / JOURNAL, "w") as journal:
            journal.write(json.dumps({"fingerprint": self.fingerprint, "header_ends": self.ends}) + "\n")
            journal.flush()
            self.fs.fsync(journal.fileno())

    def _load_journal(self) -> bool:
        """Restore progress; False when there is nothing compatible to resume from."""
        try:
            lines = (self.workdir / JOURNAL).read_text().splitlines()
            head = json.loads(lines[0])
        except (OSError, IndexError, json.JSONDecodeError):
            return False
        if head.get("fingerprint") != self.fingerprint or not all(p.exists() for p in self.work_files):
            return False
        self.ends = list(head["header_ends"])
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line: that tensor is redone
            self.done[record["tensor"]] = record["end"]
            if "note" in record:
                self.notes[record["tensor"]] = record["note"]
            self.ends[self.shard_of[record["tensor"]]] = record["end"]
        return True

    # -- writing --------------------------------------------------------------------------------
    def is_done(self, name: str) -> bool:
        return name in self.done

    def write_tensor(self, name: str, chunks: Iterator[np.ndarray], note: Callable[[], dict] | None = None) -> None:
        """Append one tensor from its byte chunks, pad, fsync, journal. Chunks come lazily.

        `note()`, called once the chunks are spent, gives a JSON-able record kept in the tensor's journal
        line (the converter's error figures), so a resumed run gets it back from `notes`.
        """
        handle = self.handles[self.shard_of[name]]
        try:
            handle.write(b"\0" * (align_up(handle.tell(), self.alignment) - handle.tell()))
            start = handle.tell()
            for chunk in chunks:
                handle.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            written = handle.tell() - start
            if written != self.nbytes[name]:
                raise AssertionError(f"tensor {name}: wrote {written} bytes, plan says {self.nbytes[name]}")
            handle.write(b"\0" * (align_up(written, self.alignment) - written))
            handle.flush()
            self.fs.fsync(handle.fileno())
            record = {"tensor": name, "end": handle.tell(), **({"note": note()} if note else {})}
            self.journal.write(json.dumps(record) + "\n")
            self.journal.flush()
            self.fs.fsync(self.journal.fileno())
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"{self.workdir}: disk full while writing tensor {name}; free space and rerun with --resume"
                ) from None
            raise
        self.done[name] = handle.tell()
        if note:
            self.notes[name] = record["note"]

    def finish(self) -> list[Path]:
        """Rename the complete shards into place and remove the work directory."""
        for handle in self.handles:
            handle.close()
        self.journal.close()
        missing = [n for n in self.shard_of if n not in self.done]
        if missing:
            raise AssertionError(f"finish() before tensor {missing[0]} was written")
        for work, final in zip(self.work_files, self.final_files, strict=True):
            os.replace(work, final)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.final_files

    def close(self) -> None:
        """Release file handles without finishing (the work directory stays for --resume)."""
        for handle in self.handles:
            handle.close()
        self.journal.close()


def expected_total_bytes(tensors: Sequence[OutputTensor], alignment: int = 32) -> int:
    """Tensor data bytes including alignment padding (headers add a few MB at most)."""
    return sum(align_up(t.nbytes, alignment) for t in tensors)


def layout_writer(
    path: Path, tensors: Sequence[OutputTensor], add_metadata: Callable[[gguf.GGUFWriter], None],
    split: SplitOptions = SplitOptions(), arch: str = ARCH,
) -> gguf.GGUFWriter:
    """A GGUFWriter holding the metadata and every tensor info, shards assigned; nothing written yet.
    `arch` is general.architecture: the text model's, or `clip` for the vision projector."""
    writer = GGUFWriter(path, arch, split_max_tensors=split.max_tensors, split_max_size=split.max_size)
    add_metadata(writer)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    return writer


def planned_file_sizes(
    tensors: Sequence[OutputTensor], add_metadata: Callable[[gguf.GGUFWriter], None],
    split: SplitOptions = SplitOptions(), arch: str = ARCH,
) -> list[int]:
    """The exact size of every file the output will have: header, metadata, tensor infos, aligned data.

    gguf-py lays the header out itself, into memory instead of a file (the same writer state machine
    ShardedGGUFOutput drives), so the split keys and per-shard tensor infos are counted as written.
    """
    writer = layout_writer(Path("plan.gguf"), tensors, add_metadata, split, arch)
    writer.fout = [io.BytesIO() for _ in writer.tensors]  # type: ignore[misc]
    writer.state = gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    sizes = []
    for fout, shard in zip(writer.fout, writer.tensors, strict=True):
        data = sum(align_up(ti.nbytes, writer.data_alignment) for ti in shard.values())
        sizes.append(align_up(fout.tell(), writer.data_alignment) + data)
    return sizes
