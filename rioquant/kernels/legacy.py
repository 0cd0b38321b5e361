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
from rioquant.kernels.search_symmetric import group_max, make_qx_quants

QK = 32
Q4_0_BYTES = 2 + QK // 2
Q5_0_BYTES = 2 + 4 + QK // 2


@njit(cache=True, error_model="numpy", inline="always")
def _truncate_to_int8(v: np.float32) -> int:
    """C's (int8_t)v as gcc emits it on x86: cvttss2si (INT32_MIN for NaN or out of range), low byte."""
    in_range = F32(-2147483648.0) <= v < F32(2147483648.0)
    b = (np.int64(v) if in_range else 0) & 0xFF  # a select, so the level loop vectorises
    return b - 256 if b > 127 else b


@njit(cache=True, error_model="numpy")
def _ref_levels(x: np.ndarray, nmax: int, out: np.ndarray, block_bytes: int, L: np.ndarray) -> None:
    """_ref: per block d = max/-nmax (written at the block's start) and the levels
    min(2·nmax-1, int8(x/d + nmax + ½)), computed as x·(1/d) like ggml."""
    xg = x.reshape(-1, QK)  # (blocks, 32)
    inv_d = np.empty(x.size, dtype=np.float32)  # per weight, so the level loop is one vector loop
    for ib in range(xg.shape[0]):
        _, vmax = group_max(xg, ib)
        d = F32(vmax / F32(-nmax))
        store_fp16(out, ib * block_bytes, d)
        inv = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
        for i in range(QK):
            inv_d[ib * QK + i] = inv
    offset = F32(F32(nmax) + F32(0.5))
    levels = L.reshape(x.size)
    for k in range(x.size):
        levels[k] = np.uint8(min(2 * nmax - 1, _truncate_to_int8(F32(F32(x[k] * inv_d[k]) + offset))) & 0xFF)


@njit(cache=True, error_model="numpy")
def _row_sigma2(x: np.ndarray) -> np.float32:
    """ggml's Σx²/n over the whole row, summed in order."""
    sum_x2 = F32(0.0)
    for v in x:
        sum_x2 += F32(v * v)
    return F32(sum_x2 / F32(x.size))


@njit(cache=True, error_model="numpy")
def _levels(
    x: np.ndarray, importance: np.ndarray, nmax: int, out: np.ndarray, block_bytes: int
) -> np.ndarray:
    """Every block's scale (written at the block's start) and levels 0..2·nmax-1, (blocks, 32)."""
    xg = x.reshape(-1, QK)  # (blocks, 32)
    L = np.empty(xg.shape, dtype=np.uint8)
    if importance.size == 0:
        _ref_levels(x, nmax, out, block_bytes, L)
        return L
    qwg = importance.reshape(-1, QK)
    weight = np.empty(xg.shape, dtype=np.float32)
    sigma2 = _row_sigma2(x)
    for ib in range(xg.shape[0]):
        for i in range(QK):
            v = xg[ib, i]
            weight[ib, i] = F32(qwg[ib, i] * F32(np.sqrt(F32(sigma2 + F32(v * v)))))
    d = np.empty(xg.shape[0], dtype=np.float32)
    make_qx_quants(nmax, xg, L, d, 1, weight)
    for ib in range(xg.shape[0]):
        store_fp16(out, ib * block_bytes, d[ib])
    return L


@njit(cache=True, error_model="numpy")
def _pack_q4(L: np.ndarray, out: np.ndarray) -> None:
    for ib in range(L.shape[0]):
        b0 = ib * Q4_0_BYTES
        for j in range(QK // 2):
            out[b0 + 2 + j] = np.uint8((np.int64(L[ib, j]) | (np.int64(L[ib, j + 16]) << 4)) & 0xFF)


@njit(cache=True, error_model="numpy")
def _pack_q5(L: np.ndarray, out: np.ndarray) -> None:
    for ib in range(L.shape[0]):
        b0 = ib * Q5_0_BYTES
        qh = 0
        for j in range(QK // 2):
            lo = np.int64(L[ib, j])
            hi = np.int64(L[ib, j + 16])
            out[b0 + 6 + j] = np.uint8((lo & 0x0F) | ((hi & 0x0F) << 4))
            qh |= ((lo & 0x10) >> 4) << j
            qh |= ((hi & 0x10) >> 4) << (j + 16)
        for k in range(4):
            out[b0 + 2 + k] = np.uint8((qh >> (8 * k)) & 0xFF)


@njit(cache=True, error_model="numpy")
def quantize_row_q4_0(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    _pack_q4(_levels(x, importance, 8, out, Q4_0_BYTES), out)


@njit(cache=True, error_model="numpy")
def quantize_row_q5_0(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    _pack_q5(_levels(x, importance, 16, out, Q5_0_BYTES), out)


@njit(cache=True, error_model="numpy")
def dequantize_row_q4_0(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK):
        b0 = ib * Q4_0_BYTES
        d = load_fp16(data, b0)
        for j in range(QK // 2):
            q = np.int64(data[b0 + 2 + j])
            out[ib * QK + j] = F32(F32((q & 0x0F) - 8) * d)
            out[ib * QK + j + 16] = F32(F32((q >> 4) - 8) * d)


@njit(cache=True, error_model="numpy")
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
