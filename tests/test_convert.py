"""`rioquant convert` end to end on tiny Qwen3.5-MoE checkpoints, against llama.cpp and transformers.

- F16/BF16/F32 output: every tensor's bytes and every metadata value equal what llama.cpp's own
  convert_hf_to_gguf.py writes for the same checkpoint (the one deliberate difference: tensor order).
- Quantized output: every quantized tensor's bytes equal ggml's quantization of the reference
  converter's F32 tensor; the files load in llama.cpp and its logits match transformers'.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.testing.checkpoints import KQUANT, TINY, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.oracles import GgmlOracle, llama_logits, run_reference_converter, transformers_logits

PROMPT = [248045, 846, 198, 9707, 11, 1246, 525, 498, 30, 248046, 198, 248045, 77091, 198]

CASES = {
    "per_expert-mtp-bf16": replace(TINY, mtp=True),
    "fused-vision-sharded": replace(TINY, expert_layout="fused", with_vision=True, mtp=True, shards=3),
    "per_expert-f16-source": replace(TINY, dtype="float16", shards=2),
    "fused-f32-source": replace(TINY, expert_layout="fused", dtype="float32"),
}


# llama.cpp's converter keeps F16 source tensors in float16 while it applies +1 to norms and
# -exp to A_log, then stores them as F32; rioquant computes in float32 (docs/conversion.md). These
# tensors may differ from the reference by float16 rounding, and only for float16 checkpoints.
F16_ARITHMETIC_TENSORS = ("_norm.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "ssm_a")


def assert_same_gguf(ours: Path, ref: Path, f16_source: bool = False) -> None:
    a, b = scan(ours), scan(ref)
    differing = sorted(k for k in a.kv.keys() | b.kv.keys() if a.kv.get(k) != b.kv.get(k))
    assert not differing, "metadata differs: " + "; ".join(
        f"{k}: ours {str(a.kv.get(k))[:100]} ref {str(b.kv.get(k))[:100]}" for k in differing[:5]
    )
    assert a.tensors.keys() == b.tensors.keys(), (
        f"tensor names differ: ours-only {sorted(a.tensors.keys() - b.tensors.keys())}, "
        f"ref-only {sorted(b.tensors.keys() - a.tensors.keys())}"
    )
    for name, t in a.tensors.items():
        r = b.tensors[name]
        assert (t.qtype, t.shape) == (r.qtype, r.shape), f"{name}: ours {t.qtype.name} {t.shape}, ref {r.qtype.name} {r.shape}"
        if f16_source and name.endswith(F16_ARITHMETIC_TENSORS):
            np.testing.assert_allclose(np.frombuffer(t.data, np.float32), np.frombuffer(r.data, np.float32),
                                       rtol=2**-10, atol=2**-14, err_msg=name)
            continue
        assert t.data == r.data, f"{name}: bytes differ from llama.cpp's converter"


@pytest.fixture(scope="module")
def checkpoints(module_tmp) -> dict[str, Path]:
    root = module_tmp("ckpt")
    return {name: build_checkpoint(spec, root / name) for name, spec in CASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_float_output_equals_reference_converter(checkpoints, tmp_path, case):
    src = checkpoints[case]
    for outtype in ("f16", "bf16") if case == "per_expert-mtp-bf16" else ("f16",):
        ref = run_reference_converter(src, tmp_path / f"ref-{outtype}.gguf", outtype)
        (ours,) = convert(src, tmp_path / f"ours-{outtype}.gguf", ConvertOptions(qtype=outtype.upper()), RunOptions(progress=False))
        assert_same_gguf(ours, ref, f16_source=CASES[case].dtype == "float16")


@pytest.mark.slow
def test_no_mtp_equals_reference_converter(checkpoints, tmp_path):
    src = checkpoints["per_expert-mtp-bf16"]
    ref = run_reference_converter(src, tmp_path / "ref.gguf", "f16", mtp=False)
    (ours,) = convert(src, tmp_path / "ours.gguf", ConvertOptions(qtype="F16", with_mtp=False), RunOptions(progress=False))
    assert_same_gguf(ours, ref)
    assert not any("nextn" in name for name in scan(ours).tensors)


@pytest.fixture(scope="module")
def kquant(module_tmp) -> tuple[Path, Path]:
    """A K-quant-shaped checkpoint and llama.cpp's F32 conversion of it (the bytes to quantize)."""
    root = module_tmp("kquant")
    src = build_checkpoint(replace(KQUANT, mtp=True, num_experts=6), root / "src")
    return src, run_reference_converter(src, root / "ref-f32.gguf", "f32")


@pytest.mark.slow
def test_f32_output_matches_transformers(kquant, tmp_path):
    src, _ = kquant
    (out,) = convert(src, tmp_path / "f32.gguf", ConvertOptions(qtype="F32"), RunOptions(progress=False))
    ours, ref = llama_logits(out, PROMPT), transformers_logits(src, PROMPT)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.abs(ours - ref).max() < 3e-3 * max(1.0, float(np.abs(ref).max()) / 10)


# A random tiny MoE is chaotic (a router flip moves whole logits), so argmax agreement is no measure
# for quantized files; the per-position correlation of the logits with transformers' is. Measured:
# Q8_0 median 0.999, Q4_K median 0.96.
MIN_MEDIAN_CORRELATION = {"Q8_0": 0.99, "Q4_K": 0.9}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", list(MIN_MEDIAN_CORRELATION))
def test_quantized_output_loads_in_llama_cpp_and_stays_close(kquant, tmp_path, qtype):
    src, _ = kquant
    (out,) = convert(src, tmp_path / f"{qtype}.gguf", ConvertOptions(qtype=qtype), RunOptions(progress=False))
    ours, ref = llama_logits(out, PROMPT), transformers_logits(src, PROMPT)
    correlation = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours, ref, strict=True)]
    assert np.median(correlation) >= MIN_MEDIAN_CORRELATION[qtype], correlation


# One legacy and one K type: every other type's bytes, through the same chain, are held to
# llama_model_quantize's in tests/test_recipes.py (each mix, each type)
@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_quantized_tensors_equal_ggml_on_reference_f32(kquant, tmp_path, qtype):
    """Mapping, transforms and quantization together: each tensor = ggml(quantize, llama.cpp's F32)."""
    src, ref_f32 = kquant
    (out,) = convert(src, tmp_path / f"{qtype}.gguf", ConvertOptions(qtype=qtype), RunOptions(progress=False))
    oracle = GgmlOracle()
    ref = scan(ref_f32).tensors
    written = scan(out).tensors
    for name, t in written.items():
        values = np.frombuffer(ref[name].data, np.float32).reshape(-1, t.shape[-1])
        if t.qtype == GGMLQuantizationType.F32:
            expected = values.tobytes()
        elif t.qtype == GGMLQuantizationType.F16:
            expected = values.astype(np.float16).tobytes()
        else:
            expected = oracle.quantize(values, t.qtype).tobytes()
        assert t.data == expected, f"{name} ({t.qtype.name})"
    assert any(t.qtype.name == qtype for t in written.values())
