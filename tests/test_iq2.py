"""IQ2_XXS, IQ2_XS, IQ2_S byte for byte against ggml_quantize_chunk, and dequantized as gguf-py does.

The lattice rows put every 8-level key that is not a codebook point (each with levels ≤ 2, the only
ones the quantizers form) into the search, so the bytes depend on every neighbour list ggml built:
exact odd multiples with equal importance make equally distant neighbours tie (the first listed must
win), and jittered values with random importance make different members of each list win.
"""

import zlib

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rioquant.files.gguf_file import nbytes
from rioquant.kernels.driver import quantize_driver
from rioquant.kernels.iq_lattice import grid_levels
from rioquant.quant import dequantize, quantize
from rioquant.quant.types import BLOCK_KERNELS
from rioquant.testing.inputs import IMPORTANCE_KINDS, INPUTS, random_importance
from tests.test_kernels import assert_same_bytes

T = gguf.GGMLQuantizationType
IQ2_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S]
IDS = [t.name for t in IQ2_TYPES]
# x² overflows float32: ggml's IQ2_XS/IQ2_S neighbour search finds no finite distance and aborts the
# process, and the API refuses rows that large for every i-quant (K1's guard, tested there).
ABORTING_INPUT = "overflowing_squares"
CASES = [c for c in INPUTS if c != ABORTING_INPUT]
ROW = 4096


def ours(x: np.ndarray, qtype: T, qw: np.ndarray | None) -> np.ndarray:
    """rioquant's bytes; without an imatrix straight from the kernel (the API refuses IQ2_S without one,
    as llama-quantize does, but ggml_quantize_chunk takes it, so that path is ggml's too)."""
    if qw is not None:
        return quantize(x, qtype, imatrix=qw)
    out = np.empty((x.shape[0], nbytes(qtype, (x.shape[1],))), dtype=np.uint8)
    quantize_driver(BLOCK_KERNELS[qtype].quantize_row)(x, np.zeros(0, dtype=np.float32), out)
    return out


def off_codebook_points(qtype: T) -> np.ndarray:
    """Every 8-level vector with levels ≤ 2 that is not in qtype's codebook: int (K, 8)."""
    levels, _ = grid_levels(qtype)
    all_points = (np.arange(3**8)[:, None] // 3 ** np.arange(8)) % 3
    on = set(map(tuple, levels.tolist()))
    return np.array([p for p in all_points.tolist() if tuple(p) not in on], dtype=np.int64)


def lattice_rows(qtype: T, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Rows whose groups of 8 are (2l+1)·2^e for the off-codebook points l, in pairs that each hold a
    level 2 (so a 16-group's max is 5 and the search's middle scale rounds back to exactly l), with
    even-parity signs (so IQ2_XXS/XS keep them) and an optional relative jitter."""
    points = off_codebook_points(qtype)
    has_two = (points == 2).any(axis=1)
    twos, others = points[has_two], points[~has_two]
    partners = twos[np.arange(len(others)) % len(twos)]
    pairs = np.concatenate([np.stack([others, partners], axis=1).reshape(-1, 8), twos])
    groups = -(-len(pairs) * 8 // ROW) * ROW // 8
    pairs = np.concatenate([pairs, twos[: groups - len(pairs)]])
    x = (2 * pairs + 1).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], x.shape).astype(np.float32)
    signs[:, 7] *= signs[:, :7].prod(axis=1)  # even count of negatives
    x *= signs * (1 + jitter * rng.standard_normal(x.shape)).astype(np.float32)
    scales = np.exp2(rng.integers(-12, 4, (len(x) * 8 // 256, 1))).astype(np.float32)
    return (x.reshape(-1, 256) * scales).reshape(-1, ROW)


def imatrix_paths(qtype: T) -> list[str | None]:
    """Importance kinds to test; None (no imatrix) only where ggml accepts it."""
    return [*IMPORTANCE_KINDS, None] if qtype == T.IQ2_S else list(IMPORTANCE_KINDS)


def importance_of(rng: np.random.Generator, n: int, kind: str | None) -> np.ndarray | None:
    return None if kind is None else random_importance(rng, n, kind)


@pytest.mark.parametrize("qtype", IQ2_TYPES, ids=IDS)
@pytest.mark.parametrize("jitter", [0.0, 0.15])
def test_every_off_codebook_key_equals_ggml(ggml, qtype, jitter):
    rng = np.random.default_rng(zlib.crc32(f"{qtype.name}{jitter}".encode()))
    x = lattice_rows(qtype, rng, jitter)
    kinds = ["ones", "typical"] + ([None] if qtype == T.IQ2_S else [])
    for kind in kinds:
        qw = importance_of(rng, ROW, kind)
        assert_same_bytes(ours(x, qtype, qw), ggml.quantize(x, qtype, qw), qtype, f"{qtype.name}/{kind}")


@pytest.mark.parametrize("qtype", IQ2_TYPES, ids=IDS)
@pytest.mark.parametrize("case", CASES)
def test_named_inputs_equal_ggml(ggml, qtype, case):
    rng = np.random.default_rng(zlib.crc32(f"{case}{qtype.name}".encode()))
    x = INPUTS[case](rng, 4, 512)
    for kind in imatrix_paths(qtype):
        qw = importance_of(rng, 512, kind)
        assert_same_bytes(ours(x, qtype, qw), ggml.quantize(x, qtype, qw), qtype, f"{case}/{kind}")


@pytest.mark.parametrize("qtype", IQ2_TYPES, ids=IDS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-30, 10), blocks=st.integers(1, 3), plain=st.booleans())
def test_property_random_scales(ggml, qtype, seed, log_scale, blocks, plain):
    rng = np.random.default_rng(seed)
    n = blocks * 256
    x = (rng.standard_normal((3, n)) * np.exp(log_scale)).astype(np.float32)
    qw = None if plain and qtype == T.IQ2_S else random_importance(rng, n, "typical")
    assert_same_bytes(ours(x, qtype, qw), ggml.quantize(x, qtype, qw), qtype, f"seed={seed}")


@pytest.mark.parametrize("qtype", IQ2_TYPES, ids=IDS)
def test_dequantize_equals_gguf_py(ggml, qtype):
    rng = np.random.default_rng(11)
    x = np.concatenate([INPUTS[c](rng, 2, 512) for c in CASES])
    data = ggml.quantize(x, qtype, random_importance(rng, 512, "typical"))
    ours = dequantize(data, qtype, x.shape)
    ref = gguf.quants.dequantize(data, qtype)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))
