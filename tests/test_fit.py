"""`rioquant fit` and `plan`'s memory breakdown, checked against what llama.cpp itself allocates.

One tiny checkpoint (MTP included) converted to two mixes is loaded by llama.cpp (llama-cpp-python)
at several contexts, cache types and sequence counts; its exact accounting (llama_get_memory_breakdown)
and its logged buffer sizes are compared with the predictions of `plan` (from the checkpoint) and of
`fit` (from the GGUF): weights, KV cache and recurrent state to the byte, the compute buffer within 10 %.
The 397B's own shapes are checked the same way (slow): llama.cpp plans a header-only sparse GGUF with
`no_alloc`, reading no weights.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import click
import gguf
import pytest

from rioquant.cli import main
from rioquant.cli_options import parse_size
from rioquant.convert import ConvertOptions, RunOptions, build_plan, convert
from rioquant.fit import fit, plan_memory, quality_order
from rioquant.quant.memory import RunSettings
from rioquant.testing.checkpoints import TINY, build_checkpoint
from rioquant.testing.llama_memory import llama_buffers
from rioquant.testing.tokenizer import tokenizer_files

MIXES = ("Q8_0", "Q4_K_M")
SETTINGS = (
    RunSettings(ctx=256),
    RunSettings(ctx=1024),
    RunSettings(ctx=4096),
    RunSettings(ctx=1024, cache_type="q8_0"),
    RunSettings(ctx=4096, cache_type="q8_0", parallel=2),
    RunSettings(ctx=1000, parallel=3),  # n_ctx padded to 1024, then 342 → 512 cells per sequence
    RunSettings(ctx=2048, parallel=2, kv_unified=True),
)
MiB = 1024 * 1024
CONFIG_397B = Path(__file__).parent / "data" / "rio-3.5-open-397b" / "config.json"


@pytest.fixture(scope="module")
def measured(module_tmp):
    """{mix: (checkpoint, gguf, [llama.cpp's buffers per setting])} for the tiny model."""
    root = module_tmp("fit")
    ckpt = build_checkpoint(replace(TINY, head_dim=32, mtp=True), root / "tiny")  # q8_0 cache: heads of 32k
    runs = {}
    for mix in MIXES:
        (path,) = convert(ckpt, root / f"tiny-{mix}.gguf", ConvertOptions(qtype=mix), RunOptions(progress=False, report=False))
        runs[mix] = (ckpt, path, llama_buffers(path, SETTINGS))
    return runs


def _mib(n: int) -> float:
    return round(n / MiB, 2)


@pytest.mark.parametrize("mix", MIXES)
def test_prediction_equals_llama_cpps_buffers(measured, mix):
    ckpt, path, runs = measured[mix]
    from_gguf = fit(path, 10**12, SETTINGS[0])["source_file"]["breakdown"]["weights"]
    for settings, run in zip(SETTINGS, runs, strict=True):
        plan = plan_memory(build_plan(ckpt, ConvertOptions(qtype=mix)), settings)
        assert plan["weights"] == from_gguf == run.model, settings  # mapped bytes: MTP block left out
        assert plan["kv_cache"] + plan["recurrent"] == run.context, settings
        assert _mib(plan["kv_cache"]) == run.logged_mib["KV"], settings
        assert _mib(plan["recurrent"]) == run.logged_mib["RS"], settings
        assert _mib(plan["output"]) == run.logged_mib["output"], settings
        assert plan["compute"] == pytest.approx(run.compute, rel=0.10), settings


def test_every_mix_of_the_gguf_is_sized_like_its_plan(measured):
    """fit from a GGUF re-plans each mix from its tensors: the same file sizes as from the checkpoint."""
    ckpt, path, _ = measured["Q8_0"]
    from_gguf = {e["mix"]: e for e in fit(path, 10**12, RunSettings())["fits"]}
    from_ckpt = {e["mix"]: e for e in fit(ckpt, 10**12, RunSettings())["fits"]}
    assert from_gguf.keys() == from_ckpt.keys()
    for mix, e in from_ckpt.items():
        assert from_gguf[mix]["breakdown"]["weights"] == e["breakdown"]["weights"], mix
        assert abs(from_gguf[mix]["file_bytes"] - e["file_bytes"]) < 64, mix  # the header's file_type only
    assert from_gguf["Q8_0"]["file_bytes"] == path.stat().st_size


def test_fit_command_lists_what_fits_best_first(measured, capsys):
    ckpt, _, _ = measured["Q8_0"]
    everything = fit(ckpt, 10**12, RunSettings(ctx=1024))
    q8 = next(e for e in everything["fits"] if e["mix"] == "Q8_0")
    budget = q8["memory_bytes"]  # exactly Q8_0's need at -c 1024
    main(["fit", str(ckpt), str(budget), "--ctx", "1024", "--json"])
    result = json.loads(capsys.readouterr().out)
    fits = result["fits"]
    assert fits and all(e["memory_bytes"] <= budget and e["max_ctx"] >= 1024 for e in fits)
    assert {"mix", "file_bytes", "memory_bytes", "max_ctx"} <= fits[0].keys()
    assert "Q8_0" in [e["mix"] for e in fits] and all(e["memory_bytes"] > budget for e in result["too_big"])
    assert next(e for e in fits if e["mix"] == "Q8_0")["max_ctx"] == 1024  # 256 more cells would not fit
    assert [e["mix"] for e in fits][0] != "F32"
    main(["fit", str(ckpt), "1GiB", "--ctx", "1024"])
    text = capsys.readouterr().out
    assert "1.07 GB (1,073,741,824 bytes)" in text and "best:" in text


def test_plan_prints_the_breakdown(measured, capsys):
    ckpt, _, _ = measured["Q8_0"]
    main(["plan", str(ckpt), "--type", "Q4_K_M", "--ctx", "8192", "--cache-type", "q8_0"])
    text = capsys.readouterr().out
    assert "memory llama.cpp needs at -c 8192, q8_0 KV cache" in text
    assert all(label in text for label in ("weights", "KV cache", "recurrent state", "compute buffer", "total"))


def test_best_is_the_highest_quality():
    """A dynamic mix ranks just above the llama.cpp mix it stands in for; nothing ranks above 16 bits; a
    legacy mix comes after the others, though it has more bits."""
    from rioquant.fit import MixSize

    sizes = [MixSize("Q4_K_M", 100, 90, 4.85), MixSize("Q4_K_XL", 99, 89, 4.79), MixSize("Q5_K_S", 110, 100, 5.5),
             MixSize("F32", 400, 390, 32.0), MixSize("BF16", 200, 190, 16.0), MixSize("Q4_1", 105, 95, 5.01)]
    assert [s.mix for s in quality_order(sizes)] == ["BF16", "F32", "Q5_K_S", "Q4_K_XL", "Q4_K_M", "Q4_1"]


@pytest.mark.parametrize("text,value", [
    ("128G", 128 * 10**9), ("96GB", 96 * 10**9), ("64GiB", 64 * 2**30), ("1.5T", 15 * 10**11), ("512MiB", 2**29),
])
def test_memory_units(text, value):
    assert parse_size(text) == value
    with pytest.raises(click.BadParameter):
        parse_size("64Gb of RAM")


@pytest.mark.slow
def test_397b_shapes_against_llama_cpp(tmp_path):
    """The 397B's KV cache, recurrent state and compute buffer at long contexts, as llama.cpp plans them."""
    from rioquant.export.gguf_out import OutputTensor, layout_writer
    from rioquant.gguf_metadata import metadata_writer as _metadata_writer

    src = tmp_path / "Rio-3.5-Open-397B"
    src.mkdir()
    shutil.copyfile(CONFIG_397B, src / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tokenizer_files() / name, src / name)
    plan = build_plan(src, ConvertOptions(qtype="Q2_K"), weights_optional=True)
    path = tmp_path / "rio-397b-Q2_K.gguf"
    tensors = [OutputTensor(e.name, e.shape, gguf.GGMLQuantizationType[e.qtype], e.nbytes) for e in plan.entries]
    writer = layout_writer(path, tensors, _metadata_writer(plan))
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    header = writer.fout[0].tell()
    writer.close()
    os.truncate(path, -(-header // 32) * 32 + sum(-(-t.nbytes // 32) * 32 for t in tensors))  # a sparse hole

    settings = (RunSettings(ctx=32768), RunSettings(ctx=262144), RunSettings(ctx=131072, cache_type="q8_0", parallel=4),
                RunSettings(ctx=256))
    for s, run in zip(settings, llama_buffers(path, settings, no_alloc=True), strict=True):
        predicted = plan_memory(plan, s)
        assert predicted["kv_cache"] + predicted["recurrent"] == run.context, s
        assert predicted["compute"] == pytest.approx(run.compute, rel=0.10), s
