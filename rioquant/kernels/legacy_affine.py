"""Q4_1 and Q5_1: blocks of 32 weights with an fp16 scale, an fp16 min and 4- or 5-bit levels.

Block layouts:
  Q4_1 (20 bytes):  d: fp16 | m: fp16 | qs: u8[16]
  Q5_1 (24 bytes):  d: fp16 | m: fp16 | qh: u32 (little-endian) | qs: u8[16]
  weight = d·q + m; qs[l] holds the low 4 bits of element l (low nibble) and of l+16 (high nibble);
  Q5_1's bit 4 of element l is bit l of qh.
llama.cpp writes Q5_1 where Q5_K cannot go (rows not a multiple of 256), and Q4_1 in its Q4_1 mix.
Without importance ggml runs quantize_row_q{4,5}_1_ref (min/max rounding); with importance
quantize_row_q{4,5}_1_impl weighs each element by importance·√(σ² + x²), σ² over the whole row, and
searches with make_qkx3_quants(nmax, -0.9, 0.05, 36). The two types differ only in the level count,
the packing, and how _ref converts a level to uint8 (Q4_1 goes through int8 and MIN(15, ·)).
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, store_fp16
from rioquant.kernels.search_affine import make_qkx3_quants, new_scratch

QK = 32
QH_AT = 4
Q4_1_QS_AT, Q5_1_QS_AT = 4, 8  # Q5_1 has qh before qs
Q4_1_BYTES, Q5_1_BYTES = Q4_1_QS_AT + QK // 2, Q5_1_QS_AT + QK // 2
BATCH = 8  # blocks searched together (see search_affine)


@njit(cache=True, inline="always")
def _ref_level(v: np.float32, nmax: int) -> int:
    """C's (uint8_t)v for Q5_1, MIN(15, (int8_t)v) stored as uint8 for Q4_1 (a negative int8 passes
    the MIN). Both take the low byte of x86's cvttss2si (INT_MIN for NaN and overflow); written as
    selects so that the level loop vectorizes."""
    in_range = v > F32(-2147483648.0) and v < F32(2147483648.0)
    b = np.int32(np.int32(v if in_range else F32(-2147483648.0)) & np.int32(0xFF))
    clamped = min(b, np.int32(15)) if b < np.int32(128) else b
    return clamped if nmax == 15 else b


@njit(cache=True, inline="always")
def _store_levels(L: np.ndarray, lo: int, bits: int, out: np.ndarray, ob: int) -> None:
    """Pack the 32 levels at L[lo:] into the qs nibbles (and for Q5_1 the qh bits) of the block at out[ob:]."""
    if bits == 4:
        for j in range(QK // 2):
            out[ob + Q4_1_QS_AT + j] = L[lo + j] | (L[lo + j + QK // 2] << 4)
        return
    qh = 0
    for j in range(QK // 2):
        l0 = np.int64(L[lo + j])
        l1 = np.int64(L[lo + j + QK // 2])
        out[ob + Q5_1_QS_AT + j] = (l0 & 0x0F) | ((l1 & 0x0F) << 4)
        qh |= ((l0 & 0x10) >> 4) << j
        qh |= ((l1 & 0x10) >> 4) << (j + QK // 2)
    for k in range(4):
        out[ob + QH_AT + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True, inline="always")
def _first_zero(x: np.ndarray, xo: int) -> np.float32:
    """The block's first ±0.0 (the block holds one)."""
    for j in range(QK):
        if x[xo + j] == F32(0.0):
            return x[xo + j]
    return F32(0.0)


