"""Q4_0 and Q5_0: blocks of 32 weights with one fp16 scale (ggml quantize_row_q{4,5}_0_*).

llama.cpp falls back to these for rows whose length is not a multiple of 256 (Q2_K/Q3_K → Q4_0,
Q4_K → Q5_0), so they must match ggml as exactly as the K types.

Q4_0 block (18 bytes):  d: fp16 | qs: u8[16]
    qs[j] = level of weight j (low nibble) | level of weight j+16 (high nibble); weight = d·(q - 8)
Q5_0 block (22 bytes):  d: fp16 | qh: u32 little-endian | qs: u8[16]
    qs as Q4_0 with the low 4 bits; bit j of qh is bit 4 of weight j's level; weight = d·(q - 16)

Without importance ggml's _ref takes d = max/-8 (or -16) and truncates x/d + 8.5 (16.5) to int8;
with it, _impl searches the scale with make_qx_quants, weights qw·√(σ² + x²) with σ² over the row.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, store_fp16
from rioquant.kernels.search_symmetric import make_qx_quants, new_scratch

QK = 32
Q4_0_BYTES = 2 + QK // 2
Q5_0_BYTES = 2 + 4 + QK // 2


@njit(cache=True, inline="always")
def _truncate_to_int8(v: np.float32) -> int:
    """C's (int8_t)v as gcc emits it on x86: cvttss2si (INT32_MIN for NaN or out of range), low byte."""
    if not (F32(-2147483648.0) <= v < F32(2147483648.0)):
        return 0  # the low byte of INT32_MIN
    b = np.int64(v) & 0xFF
    return b - 256 if b > 127 else b


@njit(cache=True)
def _ref_levels(x: np.ndarray, x0: int, nmax: int, out: np.ndarray, b0: int, L: np.ndarray) -> None:
    """Write d = max/-nmax at out[b0] and the levels min(2·nmax-1, int8(x/d + nmax + ½)) into L."""
    amax = F32(0.0)
    vmax = F32(0.0)
    for i in range(x0, x0 + QK):
        if amax < abs(x[i]):
            amax = abs(x[i])
            vmax = x[i]
    d = F32(vmax / F32(-nmax))
    inv_d = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
    store_fp16(out, b0, d)
    offset = F32(F32(nmax) + F32(0.5))
    for i in range(QK):
        L[i] = np.uint8(min(2 * nmax - 1, _truncate_to_int8(F32(F32(x[x0 + i] * inv_d) + offset))) & 0xFF)


@njit(cache=True)
def _impl_levels(
    x: np.ndarray, x0: int, qw: np.ndarray, sigma2: np.float32, nmax: int, out: np.ndarray, b0: int,
    L: np.ndarray, weight: np.ndarray, scratch: np.ndarray,
) -> None:
    """Write the searched scale at out[b0] and the levels (0..2·nmax-1) into L."""
    for i in range(QK):
        v = x[x0 + i]
        weight[i] = F32(qw[x0 + i] * F32(np.sqrt(F32(sigma2 + F32(v * v)))))
    store_fp16(out, b0, make_qx_quants(QK, nmax, x, x0, L, 0, 1, weight, 0, scratch))


@njit(cache=True)
def _row_sigma2(x: np.ndarray) -> np.float32:
    """ggml's Σx²/n over the whole row, summed in order."""
    sum_x2 = F32(0.0)
    for v in x:
        sum_x2 += F32(v * v)
    return F32(sum_x2 / F32(x.size))


@njit(cache=True)
def quantize_row_q4_0(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK, dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    scratch = new_scratch()
    sigma2 = _row_sigma2(x) if importance.size != 0 else F32(0.0)
    for ib in range(x.size // QK):
        b0 = ib * Q4_0_BYTES
        if importance.size == 0:
            _ref_levels(x, ib * QK, 8, out, b0, L)
        else:
            _impl_levels(x, ib * QK, importance, sigma2, 8, out, b0, L, weight, scratch)
        for j in range(QK // 2):
            out[b0 + 2 + j] = np.uint8((L[j] | (L[j + 16] << 4)) & 0xFF)


@njit(cache=True)
def quantize_row_q5_0(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK, dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    scratch = new_scratch()
    sigma2 = _row_sigma2(x) if importance.size != 0 else F32(0.0)
    for ib in range(x.size // QK):
        b0 = ib * Q5_0_BYTES
        if importance.size == 0:
            _ref_levels(x, ib * QK, 16, out, b0, L)
        else:
            _impl_levels(x, ib * QK, importance, sigma2, 16, out, b0, L, weight, scratch)
        qh = 0
        for j in range(QK // 2):
            lo = np.int64(L[j])
            hi = np.int64(L[j + 16])
            out[b0 + 6 + j] = np.uint8((lo & 0x0F) | ((hi & 0x0F) << 4))
            qh |= ((lo & 0x10) >> 4) << j
            qh |= ((hi & 0x10) >> 4) << (j + 16)
        for k in range(4):
            out[b0 + 2 + k] = np.uint8((qh >> (8 * k)) & 0xFF)


@njit(cache=True)
def dequantize_row_q4_0(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK):
        b0 = ib * Q4_0_BYTES
        d = load_fp16(data, b0)
        for j in range(QK // 2):
            q = np.int64(data[b0 + 2 + j])
            out[ib * QK + j] = F32(F32((q & 0x0F) - 8) * d)
            out[ib * QK + j + 16] = F32(F32((q >> 4) - 8) * d)


@njit(cache=True)
def dequantize_row_q5_0(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK):
        b0 = ib * Q5_0_BYTES
        d = load_fp16(data, b0)
        qh = 0
        for k in range(4):
            qh |= np.int64(data[b0 + 2 + k]) << (8 * k)
        for j in range(QK // 2):
            q = np.int64(data[b0 + 6 + j])
            lo = (q & 0x0F) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[ib * QK + j] = F32(F32(lo - 16) * d)
            out[ib * QK + j + 16] = F32(F32(hi - 16) * d)
