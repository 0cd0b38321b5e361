"""Per-tensor / per-expert error report, checked against a direct computation: llama.cpp's own F32
conversion of the checkpoint (the weights), gguf-py's `gguf.quants.dequantize` of the bytes written,
and the metrics recomputed here in plain numpy float64.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rioquant.cli import main
from rioquant.convert import ConvertHooks, ConvertOptions, RunOptions, SplitOptions, convert
from rioquant.errors import NonFiniteRowError
from rioquant.quant import quantize
from rioquant.quant.metrics import OUTLIER_FACTOR, TensorErrorTracker, figures, measure_slice, quantize_slice
from rioquant.testing.checkpoints import KQUANT, TINY, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.imatrix_files import gguf_importance, random_entries, write_gguf_imatrix
from rioquant.testing.oracles import run_reference_converter
from tests.faults import fails_on_call

T = gguf.GGMLQuantizationType
DEAD = ("model.layers.1.mlp.experts.2.down_proj.weight", "blk.1.ffn_down_exps.weight", 2)
# 1e-9-scaled weights: their fp16 block scales underflow to 0, every weight quantizes to 0
TINY_SCALE = ("model.layers.2.mlp.experts.4.gate_proj.weight", "blk.2.ffn_gate_exps.weight", 4)
UNROUTED = ("blk.0.ffn_up_exps.weight", 1)  # count 0 in the imatrix
FIGURES = ("rel_rmse", "imatrix_se", "imatrix_rel_rmse", "max_abs_err", "cosine")


def expected_figures(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict:
    """The report's definitions (rioquant.quant.metrics docstring), in numpy float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)  # (rows, n)
    e = y - x
    sx2, sy2, se2 = (x * x).sum(), (y * y).sum(), (e * e).sum()
    out = {
        "rel_rmse": math.sqrt(se2 / sx2) if sx2 > 0 else (0.0 if se2 == 0 else None),
        "max_abs_err": float(np.abs(e).max()),
        "cosine": (x * y).sum() / math.sqrt(sx2 * sy2) if sx2 > 0 and sy2 > 0 else (1.0 if sx2 == sy2 == 0 else 0.0),
        "imatrix_se": None, "imatrix_rel_rmse": None,
    }
    if w is not None:
        swe2, swx2 = (w * e * e).sum(), (w * x * x).sum()
        out["imatrix_se"] = swe2 / x.shape[0]
        out["imatrix_rel_rmse"] = math.sqrt(swe2 / swx2) if swx2 > 0 else (0.0 if swe2 == 0 else None)
    return out


def assert_figures(got: dict, want: dict, where: str) -> None:
    for key in FIGURES:
        if want[key] is None:
            assert got[key] is None, f"{where} {key}: {got[key]} (expected no figure)"
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-7, abs=1e-30), f"{where} {key}"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q6_K", "Q5_0", "F16", "BF16"])
def test_tracker_equals_numpy_on_gguf_dequantize(qtype):
    rng = np.random.default_rng(7)
    slabs = rng.standard_normal((5, 24, 256)).astype(np.float32)  # (experts, rows, n)
    slabs[1] = 0  # a dead expert
    slabs[3] *= np.float32(1e-9)  # fp16 block scales underflow: everything quantizes to 0
    w = rng.gamma(0.5, 2.0, (5, 256)).astype(np.float32)
    tracker = TensorErrorTracker("blk.0.ffn_up_exps.weight", qtype, slabs.shape, 0)
    expected = []
    for e, slab in enumerate(slabs):
        data = quantize(slab, qtype, imatrix=w[e])
        tracker.add(slab, data, w[e], no_imatrix_data=e == 4)
        y = gguf.quants.dequantize(data, T[qtype]).reshape(slab.shape)
        expected.append(expected_figures(slab, y, None if e == 4 else w[e]))
    record = tracker.result()
    for e, x in enumerate(record["experts"]):
        assert_figures(x, expected[e], f"{qtype} expert {e}")
    assert "dead" in record["experts"][1]["flags"] and "no_imatrix_data" in record["experts"][4]["flags"]
    outliers = [x["expert"] for x in record["experts"] if "outlier" in x["flags"]]
    assert outliers == ([] if qtype == "BF16" else [3]), outliers  # BF16 keeps float32's exponent range
    assert record["bpw"] == 8 * gguf.GGML_QUANT_SIZES[T[qtype]][1] / gguf.GGML_QUANT_SIZES[T[qtype]][0]


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_float_types_are_measured_in_row_chunks(qtype):
    x = np.random.default_rng(2).standard_normal((50, 256)).astype(np.float32)
    # 3 rows of 256 per piece, a ragged last one
    tracker = TensorErrorTracker("blk.0.attn_q.weight", qtype, x.shape, 0, chunk_weights=1000)
    data = quantize(x, qtype)
    tracker.add(x, data)
    y = gguf.quants.dequantize(data, T[qtype]).reshape(x.shape)
    assert_figures(tracker.result(), expected_figures(x, y, None), qtype)