@njit(cache=True, inline="always")
def _min_max(x: np.ndarray, xo: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.float32, np.float32]:
    """ggml's running min and max of the block, from 8 lanes (lo/hi: scratch of 8) of 4 weights each.

    Finite values that compare equal are the same float except ±0.0, so any order of comparisons
    gives ggml's value, and only a zero result needs ggml's order: its strict `<` / `>` keep the
    first zero of the block (the sign is stored in m, or reaches d through max - min)."""
    for r in range(8):
        a, b, c, e = x[xo + r], x[xo + 8 + r], x[xo + 16 + r], x[xo + 24 + r]
        lo[r] = min(min(a, b), min(c, e))
        hi[r] = max(max(a, b), max(c, e))
    fmin = min(min(min(lo[0], lo[1]), min(lo[2], lo[3])), min(min(lo[4], lo[5]), min(lo[6], lo[7])))
    fmax = max(max(max(hi[0], hi[1]), max(hi[2], hi[3])), max(max(hi[4], hi[5]), max(hi[6], hi[7])))
    if fmin == F32(0.0):
        fmin = _first_zero(x, xo)
    if fmax == F32(0.0):
        fmax = _first_zero(x, xo)
    return fmin, fmax


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_ref(x: np.ndarray, bits: int, out: np.ndarray) -> None:
    """quantize_row_q{4,5}_1_ref, levels packed as they are made; inlined so that `bits` is a constant."""
    nmax = (1 << bits) - 1
    block_bytes = Q4_1_BYTES if bits == 4 else Q5_1_BYTES
    lo = np.empty(8, dtype=np.float32)
    hi = np.empty(8, dtype=np.float32)
    for ib in range(x.size // QK):
        xo = ib * QK
        ob = ib * block_bytes
        fmin, fmax = _min_max(x, xo, lo, hi)
        d = F32(F32(fmax - fmin) / F32(nmax))
        inv_d = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
        store_fp16(out, ob, d)
        store_fp16(out, ob + 2, fmin)
        qh = 0
        for j in range(QK // 2):
            l0 = _ref_level(F32(F32(F32(x[xo + j] - fmin) * inv_d) + F32(0.5)), nmax)
            l1 = _ref_level(F32(F32(F32(x[xo + j + QK // 2] - fmin) * inv_d) + F32(0.5)), nmax)
            if bits == 4:
                out[ob + Q4_1_QS_AT + j] = (l0 | (l1 << 4)) & 0xFF
            else:
                out[ob + Q5_1_QS_AT + j] = (l0 & 0x0F) | ((l1 & 0x0F) << 4)
                qh |= (((l0 >> 4) & 1) << j) | (((l1 >> 4) & 1) << (j + QK // 2))
        if bits == 5:
            for k in range(4):
                out[ob + QH_AT + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True, error_model="numpy")
def _quantize_impl(x: np.ndarray, importance: np.ndarray, bits: int, out: np.ndarray) -> None:
    """quantize_row_q{4,5}_1_impl: σ² spans the whole row, so weights are computed before the blocks."""
    block_bytes = Q4_1_BYTES if bits == 4 else Q5_1_BYTES
    sum_x2 = F32(0.0)
    for v in x:
        sum_x2 = F32(sum_x2 + F32(v * v))
    sigma2 = F32(sum_x2 / F32(x.size))
    weights = np.empty(x.size, dtype=np.float32)
    for j in range(x.size):
        weights[j] = F32(importance[j] * np.sqrt(F32(sigma2 + F32(x[j] * x[j]))))
    L = np.empty(BATCH * QK, dtype=np.uint8)
    scales = np.empty(BATCH, dtype=np.float32)
    mins = np.empty(BATCH, dtype=np.float32)
    scratch = new_scratch()
    nb = x.size // QK
    for first in range(0, nb, BATCH):
        groups = min(BATCH, nb - first)
        lo = first * QK
        hi = lo + groups * QK
        make_qkx3_quants(
            groups, QK, (1 << bits) - 1, x[lo:hi], weights[lo:hi], L, F32(-0.9), F32(0.05), 36, False,
            scales, mins, scratch,
        )
        for g in range(groups):
            ob = (first + g) * block_bytes
            store_fp16(out, ob, scales[g])
            store_fp16(out, ob + 2, -mins[g])
            _store_levels(L, g * QK, bits, out, ob)


@njit(cache=True, inline="always")
def _quantize_row(x: np.ndarray, importance: np.ndarray, bits: int, out: np.ndarray) -> None:
    if importance.size == 0:
        _quantize_ref(x, bits, out)
    else:
        _quantize_impl(x, importance, bits, out)


@njit(cache=True)
def _dequantize_row(data: np.ndarray, bits: int, out: np.ndarray) -> None:
    block_bytes = Q4_1_BYTES if bits == 4 else Q5_1_BYTES
    qs_at = Q4_1_QS_AT if bits == 4 else Q5_1_QS_AT
    for ib in range(out.size // QK):
        b0 = ib * block_bytes
        y = out[ib * QK : (ib + 1) * QK]
        d = load_fp16(data, b0)
        m = load_fp16(data, b0 + 2)
        qh = 0
        if bits == 5:
            for k in range(4):
                qh |= np.int64(data[b0 + QH_AT + k]) << (8 * k)
        for j in range(QK // 2):
            lo = np.int64(data[b0 + qs_at + j])
            q0 = (lo & 0x0F) | (((qh >> j) << 4) & 0x10)
            q1 = (lo >> 4) | ((qh >> (j + 12)) & 0x10)
            y[j] = F32(F32(F32(q0) * d) + m)
            y[j + QK // 2] = F32(F32(F32(q1) * d) + m)


@njit(cache=True)
def quantize_row_q4_1(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    _quantize_row(x, importance, 4, out)


@njit(cache=True)
def quantize_row_q5_1(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    _quantize_row(x, importance, 5, out)


@njit(cache=True)
def dequantize_row_q4_1(data: np.ndarray, out: np.ndarray) -> None:
    _dequantize_row(data, 4, out)


@njit(cache=True)
def dequantize_row_q5_1(data: np.ndarray, out: np.ndarray) -> None:
    _dequantize_row(data, 5, out)
