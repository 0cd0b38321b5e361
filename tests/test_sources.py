"""Where the weights come from: untrusted index layouts, FP8 checkpoints, GGUF sources, the Hub."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, LlamaFileType
from safetensors.torch import load_file, save_file

from rioquant.convert import ConvertOptions, MetadataOptions, RunOptions, SplitOptions, convert, convert_many
from rioquant.errors import CheckpointError, PlanError
from rioquant.export.vocab import ASSERTED_PRE_KEY, LLAMA_CPP_PRE_TOKENIZERS, VOCAB_FILES, vocab_digest
from rioquant.files.gguf_file import read_header
from rioquant.testing.checkpoints import TINY, build_checkpoint
from rioquant.testing.fp8 import fp8_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.llama_quantize import llama_quantize
from rioquant.testing.llama_src import llama_cpp_source
from rioquant.testing.oracles import GgmlOracle, run_reference_converter
from tests.test_convert import assert_same_gguf
from tests.test_convert_reliability import run_cli


@pytest.fixture(scope="module")
def sharded(module_tmp) -> Path:
    return build_checkpoint(replace(TINY, shards=2), module_tmp("sharded") / "src")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- untrusted layouts -----------------------------------------------------------------------

@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused(sharded, tmp_path, capsys, escape):
    src = _copy(sharded, tmp_path / "src")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(src / "model-00001-of-00002.safetensors", outside)  # a valid shard: only the name is wrong
    name = str(outside) if escape == "ABSOLUTE" else escape
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: name if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out" / "m.gguf"
    code, err = run_cli(["convert", src, "-o", out, "--type", "F16", "--no-progress"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "outside" in lines[0] and repr(name) in lines[0], lines[0]
    assert not out.exists()


def test_snapshot_of_symlinks_into_a_blob_store_converts(sharded, tmp_path):
    """The Hub cache's layout: the snapshot's files are symlinks to blobs elsewhere; names are what count."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / sharded.name  # general.name comes from it
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / f"blob{i}")
    options, run = ConvertOptions(qtype="F16"), RunOptions(progress=False, report=False)
    (linked,) = convert(snapshot, tmp_path / "linked.gguf", options, run)
    (plain,) = convert(sharded, tmp_path / "plain.gguf", options, run)
    assert linked.read_bytes() == plain.read_bytes()


# -- tokenizers llama.cpp does not know by hash ----------------------------------------------

def test_pre_tokenizer_names_are_the_ones_llama_cpp_loads():
    source = (llama_cpp_source() / "src" / "llama-vocab.cpp").read_text()
    assert LLAMA_CPP_PRE_TOKENIZERS == set(re.findall(r'tokenizer_pre == "([^"]+)"', source))


def test_unrecognised_pre_tokenizer_is_refused_unless_asserted(sharded, tmp_path, caplog):
    """NFKC instead of NFC: the probe's full-width tilde normalises differently, so the hash is unknown."""
    src = _copy(sharded, tmp_path / "src")
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "NFKC"}
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    run = RunOptions(progress=False, report=False)
    with pytest.raises(CheckpointError, match="--pre-tokenizer NAME"):
        convert(src, tmp_path / "refused.gguf", ConvertOptions(qtype="F16"), run)
    with pytest.raises(PlanError, match="--pre-tokenizer 'qwen3.5'"):
        convert(src, tmp_path / "typo.gguf", ConvertOptions(qtype="F16", metadata=MetadataOptions(pre_tokenizer="qwen3.5")), run)
    with caplog.at_level(logging.WARNING):
        (out,) = convert(src, tmp_path / "asserted.gguf",
                         ConvertOptions(qtype="F16", metadata=MetadataOptions(pre_tokenizer="qwen35")), run)
    assert "asserted with --pre-tokenizer" in caplog.text
    meta = read_header(out).metadata
    assert meta["tokenizer.ggml.pre"] == "qwen35"
    assert meta[ASSERTED_PRE_KEY].startswith("qwen35: asserted with --pre-tokenizer") and "not recognised" in meta[ASSERTED_PRE_KEY]
    (plain,) = convert(sharded, tmp_path / "plain.gguf", ConvertOptions(qtype="F16"), run)
    assert ASSERTED_PRE_KEY not in read_header(plain).metadata


