"""Splits, resume after kill -9, and every bad input: one-line error, exit ≠ 0, nothing under the final name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rioquant.cli import main
from rioquant.convert import ConvertHooks, ConvertOptions, RunOptions, SplitOptions, convert
from rioquant.errors import CheckpointError, PlanError
from rioquant.export.gguf_out import DiskFullError, OutputFS
from rioquant.testing.checkpoints import KQUANT, TINY, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.oracles import llama_logits
from tests.faults import fails_on_call

PROMPT = [248045, 846, 198, 9707, 11, 1246, 525, 498, 30]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(args: list, capsys) -> tuple[int, str]:
    """Run `rioquant ARGS` in-process through the real error formatting; (exit code, stderr)."""
    code, _, err = run_cli_output(args, capsys)
    return code, err


def run_cli_output(args: list, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny(module_tmp) -> Path:
    return build_checkpoint(replace(TINY, mtp=True, shards=3), module_tmp("tiny") / "src")


# -- splits ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_split_set_loads_from_first_shard_in_llama_cpp(tiny, tmp_path):
    (single,) = convert(tiny, tmp_path / "one" / "m.gguf", ConvertOptions(qtype="F16"), RunOptions(progress=False))
    shards = convert(tiny, tmp_path / "split" / "m.gguf", ConvertOptions(qtype="F16", split=SplitOptions(max_tensors=40)), RunOptions(progress=False))
    n = len(shards)
    assert n == 3
    assert [p.name for p in shards] == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    scanned = [scan(p) for p in shards]
    total = sum(len(s.tensors) for s in scanned)
    for i, s in enumerate(scanned):
        assert s.kv["split.no"] == (2, i.to_bytes(2, "little"))
        assert s.kv["split.count"] == (2, n.to_bytes(2, "little"))
        assert s.kv["split.tensors.count"] == (5, total.to_bytes(4, "little"))
    assert "tokenizer.ggml.tokens" in scanned[0].kv and "tokenizer.ggml.tokens" not in scanned[1].kv
    merged = {k: v for s in scanned for k, v in s.tensors.items()}
    assert merged == scan(single).tensors
    np.testing.assert_array_equal(llama_logits(shards[0], PROMPT), llama_logits(single, PROMPT))


def test_split_max_size_uses_decimal_units(tiny, tmp_path, capsys):
    code, err = run_cli(["convert", tiny, "-o", tmp_path / "m.gguf", "--type", "F16", "--split-max-size", "40M",
                         "--no-progress"], capsys)
    assert code == 0, err
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) >= 2
    assert all(p.stat().st_size < 40_000_000 + 2_000_000 for p in shards[1:])  # tensor data ≤ 40e6 (+ header)


# -- resume ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kquant(module_tmp) -> Path:
    return build_checkpoint(replace(KQUANT, num_experts=6), module_tmp("kq") / "src")


def _start_conversion(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rioquant", "convert", str(src), "-o", str(out), "--type", "Q2_K", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _journal_lines(out: Path) -> int:
    journal = out.parent / f".{out.name}.partial" / "journal.jsonl"
    try:
        return journal.read_text().count("\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_lines", [1, 6])
def test_resume_after_kill_9_is_byte_identical(kquant, tmp_path, kill_after_lines):
    (reference,) = convert(kquant, tmp_path / "ref" / "m.gguf", ConvertOptions(qtype="Q2_K"), RunOptions(progress=False))
    out = tmp_path / "run" / "m.gguf"
    out.parent.mkdir()
    proc = _start_conversion(kquant, out)
    deadline = time.monotonic() + 300
    while _journal_lines(out) < kill_after_lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed conversion left a file under the final name"
    (resumed,) = convert(kquant, out, ConvertOptions(qtype="Q2_K"), RunOptions(resume=True, progress=False))
    assert sha256(resumed) == sha256(reference)
    assert not (out.parent / f".{out.name}.partial").exists()


# -- bad input -----------------------------------------------------------------------------------

def _shards(src: Path) -> list[Path]:
    return sorted(src.glob("model-*.safetensors"))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _missing_shard(src: Path) -> str:
    shard = _shards(src)[1]
    shard.unlink()
    return shard.name


def _truncated_shard(src: Path) -> str:
    shard = _shards(src)[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return shard.name


def _corrupt_header(src: Path) -> str:
    shard = _shards(src)[2]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    return shard.name


def _unknown_model_type(src: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    return "model_type 'llama'"


def _listed_but_absent(src: Path) -> str:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.gate.extra_weight"] = _shards(src)[0].name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.layers.0.mlp.gate.extra_weight"


def _nan_in_tensor(src: Path, row: int = 3) -> str:
    for shard in _shards(src):
        tensors = load_file(str(shard))
        name = next((n for n in tensors if n.endswith("layers.1.linear_attn.out_proj.weight")), None)
        if name:
            tensors[name][row, 5] = float("nan")
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return name
    raise AssertionError("tensor not found")


def _shape_contradicts_config(src: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(config))
    return "config.json implies"


BAD_INPUTS = {
    "missing shard": _missing_shard,
    "truncated shard": _truncated_shard,
    "corrupt header": _corrupt_header,
    "unknown model_type": _unknown_model_type,
    "listed but absent": _listed_but_absent,
    "NaN in tensor": _nan_in_tensor,
    "shape contradicts config": _shape_contradicts_config,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_and_no_output(tiny, tmp_path, capsys, case):
    src = _copy(tiny, tmp_path / "src")
    expected = BAD_INPUTS[case](src)
    out = tmp_path / "out" / "m.gguf"
    code, err = run_cli(["convert", src, "-o", out, "--type", "Q8_0", "--no-progress"], capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not out.exists()


def test_bin_checkpoint_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    torch.save({"w": torch.zeros(1)}, src / "pytorch_model.bin")
    code, err = run_cli(["convert", src, "-o", tmp_path / "m.gguf"], capsys)
    assert code == 1 and "safetensors only" in err


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    code, err = run_cli(["convert", tiny, "-o", out, "--type", "F16", "--no-progress"], capsys)
    assert code == 1 and "--force" in err
    assert out.read_bytes() == b"precious"
    code, err = run_cli(["convert", tiny, "-o", out, "--type", "F16", "--no-progress", "--force"], capsys)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"GGUF"


def test_not_enough_disk_space_is_checked_up_front(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    full = ConvertHooks(fs=OutputFS(free_bytes=lambda path: 1_000_000))
    with pytest.raises(PlanError, match="GB needed") as err:
        convert(tiny, out, ConvertOptions(qtype="F16"), RunOptions(progress=False), full)
    assert str(tmp_path) in str(err.value)
    assert not out.exists() and not (tmp_path / ".m.gguf.partial").exists()


def test_disk_full_during_write_then_resume(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    full = OutputFS(fsync=fails_on_call(6, OSError(errno.ENOSPC, "No space left on device"), os.fsync))
    with pytest.raises(DiskFullError, match="disk full while writing tensor .*--resume"):
        convert(tiny, out, ConvertOptions(qtype="F16"), RunOptions(progress=False), ConvertHooks(fs=full))
    assert not out.exists()
    (resumed,) = convert(tiny, out, ConvertOptions(qtype="F16"), RunOptions(resume=True, progress=False))
    (fresh,) = convert(tiny, tmp_path / "fresh.gguf", ConvertOptions(qtype="F16"), RunOptions(progress=False))
    assert resumed.read_bytes() == fresh.read_bytes()


def test_inspect_reports_sizes(tiny, tmp_path, capsys):
    (out,) = convert(tiny, tmp_path / "m.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False))
    code, stdout, err = run_cli_output(["inspect", out, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    scanned = scan(out)
    assert report["tensors"] == len(scanned.tensors)
    assert report["bytes"] == sum(len(t.data) for t in scanned.tensors.values())
    assert report["by_type"]["Q8_0"]["tensors"] == sum(t.qtype.name == "Q8_0" for t in scanned.tensors.values())
    assert report["metadata"]["general.architecture"] == "qwen35moe"
    code, stdout, _ = run_cli_output(["inspect", out], capsys)
    assert code == 0 and "ffn_down_exps" in stdout and "Q8_0" in stdout


def test_matrices_are_quantized_in_row_pieces_with_the_same_bytes(tiny, tmp_path):
    """Large matrices are quantized (and measured) in row pieces so memory stays near one float32 copy of
    the largest tensor; pieces of 16 rows must give the file that whole matrices give, and a NaN is named
    by its row in the whole matrix."""
    (whole,) = convert(tiny, tmp_path / "whole.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False, report=False))
    sixteen_rows = ConvertHooks(row_block_bytes=4 * 64 * 16)
    (pieces,) = convert(tiny, tmp_path / "pieces.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False), sixteen_rows)
    assert pieces.read_bytes() == whole.read_bytes()

    src = _copy(tiny, tmp_path / "src")
    _nan_in_tensor(src, row=40)
    with pytest.raises(CheckpointError, match=r"out_proj\.weight: row 40 holds NaN or Inf"):
        convert(src, tmp_path / "nan.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False, report=False), sixteen_rows)
