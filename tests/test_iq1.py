"""IQ1_S and IQ1_M beyond the shared kernel tests (tests/test_kernels.py): inputs aimed at their search.

Both types need an importance matrix (ggml aborts without one for IQ1_S; llama-quantize refuses IQ1_M),
so every comparison with ggml passes one.
"""

import zlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from rioquant.kernels import iq1, iq1_m
from rioquant.kernels.iq1 import GRID_KEYS, KMAP
from rioquant.quant import dequantize, quantize
from rioquant.testing.inputs import random_importance
from tests.test_kernels import assert_same_bytes

T = GGMLQuantizationType
IQ1_TYPES = [T.IQ1_S, T.IQ1_M]
IDS = [t.name for t in IQ1_TYPES]


def off_grid_keys() -> np.ndarray:
    """Every key of 8 levels in 0..2 that is not a lattice point: the keys with a neighbour list."""
    levels = np.stack(np.meshgrid(*[np.arange(3)] * 8, indexing="ij"), -1).reshape(-1, 8)  # (6561, 8)
    keys = (levels << (2 * np.arange(8))).sum(1)
    return levels[KMAP[keys] < 0]


def rows_of_groups(levels: np.ndarray, n: int = 1024) -> np.ndarray:
    """Rows of n weights whose groups of 8 take the given levels (-1, 0, 1), padded with repeats."""
    groups = np.resize(levels, (-(-len(levels) * 8 // n) * n // 8, 8))
    return (groups.astype(np.float32) - 1).reshape(-1, n)


@pytest.mark.parametrize("qtype", IQ1_TYPES, ids=IDS)
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.3])
def test_every_off_grid_key(ggml, qtype, noise):
    """Groups sitting on each of the 4,513 off-lattice keys send the search through every neighbour
    list; exact levels (noise 0) make equally distant neighbours tie, so their order is checked too."""
    rng = np.random.default_rng(int(noise * 100))
    x = rows_of_groups(off_grid_keys())
    x += (rng.standard_normal(x.shape) * noise).astype(np.float32)
    for kind in ("ones", "typical"):
        qw = random_importance(rng, x.shape[1], kind)
        assert_same_bytes(quantize(x, qtype, imatrix=qw), ggml.quantize(x, qtype, qw), qtype, f"noise={noise}/{kind}")


@pytest.mark.parametrize("qtype", IQ1_TYPES, ids=IDS)
def test_lattice_points_and_scaled_copies(ggml, qtype):
    """Groups already on the lattice (no neighbour search), at scales where delta shifts the split."""
    points = (GRID_KEYS[:, None] >> (2 * np.arange(8))) & 3
    x = rows_of_groups(points, 512)
    x = np.concatenate([x, x * np.float32(0.37), x + np.float32(0.125), -x])
    qw = random_importance(np.random.default_rng(5), 512, "typical")
    assert_same_bytes(quantize(x, qtype, imatrix=qw), ggml.quantize(x, qtype, qw), qtype, "lattice points")


@pytest.mark.parametrize("qtype", IQ1_TYPES, ids=IDS)
@pytest.mark.parametrize("case", ["ties", "two_values", "one_hot", "sparse_weights", "tiny_blocks"])
def test_search_corner_cases(ggml, qtype, case):
    """Ties in the sort (ggml's qsort order), splits with empty groups, weights that zero whole groups."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    rows, n = 16, 512
    qw = random_importance(rng, n, "typical")
    if case == "ties":
        x = rng.integers(-2, 3, (rows, n)).astype(np.float32) * np.float32(0.5)
    elif case == "two_values":
        x = rng.choice(np.array([-0.3, 0.7], dtype=np.float32), (rows, n))
    elif case == "one_hot":
        x = np.zeros((rows, n), dtype=np.float32)
        x[np.arange(rows), rng.integers(0, n, rows)] = rng.standard_normal(rows).astype(np.float32)
        x[:, 300] = np.float32(-2.0)
    elif case == "sparse_weights":
        x = rng.standard_normal((rows, n)).astype(np.float32)
        qw[rng.random(n) < 0.8] = 0
        qw[16:48] = 0
    else:  # blocks just above and below the zero-block thresholds
        x = rng.standard_normal((rows, n)).astype(np.float32)
        x[:, :64] *= np.float32(1e-12)
        x[:, 64:128] *= np.float32(1e-7)
        x[:, 128:256] *= np.float32(3e-8)
    assert_same_bytes(quantize(x, qtype, imatrix=qw), ggml.quantize(x, qtype, qw), qtype, case)


@pytest.mark.parametrize("qtype", IQ1_TYPES, ids=IDS)
def test_dequantize_of_our_bytes_equals_gguf_py(ggml, qtype):
    import gguf

    rng = np.random.default_rng(11)
    x = rng.standard_normal((8, 768)).astype(np.float32)
    data = quantize(x, qtype, imatrix=random_importance(rng, 768, "with_zeros"))
    ref = gguf.quants.dequantize(data, qtype)
    np.testing.assert_array_equal(dequantize(data, qtype, x.shape).view(np.uint32), ref.view(np.uint32))


def test_block_layouts_match_gguf_py():
    import gguf

    assert iq1.BLOCK_BYTES == gguf.GGML_QUANT_SIZES[T.IQ1_S][1]
    assert iq1_m.BLOCK_BYTES == gguf.GGML_QUANT_SIZES[T.IQ1_M][1]


def test_raises_where_ggml_asserts():
    """Squares overflowing float32 with near-zero importance make an IQ1_M block scale NaN, where ggml
    aborts the process (GGML_ASSERT(scale >= 0)); the kernel raises instead of writing garbage.
    (The input is tests/test_kernels.py's overflowing_squares/near_zero case, checked in a subprocess.)"""
    from rioquant.testing.inputs import INPUTS

    rng = np.random.default_rng(zlib.crc32(b"overflowing_squaresnear_zeroIQ1_M"))
    x = INPUTS["overflowing_squares"](rng, 5, 512)
    qw = random_importance(rng, 512, "near_zero")
    out = np.zeros(2 * iq1_m.BLOCK_BYTES, dtype=np.uint8)
    with pytest.raises(ValueError, match="non-finite block scale"):
        for row in x:
            iq1_m.quantize_row_iq1_m(row, qw, out)