def test_vocabulary_is_kept_by_its_files_contents(sharded, tmp_path):
    """A process reads a vocabulary once for every checkpoint with the same vocabulary files; a change to
    any of them, or to a special token id in config.json, is another vocabulary; weights are not part of it."""
    src = _copy(sharded, tmp_path / "src")
    assert vocab_digest(src) == vocab_digest(sharded)
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config", config)
    text["rms_norm_eps"] = 0.5
    (src / "config.json").write_text(json.dumps(config))
    assert vocab_digest(src) == vocab_digest(sharded)
    text["eos_token_id"] = 7
    (src / "config.json").write_text(json.dumps(config))
    assert vocab_digest(src) != vocab_digest(sharded)
    for name in [n for n in VOCAB_FILES if (sharded / n).is_file()]:
        changed = _copy(sharded, tmp_path / name)
        (changed / name).write_bytes((changed / name).read_bytes() + b" ")
        assert vocab_digest(changed) != vocab_digest(sharded), name


# -- FP8 checkpoints -------------------------------------------------------------------------

FP8_BLOCK = (32, 48)  # Qwen's is 128×128; smaller here so tiny matrices span several blocks and cut the last


@pytest.fixture(scope="module")
def fp8(sharded, module_tmp) -> tuple[Path, Path]:
    """An FP8 checkpoint made from the BF16 one, and llama.cpp's F32 conversion of it."""
    root = module_tmp("fp8")
    src = fp8_checkpoint(sharded, root / "src", FP8_BLOCK)
    return src, run_reference_converter(src, root / "ref-f32.gguf", "f32")


@pytest.mark.slow
def test_fp8_f32_output_equals_reference_converter(fp8, tmp_path):
    src, ref = fp8
    (ours,) = convert(src, tmp_path / "f32.gguf", ConvertOptions(qtype="F32"), RunOptions(progress=False, report=False))
    assert_same_gguf(ours, ref)


def _expected_bytes(values: np.ndarray, qtype: GGMLQuantizationType, oracle: GgmlOracle) -> bytes:
    """What ggml makes of llama.cpp's float32 values: kept, rounded to float16, or quantized."""
    if qtype == GGMLQuantizationType.F32:
        return values.tobytes()
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16).tobytes()
    return oracle.quantize(values, qtype).tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_fp8_output_equals_ggml_on_reference_f32(fp8, tmp_path, qtype):
    src, ref_f32 = fp8
    (out,) = convert(src, tmp_path / f"{qtype}.gguf", ConvertOptions(qtype=qtype), RunOptions(progress=False, report=False))
    ref, oracle = scan(ref_f32).tensors, GgmlOracle()
    for name, t in scan(out).tensors.items():
        values = np.frombuffer(ref[name].data, np.float32).reshape(-1, t.shape[-1])
        assert t.data == _expected_bytes(values, t.qtype, oracle), f"{name} ({t.qtype.name})"


def _first_scale(src: Path) -> tuple[Path, str]:
    shard = sorted(src.glob("*.safetensors"))[0]
    return shard, next(n for n in load_file(str(shard)) if n.endswith("_scale_inv"))


def _drop_scale(src: Path) -> str:
    shard, name = _first_scale(src)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"has no {name}"


def _misshape_scale(src: Path) -> str:
    shard, name = _first_scale(src)
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][..., :1, :1].contiguous() if tensors[name].shape[-1] > 1 else tensors[name].repeat(1, 2)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return f"scale {name} has shape"


