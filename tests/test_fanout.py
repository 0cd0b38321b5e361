"""One read, many outputs (rioquant.fanout) and the overlapping stages under it (rioquant.pipeline)."""

import threading
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from rioquant.cli import cli
from rioquant.convert import ConvertHooks, ConvertOptions, RunOptions, convert, convert_many
from rioquant.pipeline import Stages, run_pipeline
from rioquant.testing.checkpoints import TINY, build_checkpoint
from tests.faults import fails_on_call

MIXES = ("Q4_K_M", "Q8_0", "Q3_K_S")
QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def tiny(module_tmp) -> Path:
    return build_checkpoint(replace(TINY, mtp=True), module_tmp("tiny") / "src")


@pytest.fixture(scope="module")
def singles(tiny, module_tmp) -> dict[str, Path]:
    """Each mix converted on its own: what every output of a shared run must equal, byte for byte."""
    root = module_tmp("singles")
    return {m: convert(tiny, root / f"{m}.gguf", ConvertOptions(qtype=m), QUIET)[0] for m in MIXES}


def _report(path: Path) -> bytes:
    return path.with_name(path.stem + ".report.json").read_bytes().replace(str(path.parent).encode(), b"")


def test_one_read_writes_every_mix_as_its_own_run(tiny, singles, tmp_path):
    outs = [(tmp_path / f"{m}.gguf", ConvertOptions(qtype=m)) for m in MIXES]
    written = convert_many(tiny, outs, QUIET, ConvertHooks(prefetch_bytes=1 << 16))
    for m, (files,) in zip(MIXES, written, strict=True):
        assert files.read_bytes() == singles[m].read_bytes(), m
        assert _report(files) == _report(singles[m]), m


def test_each_output_resumes_on_its_own(tiny, singles, tmp_path):
    """A shared run stopped midway leaves each output at its own tensor; resumed, each completes to the
    bytes and report of its single run (tensors some outputs already hold are quantized for the rest only)."""
    outs = [(tmp_path / f"{m}.gguf", ConvertOptions(qtype=m)) for m in MIXES[:2]]
    with pytest.raises(KeyboardInterrupt):
        convert_many(tiny, outs, QUIET, ConvertHooks(on_tensor=fails_on_call(9, KeyboardInterrupt())))
    convert_many(tiny, outs, replace(QUIET, resume=True))
    for m, (path, _) in zip(MIXES, outs, strict=False):
        assert path.read_bytes() == singles[m].read_bytes(), m
        assert _report(path) == _report(singles[m]), m


def test_cli_several_types_write_a_folder(tiny, singles, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(tiny), "-o", str(tmp_path), "--type", "Q4_K_M,Q8_0",
                                      "--no-progress", "--no-report"])
    assert result.exit_code == 0, result.output
    for m in MIXES[:2]:
        assert (tmp_path / f"{tiny.name}-{m}.gguf").read_bytes() == singles[m].read_bytes()


def test_pipeline_keeps_order_bounds_read_ahead_and_stops_on_error():
    held, peak, lock = [0], [0], threading.Lock()

    def read(i: int) -> int:
        with lock:
            held[0] += 10
            peak[0] = max(peak[0], held[0])
        return i

    def quantize(i: int, data: int) -> int:
        with lock:
            held[0] -= 10
        return data * 2

    written = []
    run_pipeline(range(50), Stages(read, quantize, lambda i, d: written.append((i, d)), lambda i: 10), prefetch_bytes=30)
    assert written == [(i, 2 * i) for i in range(50)]
    assert peak[0] <= 30

    def broken_write(i: int, d: int) -> None:
        if i == 5:
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        run_pipeline(range(10_000), Stages(lambda i: i, lambda i, d: d, broken_write, lambda i: 1), prefetch_bytes=4)
