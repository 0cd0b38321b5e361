"""Q5_1: blocks of 32 weights with an fp16 scale and an fp16 min and 5-bit levels.

Block layout (24 bytes):  d: fp16 | m: fp16 | qh: u32 (little-endian) | qs: u8[16]
  weight = d·q + m, q in 0..31; qs[l] holds element l (low nibble) and l+16 (high nibble), bit 4 of
  element l is bit l of qh.
llama.cpp writes Q5_1 where Q5_K cannot go (rows not a multiple of 256). Without importance ggml runs
quantize_row_q5_1_ref (min/max rounding); with importance quantize_row_q5_1_impl weighs each element
by importance·√(σ² + x²), σ² over the whole row, and searches with make_qkx3_quants(31, -0.9, 0.05, 36).
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, store_fp16
from rioquant.kernels.search_affine import make_qkx3_quants, new_scratch

QK5_1 = 32
QH_AT = 4
QS_AT = 8
BLOCK_BYTES = QS_AT + QK5_1 // 2
FLT_MAX = F32(3.4028234663852886e38)
BATCH = 8  # blocks searched together (see search_affine)


@njit(cache=True)
def _float_to_u8(v: np.float32) -> int:
    """C's (uint8_t) conversion as x86 does it: truncate to int32 (NaN and overflow give INT_MIN)."""
    in_range = v > F32(-2147483648.0) and v < F32(2147483648.0)
    return np.int64(np.int32(v if in_range else F32(-2147483648.0))) & 0xFF


@njit(cache=True)
def _store_levels(L: np.ndarray, lo: int, out: np.ndarray, ob: int) -> None:
    """Pack the 32 levels (0..31) at L[lo:] into the qs nibbles and qh bits of the block at out[ob:]."""
    qh = 0
    for j in range(QK5_1 // 2):
        l0 = np.int64(L[lo + j])
        l1 = np.int64(L[lo + j + QK5_1 // 2])
        out[ob + QS_AT + j] = (l0 & 0x0F) | ((l1 & 0x0F) << 4)
        qh |= ((l0 & 0x10) >> 4) << j
        qh |= ((l1 & 0x10) >> 4) << (j + QK5_1 // 2)
    for k in range(4):
        out[ob + QH_AT + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True)
def _step(v: np.float32, lo: np.float32, hi: np.float32) -> tuple[np.float32, np.float32]:
    return (v if v < lo else lo), (v if v > hi else hi)


@njit(cache=True)
def _min_max(x: np.ndarray, xo: int) -> tuple[np.float32, np.float32]:
    """ggml's running min/max over the block (strict comparisons from ±FLT_MAX), split into four
    runs of 8 that proceed side by side and merge in order, which keeps the first of equal values
    (0.0 vs -0.0 matters: the min is stored)."""
    lo0 = lo1 = lo2 = lo3 = FLT_MAX
    hi0 = hi1 = hi2 = hi3 = -FLT_MAX
    for j in range(QK5_1 // 4):
        lo0, hi0 = _step(x[xo + j], lo0, hi0)
        lo1, hi1 = _step(x[xo + 8 + j], lo1, hi1)
        lo2, hi2 = _step(x[xo + 16 + j], lo2, hi2)
        lo3, hi3 = _step(x[xo + 24 + j], lo3, hi3)
    fmin = lo0 if not lo1 < lo0 else lo1
    fmin = fmin if not lo2 < fmin else lo2
    fmin = fmin if not lo3 < fmin else lo3
    fmax = hi0 if not hi1 > hi0 else hi1
    fmax = fmax if not hi2 > fmax else hi2
    fmax = fmax if not hi3 > fmax else hi3
    return fmin, fmax


@njit(cache=True, error_model="numpy")
def _quantize_ref(x: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_1_ref; blocks addressed by offset (views would cost two refcounts per block)."""
    L = np.empty(QK5_1, dtype=np.uint8)
    for ib in range(x.size // QK5_1):
        xo = ib * QK5_1
        ob = ib * BLOCK_BYTES
        fmin, fmax = _min_max(x, xo)
        d = F32(F32(fmax - fmin) / F32(31.0))
        inv_d = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
        store_fp16(out, ob, d)
        store_fp16(out, ob + 2, fmin)
        for j in range(QK5_1):
            L[j] = _float_to_u8(F32(F32(F32(x[xo + j] - fmin) * inv_d) + F32(0.5)))
        _store_levels(L, 0, out, ob)


@njit(cache=True, error_model="numpy")
def _quantize_impl(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_1_impl: σ² spans the whole row, so weights are computed before the blocks."""
    sum_x2 = F32(0.0)
    for v in x:
        sum_x2 = F32(sum_x2 + F32(v * v))
    sigma2 = F32(sum_x2 / F32(x.size))
    weights = np.empty(x.size, dtype=np.float32)
    for j in range(x.size):
        weights[j] = F32(importance[j] * np.sqrt(F32(sigma2 + F32(x[j] * x[j]))))
    L = np.empty(BATCH * QK5_1, dtype=np.uint8)
    scales = np.empty(BATCH, dtype=np.float32)
    mins = np.empty(BATCH, dtype=np.float32)
    scratch = new_scratch()
    nb = x.size // QK5_1
    for first in range(0, nb, BATCH):
        groups = min(BATCH, nb - first)
        lo = first * QK5_1
        hi = lo + groups * QK5_1
        make_qkx3_quants(
            groups, QK5_1, 31, x[lo:hi], weights[lo:hi], L, F32(-0.9), F32(0.05), 36, False,
            scales, mins, scratch,
        )
        for g in range(groups):
            ob = (first + g) * BLOCK_BYTES
            store_fp16(out, ob, scales[g])
            store_fp16(out, ob + 2, -mins[g])
            _store_levels(L, g * QK5_1, out, ob)


@njit(cache=True)
def quantize_row_q5_1(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    if importance.size == 0:
        _quantize_ref(x, out)
    else:
        _quantize_impl(x, importance, out)


@njit(cache=True)
def dequantize_row_q5_1(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK5_1):
        block = data[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        y = out[ib * QK5_1 : (ib + 1) * QK5_1]
        d = load_fp16(block, 0)
        m = load_fp16(block, 2)
        qh = 0
        for k in range(4):
            qh |= np.int64(block[QH_AT + k]) << (8 * k)
        for j in range(QK5_1 // 2):
            lo = np.int64(block[QS_AT + j])
            q0 = (lo & 0x0F) | (((qh >> j) << 4) & 0x10)
            q1 = (lo >> 4) | ((qh >> (j + 12)) & 0x10)
            y[j] = F32(F32(F32(q0) * d) + m)
            y[j + QK5_1 // 2] = F32(F32(F32(q1) * d) + m)