def _unknown_method(src: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (src / "config.json").write_text(json.dumps(config))
    return "quant_method 'awq'"


@pytest.mark.parametrize("damage", [_drop_scale, _misshape_scale, _unknown_method], ids=lambda f: f.__name__[1:])
def test_bad_fp8_layout_is_a_one_line_error(fp8, tmp_path, capsys, damage):
    src = _copy(fp8[0], tmp_path / "src")
    expected = damage(src)
    out = tmp_path / "out" / "m.gguf"
    code, err = run_cli(["convert", src, "-o", out, "--type", "Q8_0", "--no-progress"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not out.exists()


# -- a GGUF as the source --------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_gguf(module_tmp) -> Path:
    """llama.cpp's BF16 conversion of a tiny checkpoint with its MTP layer: what people publish."""
    root = module_tmp("gguf-source")
    src = build_checkpoint(replace(TINY, mtp=True), root / "src")
    return run_reference_converter(src, root / "model-BF16.gguf", "bf16")


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "Q2_K"])
def test_gguf_source_equals_llama_quantize(bf16_gguf, tmp_path, mix):
    """The whole file, header to last byte: keys copied in order, tensors in llama-quantize's order and shapes."""
    ref = llama_quantize(bf16_gguf, tmp_path / "llama.gguf", LlamaFileType[f"MOSTLY_{mix}"])
    (ours,) = convert(bf16_gguf, tmp_path / "ours.gguf", ConvertOptions(qtype=mix), RunOptions(progress=False, report=False))
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_split_gguf_source_equals_llama_quantize(bf16_gguf, tmp_path):
    """A split set is read from its first shard, as llama-quantize reads it; split keys are not carried."""
    shards = convert(bf16_gguf, tmp_path / "split" / "model-BF16.gguf", ConvertOptions(qtype="BF16", split=SplitOptions(max_tensors=30)),
                     RunOptions(progress=False, report=False))
    assert len(shards) > 1
    ref = llama_quantize(shards[0], tmp_path / "llama.gguf", LlamaFileType.MOSTLY_Q8_0)
    (ours,) = convert(shards[1], tmp_path / "ours.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False, report=False))
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_q8_0_gguf_source_warns_and_copies_q8_0_tensors(bf16_gguf, tmp_path, caplog):
    (q8,) = convert(bf16_gguf, tmp_path / "q8.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False, report=False))
    with caplog.at_level(logging.WARNING):
        (again,) = convert(q8, tmp_path / "again.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False, report=False))
    assert "quantized again" in caplog.text
    assert again.read_bytes() == q8.read_bytes()


def test_quantized_gguf_source_is_refused(bf16_gguf, tmp_path, capsys):
    q4 = llama_quantize(bf16_gguf, tmp_path / "q4.gguf", LlamaFileType.MOSTLY_Q4_0)
    code, err = run_cli(["convert", q4, "-o", tmp_path / "x.gguf", "--type", "Q4_0", "--no-progress"], capsys)
    assert code == 1 and "is Q4_0; a GGUF source must be F32, F16, BF16 or Q8_0" in err


@pytest.mark.slow
def test_copied_and_quantized_outputs_from_one_read(bf16_gguf, tmp_path):
    """Through the fanout: one output copies the Q8_0 source's tensors, the other quantizes them."""
    (q8,) = convert(bf16_gguf, tmp_path / "q8.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False, report=False))
    (q4,) = convert(q8, tmp_path / "q4.gguf", ConvertOptions(qtype="Q4_0"), RunOptions(progress=False, report=False))
    both = convert_many(q8, [(tmp_path / "both" / "q8.gguf", ConvertOptions(qtype="Q8_0")),
                             (tmp_path / "both" / "q4.gguf", ConvertOptions(qtype="Q4_0"))], RunOptions(progress=False))
    assert [files[0].read_bytes() for files in both] == [q8.read_bytes(), q4.read_bytes()]
