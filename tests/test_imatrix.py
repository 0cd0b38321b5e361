"""imatrix: reading llama.cpp's GGUF and legacy .dat files, fitting them to the model, and quantizing
with them, against llama-quantize's documented arithmetic and ggml's own quantizers.

Files are written here as llama-imatrix writes them (rioquant/testing/imatrix_files.py, gguf-py's GGUFWriter for
the GGUF form), including experts that no token reached (count 0).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.errors import ImatrixError
from rioquant.quant.imatrix import check_fit, read_imatrix
from rioquant.testing.checkpoints import KQUANT, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.imatrix_files import (
    RawEntry,
    dat_importance,
    gguf_importance,
    random_entries,
    write_dat_imatrix,
    write_gguf_imatrix,
)
from rioquant.testing.oracles import GgmlOracle, run_reference_converter

T = GGMLQuantizationType

# A miniature model: two blocks and an MTP block (2), 4 experts, rows of 64
SHAPES = {
    "token_embd.weight": (300, 64),
    "blk.0.attn_qkv.weight": (192, 64),
    "blk.0.ffn_gate_inp.weight": (4, 64),
    "blk.0.ffn_down_exps.weight": (4, 64, 32),
    "blk.0.ffn_up_exps.weight": (4, 32, 64),
    "blk.1.attn_q.weight": (128, 64),
    "blk.1.ffn_down_exps.weight": (4, 64, 32),
    "blk.2.nextn.eh_proj.weight": (64, 128),
}
USES = {n for n in SHAPES if "gate_inp" not in n}  # the router stays F32
MEASURED = {n: s for n, s in SHAPES.items() if n.startswith("blk.") and int(n.split(".")[1]) < 2}
ZERO = {"blk.0.ffn_down_exps.weight": [1, 3], "blk.1.ffn_down_exps.weight": [2]}


@pytest.fixture
def entries() -> dict[str, RawEntry]:
    return random_entries(MEASURED, seed=1, zero_counts=ZERO)


def test_gguf_importance_is_in_sum2_over_counts_per_expert(tmp_path, entries):
    path = write_gguf_imatrix(tmp_path / "imatrix.gguf", entries, ["calib.txt", "more.txt"], chunk_count=42)
    imatrix = read_imatrix(path)
    assert (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size, imatrix.legacy) == (("calib.txt", "more.txt"), 42, 512, False)
    for name, raw in entries.items():
        expected = gguf_importance(raw)  # (n_mat, n_per_row)
        n_per_row = SHAPES[name][-1]
        for e in range(expected.shape[0]):
            got = imatrix.importance(name, n_per_row, e if len(SHAPES[name]) == 3 else None)
            assert got.dtype == np.float32 and got.tobytes() == expected[e].tobytes(), f"{name} expert {e}"
    assert imatrix.experts_without_data("blk.0.ffn_down_exps.weight", 32) == [1, 3]
    assert imatrix.importance("token_embd.weight", 64) is None


def test_dat_importance_is_values_over_ncall(tmp_path, entries):
    path = write_dat_imatrix(tmp_path / "imatrix.dat", entries, "calib.txt", chunk_count=7)
    imatrix = read_imatrix(path)
    assert (imatrix.datasets, imatrix.chunk_count, imatrix.legacy) == (("calib.txt",), 7, True)
    for name, flat in dat_importance(path).items():
        n_per_row = SHAPES[name][-1]
        got = np.concatenate([imatrix.importance(name, n_per_row, e) for e in range(flat.size // n_per_row)])
        assert got.tobytes() == flat.tobytes(), name
    # llama-imatrix stores 1·ncall for experts without data: they read back as neutral weights 1
    assert imatrix.experts_without_data("blk.0.ffn_down_exps.weight", 32) == [1, 3]
    np.testing.assert_array_equal(imatrix.importance("blk.0.ffn_down_exps.weight", 32, 3), np.ones(32, np.float32))


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_fit_warns_naming_experts_without_data(tmp_path, entries, caplog, fmt):
    path = (write_gguf_imatrix(tmp_path / "i.gguf", entries, ["c"], 3) if fmt == "gguf"
            else write_dat_imatrix(tmp_path / "i.dat", entries, "c", 3))
    with caplog.at_level(logging.WARNING):
        usable = check_fit(read_imatrix(path), SHAPES, USES, n_layers=2)
    assert usable == set(MEASURED)
    text = caplog.text
    assert "blk.0.ffn_down_exps.weight: no data for experts 1, 3" in text
    assert "blk.1.ffn_down_exps.weight: no data for expert 2" in text
    # the MTP block and the token embedding are never measured by llama-imatrix: a warning, not an error
    assert "no entry for blk.2.nextn.eh_proj.weight, token_embd.weight" in text


def _fit(tmp_path, entries, shapes=SHAPES, uses=USES, n_layers=2):
    return check_fit(read_imatrix(write_gguf_imatrix(tmp_path / "i.gguf", entries, ["c"], 3)), shapes, uses, n_layers)


def test_entry_of_another_model_is_an_error(tmp_path, entries):
    entries["blk.0.ffn_gate_exps.weight"] = entries["blk.0.ffn_up_exps.weight"]
    with pytest.raises(ImatrixError, match=r"i\.gguf: entry blk\.0\.ffn_gate_exps\.weight matches no tensor"):
        _fit(tmp_path, entries)


def test_wrong_row_length_is_an_error(tmp_path, entries):
    raw = entries["blk.1.attn_q.weight"]
    entries["blk.1.attn_q.weight"] = RawEntry(raw.sums[:, :32], raw.counts)
    with pytest.raises(ImatrixError, match=r"entry blk\.1\.attn_q\.weight has 32 values for 1 matrices; .*64 per row × 1"):
        _fit(tmp_path, entries)


def test_wrong_expert_count_is_an_error(tmp_path, entries):
    raw = entries["blk.0.ffn_down_exps.weight"]
    entries["blk.0.ffn_down_exps.weight"] = RawEntry(raw.sums[:3], raw.counts[:3])
    with pytest.raises(ImatrixError, match=r"ffn_down_exps\.weight has 96 values for 3 matrices; .*× 4 matrices"):
        _fit(tmp_path, entries)


def test_missing_entry_of_a_decoder_block_is_an_error(tmp_path, entries):
    del entries["blk.1.attn_q.weight"]
    with pytest.raises(ImatrixError, match=r"i\.gguf: no entry for blk\.1\.attn_q\.weight"):
        _fit(tmp_path, entries)


def test_leftover_mtp_entries_are_ignored_without_mtp(tmp_path, entries):
    entries["blk.2.nextn.eh_proj.weight"] = random_entries({"x": (64, 128)})["x"]
    shapes = {n: s for n, s in SHAPES.items() if "nextn" not in n}
    assert "blk.2.nextn.eh_proj.weight" not in _fit(tmp_path, entries, shapes, USES & set(shapes))


def test_wrongly_sized_token_embd_entry_is_skipped_like_llama_quantize(tmp_path, entries, caplog):
    entries["token_embd.weight"] = random_entries({"x": (300, 32)})["x"]
    with caplog.at_level(logging.WARNING):
        assert "token_embd.weight" not in _fit(tmp_path, entries)
    assert "token_embd.weight has 32 values" in caplog.text


def test_non_finite_values_are_an_error(tmp_path, entries):
    entries["blk.1.attn_q.weight"].sums[0, 5] = np.inf
    with pytest.raises(ImatrixError, match=r"blk\.1\.attn_q\.weight holds NaN or Inf"):
        _fit(tmp_path, entries)


def test_a_model_gguf_is_not_an_imatrix(tmp_path):
    writer = GGUFWriter(tmp_path / "model.gguf", "qwen35moe")
    writer.add_type("model")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ImatrixError, match=r"model\.gguf: general\.type is 'model', not 'imatrix'"):
        read_imatrix(tmp_path / "model.gguf")


def test_gguf_without_imatrix_metadata_is_refused(tmp_path, entries):
    writer = GGUFWriter(tmp_path / "bare.gguf", "imatrix")
    writer.add_type("imatrix")
    writer.add_tensor("blk.1.attn_q.weight.in_sum2", entries["blk.1.attn_q.weight"].sums)
    writer.add_tensor("blk.1.attn_q.weight.counts", np.ones((1, 1), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ImatrixError, match=r"bare\.gguf: imatrix metadata imatrix\.datasets, .* missing"):
        read_imatrix(tmp_path / "bare.gguf")


def test_truncated_dat_is_an_error(tmp_path, entries):
    path = write_dat_imatrix(tmp_path / "i.dat", entries, "calib.txt", 3)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImatrixError, match=r"i\.dat: truncated legacy imatrix"):
        read_imatrix(path)
    (tmp_path / "junk.dat").write_bytes(struct.pack("<i", -5) + b"junk")
    with pytest.raises(ImatrixError, match="neither a GGUF imatrix nor a legacy"):
        read_imatrix(tmp_path / "junk.dat")
    with pytest.raises(ImatrixError, match="cannot read imatrix"):
        read_imatrix(tmp_path / "absent.gguf")


# ---------------------------------------------------------------------------------------------
# End to end: rioquant convert --imatrix against ggml on llama.cpp's own F32 conversion


def imatrix_shapes(ref: dict) -> dict[str, tuple[int, ...]]:
    """What llama-imatrix measures on this model: the matmul weights of the decoder blocks (not the
    MTP block, not the token embedding, not `output` unless asked, not the conv)."""
    return {
        name: t.shape for name, t in ref.items()
        if name.startswith("blk.") and int(name.split(".")[1]) < KQUANT.num_hidden_layers
        and name.endswith(".weight") and len(t.shape) >= 2 and "ssm_conv1d" not in name
    }


@pytest.fixture(scope="module")
def kquant(module_tmp) -> tuple[Path, Path]:
    root = module_tmp("kquant-imatrix")
    src = build_checkpoint(replace(KQUANT, mtp=True, num_experts=6), root / "src")
    return src, run_reference_converter(src, root / "ref-f32.gguf", "f32")


@pytest.mark.slow
@pytest.mark.parametrize("fmt,qtype", [("gguf", "Q4_K"), ("dat", "Q3_K")])
def test_imatrix_quantized_tensors_equal_ggml(kquant, tmp_path, fmt, qtype):
    """Each tensor (each expert slab) = ggml_quantize_chunk(llama.cpp's F32, that slab's importance)."""
    src, ref_f32 = kquant
    ref = scan(ref_f32).tensors
    shapes = imatrix_shapes(ref)
    zero = {"blk.0.ffn_down_exps.weight": [2], "blk.3.ffn_gate_exps.weight": [0, 5]}
    entries = random_entries(shapes, seed=3, zero_counts=zero)
    if fmt == "gguf":
        path = write_gguf_imatrix(tmp_path / "imatrix.gguf", entries, ["wiki.train.raw"], chunk_count=12)
        importance = {n: gguf_importance(e) for n, e in entries.items()}  # (n_mat, n_per_row)
    else:
        path = write_dat_imatrix(tmp_path / "imatrix.dat", entries, "wiki.train.raw", chunk_count=12)
        importance = {n: v.reshape(-1, shapes[n][-1]) for n, v in dat_importance(path).items()}

    (out,) = convert(src, tmp_path / f"{qtype}.gguf", ConvertOptions(qtype=qtype, imatrix=path), RunOptions(progress=False))
    oracle = GgmlOracle()
    written = scan(out)
    checked_with_importance = 0
    for name, t in written.tensors.items():
        values = np.frombuffer(ref[name].data, np.float32).reshape(t.shape)
        if t.qtype in (T.F32, T.F16):
            continue  # unchanged by an imatrix; test_convert covers them
        slabs = values if len(t.shape) == 3 else values[None]  # (n_mat, rows, n_per_row)
        for e, slab in enumerate(slabs):
            qw = importance[name][e] if name in importance else None
            expected = oracle.quantize(slab.reshape(-1, t.shape[-1]), t.qtype, qw).tobytes()
            size = len(expected)
            assert t.data[e * size : (e + 1) * size] == expected, f"{name} expert {e} ({t.qtype.name}, imatrix {qw is not None})"
            checked_with_importance += qw is not None
    assert checked_with_importance > 40

    def kv(key: str):
        vtype, raw = written.kv[key]
        return vtype, (raw[8:].decode() if vtype == 8 else struct.unpack("<I", raw)[0])

    assert kv("quantize.imatrix.file") == (8, str(path))
    assert kv("quantize.imatrix.dataset") == (8, "wiki.train.raw")
    assert kv("quantize.imatrix.entries_count") == (4, len(entries))  # u32, as llama-quantize writes
    assert kv("quantize.imatrix.chunks_count") == (4, 12)
