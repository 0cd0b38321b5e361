"""IQ3_XXS and IQ3_S beyond tests/test_kernels.py: ggml's neighbour maps, its quirks, the no-imatrix path.

test_kernels.py already compares both types with an imatrix on every named input (and IQ3_S without
one). Here: rows built so that every key off the codebook goes through the neighbour search (the maps
are right only if those bytes equal ggml's), zero sub-blocks (IQ3_S's unadvanced slots, IQ3_XXS's
threshold), and IQ3_XXS without importance, which ggml accepts though llama-quantize and
rioquant.quantize refuse it (so it is reached through the row kernel).
"""

import zlib

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rioquant.kernels.driver import quantize_driver
from rioquant.kernels.iq_lattice import grid_levels
from rioquant.quant import dequantize
from rioquant.quant.types import BLOCK_KERNELS, block_geometry
from rioquant.testing.inputs import INPUTS, random_importance
from tests.test_kernels import assert_same_bytes

T = gguf.GGMLQuantizationType
IQ3_TYPES = [T.IQ3_XXS, T.IQ3_S]
IDS = [t.name for t in IQ3_TYPES]
# ggml aborts the process (GGML_ASSERT in iq3_find_best_neighbour) when every neighbour's error overflows.
ORACLE_ABORTS = {"overflowing_squares"}
NO_IMPORTANCE = np.zeros(0, dtype=np.float32)


def quantize_kernel(x: np.ndarray, qtype: gguf.GGMLQuantizationType, qw: np.ndarray | None) -> np.ndarray:
    """The row kernel through the parallel driver, with no imatrix refusal in front of it."""
    block, type_bytes = block_geometry(qtype)
    out = np.empty((x.shape[0], x.shape[1] // block * type_bytes), dtype=np.uint8)
    quantize_driver(BLOCK_KERNELS[qtype].quantize_row)(x, NO_IMPORTANCE if qw is None else qw, out)
    return out


def off_grid_rows(qtype: gguf.GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Rows in which every 4-level key off gguf-py's codebook is one group of some sub-block.

    Values sit exactly on the positions (2l + 1)/16 and every sub-block opens with a group holding
    level 7 (x = 15/16, the sub-block's max), so at the middle scale trial (id = 15/max = 16) each
    group rounds exactly to its key and, being off the codebook, takes the neighbour search. Signs are
    random with an even count per 8 weights, which IQ3_XXS's implied 8th sign keeps as given.
    """
    levels, _ = grid_levels(qtype)
    on_grid = set((levels.astype(np.int64) << (3 * np.arange(4))).sum(axis=1).tolist())
    keys = np.array([u for u in range(1 << 12) if u not in on_grid])
    has_7 = keys[[any((u >> (3 * i)) & 7 == 7 for i in range(4)) for u in keys]]
    per_sub = 7
    n_sub = -(-len(keys) // per_sub)
    n_sub += -n_sub % 32  # rows of 4 whole super-blocks
    groups = np.empty((n_sub, 8), dtype=np.int64)
    groups[:, 0] = has_7[np.arange(n_sub) % len(has_7)]
    groups[:, 1:] = keys[np.arange(n_sub * per_sub) % len(keys)].reshape(n_sub, per_sub)
    lv = (groups[..., None] >> (3 * np.arange(4))) & 7  # (sub-blocks, 8 groups, 4)
    x = ((2 * lv + 1) / 16).astype(np.float32).reshape(-1, 8)  # (sign groups of 8,)
    signs = rng.random(x.shape) < 0.5
    signs[:, 0] ^= signs.sum(axis=1) % 2 == 1
    x[signs] *= -1
    return x.reshape(-1, 4 * 256)


@pytest.mark.parametrize("qtype", IQ3_TYPES, ids=IDS)
@pytest.mark.parametrize("weights", ["plain", "with_zeros", "ones"])
def test_every_off_grid_key_takes_ggmls_neighbour(ggml, qtype, weights):
    """The neighbour lists (and their order, which settles ties: zero importance makes coordinates
    weightless, so neighbours that differ only there tie) are ggml's, through the bytes."""
    rng = np.random.default_rng(zlib.crc32(f"{qtype.name}{weights}".encode()))
    x = off_grid_rows(qtype, rng)
    qw = None
    if weights != "plain":
        qw = random_importance(rng, x.shape[1], "ones")
        if weights == "with_zeros":
            qw[rng.random(qw.size) < 0.35] = 0
    data = quantize_kernel(x, qtype, qw)
    assert_same_bytes(data, ggml.quantize(x, qtype, qw), qtype, f"{qtype.name}/off-grid/{weights}")
    ref = gguf.quants.dequantize(data, qtype)
    np.testing.assert_array_equal(dequantize(data, qtype, x.shape).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", IQ3_TYPES, ids=IDS)
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
def test_zero_and_tiny_sub_blocks(ggml, qtype, use_imatrix):
    """IQ3_S writes the sub-blocks after a zero one a slot early (ggml skips without advancing its qs
    and signs pointers); IQ3_XXS stores sub-blocks below 1e-8 as zero. Either must come out as ggml's."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0, 64:96] = 0  # one zero sub-block mid super-block
    x[1, 0:32] = x[1, 160:192] = 0  # two, the first at the start
    x[2, 32:64] = -0.0
    x[3, 96:128] = (rng.standard_normal(32) * 1e-9).astype(np.float32)  # below IQ3_XXS's threshold
    x[4, :224] = 0  # one live sub-block, last
    x[5, 256:] = 0  # a whole zero super-block
    qw = random_importance(rng, 512, "typical") if use_imatrix else None
    assert_same_bytes(quantize_kernel(x, qtype, qw), ggml.quantize(x, qtype, qw), qtype, f"{qtype.name}/zeros")


@pytest.mark.parametrize("case", sorted(set(INPUTS) - ORACLE_ABORTS))
def test_iq3_xxs_without_imatrix(ggml, case):
    """ggml's IQ3_XXS path without importance (weights x²), reached through the row kernel."""
    rng = np.random.default_rng(zlib.crc32(f"{case}IQ3_XXS".encode()))
    for rows, n in ((1, 256), (4, 1024)):
        x = INPUTS[case](rng, rows, n)
        assert_same_bytes(quantize_kernel(x, T.IQ3_XXS, None), ggml.quantize(x, T.IQ3_XXS), T.IQ3_XXS, case)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-30, 10), blocks=st.integers(1, 2))
def test_iq3_xxs_without_imatrix_random_scales(ggml, seed, log_scale, blocks):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, blocks * 256)) * np.exp(log_scale)).astype(np.float32)
    assert_same_bytes(quantize_kernel(x, T.IQ3_XXS, None), ggml.quantize(x, T.IQ3_XXS), T.IQ3_XXS, f"seed={seed}")


@pytest.mark.parametrize("qtype", IQ3_TYPES, ids=IDS)
def test_overflowing_rows_do_not_crash(qtype):
    """Where ggml aborts (every neighbour error overflows float32) the kernel still returns bytes."""
    x = (np.random.default_rng(5).standard_normal((3, 256)) * 1e20).astype(np.float32)
    for qw in (None, np.ones(256, dtype=np.float32)):
        assert quantize_kernel(x, qtype, qw).shape == (3, block_geometry(qtype)[1])
