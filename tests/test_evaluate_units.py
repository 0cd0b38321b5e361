"""The evaluation engine's parts, each against a slow or independent reference (fast tests).

- the chunked Gated DeltaNet against the token-by-token recurrence;
- the torch dequantization kernels (what runs on CUDA) bit for bit against the Numba ones, on CPU;
- the IMROPE angles against transformers' frequencies; ggml's activation roundings against ggml's bytes;
- llama-perplexity's statistics against plain numpy; the GGUF reader (split sets, wrong architecture);
- the one-line errors for short texts and for --device cuda without CUDA.
"""

import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from rioquant.errors import EvaluationError
from rioquant.evaluate.dequant import TORCH_KERNELS, dequantize_torch
from rioquant.evaluate.engine import resolve_device
from rioquant.evaluate.forward import delta_rule_chunked, delta_rule_recurrent, l2_norm, rope_angles
from rioquant.evaluate.numerics import round_q8_0, round_q8_k
from rioquant.evaluate.source import open_source
from rioquant.evaluate.stats import kld_summary, percentile, perplexity_summary
from rioquant.evaluate.text import token_chunks
from rioquant.files.gguf_set import open_set
from rioquant.quant import dequantize, quantize
from rioquant.testing.inputs import INPUTS
from rioquant.testing.oracles import ggml_activation_rounding

T = gguf.GGMLQuantizationType