@pytest.mark.parametrize(("qtype", "n"), [("Q4_K", 256), ("Q8_0", 96), ("IQ4_NL", 160), ("F16", 40)])
def test_measured_in_the_quantize_pass_as_afterwards(qtype, n):
    """The conversion's path (each row summed as it is quantized) gives the bytes of `quantize` and the
    sums of measuring them afterwards, bit for bit; rows of 96, 160 and 40 end in a partial lane group."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, n)).astype(np.float32)
    w = rng.gamma(0.5, 2.0, n).astype(np.float32)
    for no_data in (False, True):
        data, measured = quantize_slice(x, qtype, w, no_imatrix_data=no_data)
        assert np.array_equal(data, quantize(x, qtype, imatrix=w))
        later = measure_slice(x, data, qtype, w, no_imatrix_data=no_data)
        assert np.array_equal(measured.sums, later.sums) and measured[1:] == later[1:]
        y = gguf.quants.dequantize(data, T[qtype]).reshape(x.shape)
        assert_figures(figures(measured.sums, 40, x.size, not no_data), expected_figures(x, y, None if no_data else w),
                       qtype)
    x[7, 3] = np.inf
    with pytest.raises(NonFiniteRowError) as err:
        quantize_slice(x, qtype, w)
    assert err.value.row == 7


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def converted(module_tmp) -> dict:
    """A KQUANT checkpoint with a dead and a tiny-scaled expert, llama.cpp's F32 conversion of it, an
    imatrix with an unrouted expert, and rioquant's Q4_K split conversion with its report."""
    root = module_tmp("report")
    src = build_checkpoint(replace(KQUANT, mtp=True, num_experts=6), root / "src")
    weights = load_file(src / "model.safetensors")
    weights[DEAD[0]] = torch.zeros_like(weights[DEAD[0]])
    weights[TINY_SCALE[0]] = (weights[TINY_SCALE[0]].float() * 1e-9).to(torch.bfloat16)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    ref = scan(run_reference_converter(src, root / "ref-f32.gguf", "f32")).tensors
    shapes = {n: t.shape for n, t in ref.items() if n.startswith("blk.") and int(n.split(".")[1]) < 4
              and len(t.shape) >= 2 and "ssm_conv1d" not in n}
    entries = random_entries(shapes, seed=5, zero_counts={UNROUTED[0]: [UNROUTED[1]]})
    imatrix = write_gguf_imatrix(root / "imatrix.gguf", entries, ["calib.txt"], chunk_count=9)
    options = ConvertOptions(qtype="Q4_K", imatrix=imatrix, split=SplitOptions(max_tensors=60))
    files = convert(src, root / "out" / "q4.gguf", options, RunOptions(progress=False))
    return {"src": src, "ref": ref, "entries": entries, "options": options, "files": files, "root": root}


@pytest.mark.slow
def test_report_equals_direct_computation_from_written_file(converted):
    files, ref, entries = converted["files"], converted["ref"], converted["entries"]
    assert len(files) > 1
    out_dir = files[0].parent
    report = json.loads((out_dir / "q4.report.json").read_text())  # named after the stem, not a shard
    written = {n: t for f in files for n, t in scan(f).tensors.items()}
    measured = {n for n, t in written.items() if t.qtype != T.F32}
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name.keys() == measured
    for name, t in written.items():
        if name not in measured:
            continue
        rec = by_name[name]
        assert (rec["qtype"], tuple(rec["shape"])) == (t.qtype.name, t.shape)
        x = np.frombuffer(ref[name].data, np.float32).reshape(t.shape)
        y = gguf.quants.dequantize(np.frombuffer(t.data, np.uint8), t.qtype).reshape(t.shape)
        w = gguf_importance(entries[name]) if name in entries else None  # (n_mat, n_per_row)
        if len(t.shape) == 2:
            assert_figures(rec, expected_figures(x, y, None if w is None else w[0]), name)
            continue
        live = [e for e in range(t.shape[0]) if w is None or entries[name].counts[e] > 0]
        for e, xe in enumerate(rec["experts"]):
            assert_figures(xe, expected_figures(x[e], y[e], w[e] if e in live and w is not None else None), f"{name}[{e}]")
        whole = expected_figures(x.reshape(-1, t.shape[-1]), y.reshape(-1, t.shape[-1]), None)
        for key in ("rel_rmse", "max_abs_err", "cosine"):
            assert rec[key] == pytest.approx(whole[key], rel=1e-7), f"{name} {key}"
        if w is not None:  # tensor-level imatrix figures: the experts the imatrix saw
            xs, es = x[live].astype(np.float64), (y[live].astype(np.float64) - x[live])
            swe2 = (w[live][:, None, :] * es * es).sum()
            assert rec["imatrix_rel_rmse"] == pytest.approx(math.sqrt(swe2 / (w[live][:, None, :] * xs * xs).sum()), rel=1e-7)
            assert rec["imatrix_se"] == pytest.approx(swe2 / (len(live) * t.shape[1]), rel=1e-7)

    def flags(tensor: str, expert: int) -> list[str]:
        return by_name[tensor]["experts"][expert]["flags"]

    assert "dead" in flags(*DEAD[1:])
    assert "outlier" in flags(*TINY_SCALE[1:]) and by_name[TINY_SCALE[1]]["experts"][TINY_SCALE[2]]["rel_rmse"] == 1.0
    assert "no_imatrix_data" in flags(*UNROUTED)
    flagged = {(t["name"], x["expert"], f) for t in report["tensors"] for x in t.get("experts", ()) for f in x["flags"]}
    assert flagged == {(DEAD[1], DEAD[2], "dead"), (TINY_SCALE[1], TINY_SCALE[2], "outlier"), (*UNROUTED, "no_imatrix_data")}
    assert report["imatrix"] == {"file": str(converted["options"].imatrix), "dataset": "calib.txt",
                                 "entries_count": len(entries), "chunks_count": 9}
    assert report["outlier_factor"] == OUTLIER_FACTOR

    rows = list(csv.DictReader((out_dir / "q4.report.csv").open()))
    assert len(rows) == len(report["tensors"]) + sum(len(t.get("experts", ())) for t in report["tensors"])
    row = next(r for r in rows if r["tensor"] == DEAD[1] and r["expert"] == str(DEAD[2]))
    assert row["flags"] == "dead" and float(row["rel_rmse"]) == 0.0
    for row in rows:
        rec = by_name[row["tensor"]] if row["expert"] == "" else by_name[row["tensor"]]["experts"][int(row["expert"])]
        assert float(row["rel_rmse"]) == rec["rel_rmse"] and float(row["cosine"]) == rec["cosine"]


@pytest.mark.slow
def test_resume_gives_the_same_report(converted, tmp_path):
    out = tmp_path / "out" / "q4.gguf"
    crash_midway = ConvertHooks(on_tensor=fails_on_call(25, KeyboardInterrupt()))  # like ^C in the middle of the run
    with pytest.raises(KeyboardInterrupt):
        convert(converted["src"], out, converted["options"], RunOptions(progress=False), crash_midway)
    files = convert(converted["src"], out, converted["options"], RunOptions(resume=True, progress=False))
    assert [f.name for f in files] == [f.name for f in converted["files"]]
    resumed = json.loads((out.parent / "q4.report.json").read_text())
    first = json.loads((converted["files"][0].parent / "q4.report.json").read_text())
    assert resumed["not_measured"] == [] and resumed["tensors"] == first["tensors"]
    assert (out.parent / "q4.report.csv").read_text() == (converted["files"][0].parent / "q4.report.csv").read_text()


@pytest.mark.slow
def test_report_command_prints_worst_and_draws_pngs(converted, tmp_path, capsys):
    shard = converted["files"][1]  # any shard finds the report of its set
    main(["report", str(shard), "--top", "5", "--plots-dir", str(tmp_path)])
    out = capsys.readouterr().out
    worst_experts = out.split("worst experts")[1].splitlines()
    assert TINY_SCALE[1] in worst_experts[2] and "outlier" in worst_experts[2]
    assert f"{DEAD[1]}: {DEAD[2]}" in out.split("dead experts:")[1]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"q4.report.{k}.png" for k in ("ffn_down_exps", "ffn_gate_exps", "ffn_up_exps", "layers")]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "absent.gguf")])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'absent.report.json'}: no report found "
        "(looked for it beside absent.gguf; convert without --no-report writes it)"
    )


@pytest.mark.slow
def test_no_report_writes_none(tmp_path):
    src = build_checkpoint(TINY, tmp_path / "src")
    main(["convert", str(src), "-o", str(tmp_path / "t.gguf"), "--type", "Q8_0", "--no-report", "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.gguf"]