def _delta_inputs(seed: int, T_len: int, decay: float, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, H, dk, dv = 2, 3, 16, 8
    q = l2_norm(torch.randn(B, H, T_len, dk, generator=g, dtype=dtype), 1e-6) / 4
    k = l2_norm(torch.randn(B, H, T_len, dk, generator=g, dtype=dtype), 1e-6)
    v = torch.randn(B, H, T_len, dv, generator=g, dtype=dtype)
    gate = -decay * torch.rand(B, H, T_len, generator=g, dtype=dtype)
    beta = torch.rand(B, H, T_len, generator=g, dtype=dtype)
    return q, k, v, gate, beta


# (length, decay): one partial chunk, exact multiples, a ragged tail; slow decay, and one strong
# enough that the cumulative log-decay inside a chunk reaches −1000 (float32 differences would fail)
DELTA_CASES = {"short": (5, 1.0), "two_chunks": (128, 1.0), "ragged": (150, 1.0), "strong_decay": (130, 30.0),
               "no_decay": (100, 0.0)}


@pytest.mark.parametrize("case", list(DELTA_CASES))
def test_chunked_delta_rule_equals_recurrence(case):
    T_len, decay = DELTA_CASES[case]
    args = _delta_inputs(zlib.crc32(case.encode()), T_len, decay)
    ref = delta_rule_recurrent(*args)
    torch.testing.assert_close(delta_rule_chunked(*args), ref, rtol=1e-10, atol=1e-12)
    f32 = delta_rule_chunked(*(x.float() for x in args))
    torch.testing.assert_close(f32.double(), ref, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("qtype", list(TORCH_KERNELS), ids=[t.name for t in TORCH_KERNELS])
@pytest.mark.parametrize("case", ["gauss_1", "heavy_tails", "rare_outliers", "zero_blocks"])
def test_torch_dequant_equals_numba(qtype, case):
    rng = np.random.default_rng(zlib.crc32(f"{case}{qtype.name}".encode()))
    x = INPUTS[case](rng, 6, 512)
    raw = quantize(x, qtype)
    ours = dequantize_torch(torch.from_numpy(raw.reshape(-1)), qtype, x.shape).numpy()
    ref = dequantize(raw, qtype, x.shape)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{qtype.name}/{case}: torch != Numba"


@pytest.mark.parametrize("qtype", list(TORCH_KERNELS), ids=[t.name for t in TORCH_KERNELS])
def test_torch_dequant_on_random_bytes(qtype):
    """Every bit pattern, not only what our quantizer writes (negative scales, high bits set)."""
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(qtype.value).integers(0, 256, size=40 * type_bytes, dtype=np.uint8)
    shape = (4, 10 * block)
    ours = dequantize_torch(torch.from_numpy(raw), qtype, shape).numpy()
    with np.errstate(invalid="ignore"):  # random F16 scales include NaN and Inf
        ref = gguf.quants.dequantize(raw, qtype).reshape(shape)
    np.testing.assert_array_equal(ours, ref)


def test_rope_angles_all_sections_use_the_position():
    """[11, 11, 10] over 64 rotary dims: every pair rotates with the token position (transformers' IMROPE)."""
    angles = rope_angles(300, 64, 1e7, (11, 11, 10, 0))
    inv_freq = 1.0 / (1e7 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    np.testing.assert_allclose(angles, np.arange(300)[:, None] * inv_freq[None, :], rtol=2e-6, atol=1e-7)


def test_rope_angles_e_section_is_position_zero():
    angles = rope_angles(10, 8, 1e4, (1, 1, 1, 1))  # sector 3 falls in none of t/h/w: ggml uses p_e = 0
    assert np.all(angles[:, 3] == 0) and np.all(angles[1:, :3] != 0)


@pytest.mark.parametrize("case", ["gauss_1", "heavy_tails", "zero_blocks"])
def test_activation_roundings_equal_ggml_cpu(case):
    """round_q8_0 / round_q8_K equal what libggml-cpu's own quantize_row_q8_0 / _q8_K produce."""
    x = INPUTS[case](np.random.default_rng(zlib.crc32(case.encode())), 4, 512)
    for name, rounder in (("Q8_0", round_q8_0), ("Q8_K", round_q8_k)):
        ours = rounder(torch.from_numpy(x)).numpy().reshape(-1)
        ref = ggml_activation_rounding(x, name)
        bad = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
        assert bad.size == 0, f"{name}/{case}: {bad.size} values differ, first at {bad[0]}: {ours[bad[0]]} != {ref[bad[0]]}"


def test_q8_k_rounding_keeps_the_first_of_tied_extremes():
    """+m and −m in one block: ggml keeps the first (its scan replaces the max only on a larger |x|)."""
    x = np.random.default_rng(7).standard_normal((2, 256)).astype(np.float32)
    x[0, [3, 200]] = (5.0, -5.0)
    x[1, [3, 200]] = (-5.0, 5.0)
    ours = round_q8_k(torch.from_numpy(x)).numpy().reshape(-1)
    assert np.array_equal(ours.view(np.uint32), ggml_activation_rounding(x, "Q8_K").view(np.uint32))


def test_perplexity_and_kld_statistics():
    rng = np.random.default_rng(0)
    nll = rng.gamma(2.0, 1.0, 500)
    r = perplexity_summary(nll)
    assert r["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-12)
    assert r["ppl_stderr"] == pytest.approx(np.exp(nll.mean()) * nll.std() / np.sqrt(len(nll) - 1), rel=1e-9)
    kld = rng.exponential(0.05, 500)
    s = kld_summary(kld, rng.normal(0, 0.02, 500), nll + 0.01, nll, rng.random(500) < 0.9)
    for label, fraction in (("99.9%", 0.999), ("95%", 0.95), ("1%", 0.01)):
        assert s["kld_percentiles"][label] == pytest.approx(np.percentile(kld.astype(np.float32), 100 * fraction), rel=1e-6)
    assert s["kld_percentiles"]["median"] == pytest.approx(np.median(kld.astype(np.float32)), rel=1e-6)
    assert s["kld"] == pytest.approx(kld.mean()) and s["ppl_ratio"] == pytest.approx(np.exp(0.01))
    assert percentile(np.array([1.0, 2.0]), 0.5) == 1.5


def test_short_text_is_refused():
    with pytest.raises(EvaluationError, match=r"1000 tokens, but --ctx 512 needs at least 1024"):
        token_chunks(np.zeros(1000, np.int32), 512, None, Path("short.txt"))
    assert token_chunks(np.arange(1100, dtype=np.int32), 512, None, Path("ok.txt")).shape == (2, 512)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_without_cuda_fails_loudly():
    with pytest.raises(EvaluationError, match="sees no CUDA device"):
        resolve_device("cuda")


def test_gguf_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EvaluationError, match=r"llama.gguf: architecture 'llama'; rioquant evaluates qwen35moe"):
        open_source(path)


def test_gguf_reader_joins_a_split_set(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", arch="qwen35moe", split_max_tensors=1)
    writer.add_uint32("qwen35moe.block_count", 1)
    a, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((3, 32), np.float16)
    writer.add_tensor("a.weight", a)
    writer.add_tensor("b.weight", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = open_set(tmp_path / "m-00002-of-00002.gguf")  # any file of the set
    assert model.get("qwen35moe.block_count") == 1 and len(model.files) == 2
    assert model.tensors["a.weight"].shape == (2, 4) and model.tensors["b.weight"].qtype == T.F16
    from rioquant.files.gguf_file import read_tensor_bytes

    assert np.array_equal(read_tensor_bytes(model.tensors["b.weight"]).view(np.float16).reshape(3, 32), b)
