"""Q3_K: super-blocks of 256 weights, 16 groups of 16 with 6-bit scales (ggml quantize_row_q3_K_*).

Block layout (110 bytes):  hmask: u8[32] | qs: u8[64] | scales: u8[12] | d: fp16
    hmask: bit k of byte m is set when weight 32k+m has level ≥ 4 (so its offset is 0, not -4)
    qs:    low 2 bits; byte l of each 32-byte quarter-pair holds weights l, l+32, l+64, l+96 of that
           128-weight half at bits 0, 2, 4, 6
    scales (6 bits each, stored + 32):
        bytes 0-7:  low nibble = scale j (j < 8), high nibble = scale j+8
        bytes 8-11: byte 8+k holds the top 2 bits of scales k, k+4, k+8, k+12 at bits 0, 2, 4, 6
    weight = d · (scale - 32) · (low2 - (0 if hmask bit else 4))
Without importance ggml takes quantize_row_q3_K_ref (make_q3_quants per group, scales scaled by
-32/max); with it, quantize_row_q3_K_impl (weights qw·√(σ² + x²), make_qx_quants for the levels
and again, weighted by each group's total weight, for the 6-bit scales).
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, nearest_int, store_fp16
from rioquant.kernels.search_symmetric import make_q3_quants, make_qx_quants, new_scratch

QK_K = 256
GROUP = 16
N_GROUPS = QK_K // GROUP
HMASK, QS, SCALES, D = 0, QK_K // 8, QK_K // 8 + QK_K // 4, QK_K // 8 + QK_K // 4 + 12
BLOCK_BYTES = D + 2


@njit(cache=True, inline="always")
def _pack_scale(out: np.ndarray, b0: int, j: int, l: int) -> None:
    """OR the 6-bit code l (0..63) of group j into the zeroed 12 scale bytes."""
    s = b0 + SCALES
    if j < 8:
        out[s + j] = np.uint8(l & 0xF)
    else:
        out[s + j - 8] |= np.uint8((l & 0xF) << 4)
    out[s + 8 + j % 4] |= np.uint8((l >> 4) << (2 * (j // 4)))


@njit(cache=True, inline="always")
def _unpack_scale(data: np.ndarray, b0: int, j: int) -> int:
    """Group j's signed scale, -32..31."""
    s = b0 + SCALES
    low = np.int64(data[s + j] & 0xF) if j < 8 else np.int64(data[s + j - 8] >> 4)
    return (low | ((np.int64(data[s + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4) - 32


@njit(cache=True)
def _finish_block(x: np.ndarray, x0: int, L: np.ndarray, out: np.ndarray, b0: int) -> None:
    """Requantize each group against its stored (rounded) scale, then pack hmask and qs.

    Groups whose stored scale is 0 keep the levels of the search, as in ggml.
    """
    d_super = load_fp16(out, b0 + D)
    for j in range(N_GROUPS):
        d = F32(d_super * F32(_unpack_scale(out, b0, j)))
        if d == F32(0.0):
            continue
        for i in range(GROUP * j, GROUP * j + GROUP):
            L[i] = max(-4, min(3, nearest_int(F32(x[x0 + i] / d)))) + 4

    out[b0 + HMASK : b0 + HMASK + QK_K // 8] = 0
    for j in range(QK_K):
        if L[j] > 3:
            out[b0 + HMASK + j % 32] |= np.uint8(1 << (j // 32))
            L[j] -= 4
    for half in range(2):
        qs = b0 + QS + 32 * half
        l0 = 128 * half
        for l in range(32):
            out[qs + l] = np.uint8(
                np.int64(L[l0 + l])
                | (np.int64(L[l0 + l + 32]) << 2)
                | (np.int64(L[l0 + l + 64]) << 4)
                | (np.int64(L[l0 + l + 96]) << 6)
            )


@njit(cache=True)
def _quantize_block_ref(x: np.ndarray, x0: int, L: np.ndarray, scales: np.ndarray, out: np.ndarray, b0: int) -> None:
    max_scale = F32(0.0)
    amax = F32(0.0)
    for j in range(N_GROUPS):
        scales[j] = make_q3_quants(GROUP, 4, x, x0 + GROUP * j, L, GROUP * j, True)
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    out[b0 + SCALES : b0 + SCALES + 12] = 0
    if max_scale != F32(0.0):
        iscale = F32(F32(-32.0) / max_scale)
        for j in range(N_GROUPS):
            l = nearest_int(F32(iscale * scales[j])) & 0xFF  # ggml stores it in an int8 first
            l = l - 256 if l > 127 else l
            _pack_scale(out, b0, j, max(-32, min(31, l)) + 32)
        store_fp16(out, b0 + D, F32(F32(1.0) / iscale))
    else:
        store_fp16(out, b0 + D, F32(0.0))


@njit(cache=True)
def _quantize_block_impl(
    x: np.ndarray,
    x0: int,
    qw: np.ndarray,
    L: np.ndarray,
    scales: np.ndarray,
    weight: np.ndarray,
    sw: np.ndarray,
    Ls: np.ndarray,
    scratch: np.ndarray,
    out: np.ndarray,
    b0: int,
) -> None:
    sumx2 = F32(0.0)
    for i in range(x0, x0 + QK_K):
        sumx2 += F32(x[i] * x[i])
    sigma2 = F32(F32(F32(2.0) * sumx2) / F32(QK_K))
    for j in range(N_GROUPS):
        g0 = x0 + GROUP * j
        sumw = F32(0.0)
        for l in range(GROUP):
            v = x[g0 + l]
            weight[l] = F32(qw[g0 + l] * F32(np.sqrt(F32(sigma2 + F32(v * v)))))
            sumw += weight[l]
        sw[j] = sumw
        scales[j] = make_qx_quants(GROUP, 4, x, g0, L, GROUP * j, 1, weight, 0, scratch)
    out[b0 + SCALES : b0 + SCALES + 12] = 0
    d_block = make_qx_quants(N_GROUPS, 32, scales, 0, Ls, 0, 1, sw, 0, scratch)
    for j in range(N_GROUPS):
        _pack_scale(out, b0, j, np.int64(Ls[j]))
    store_fp16(out, b0 + D, d_block)


@njit(cache=True)
def quantize_row_q3_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK_K, dtype=np.int8)
    scales = np.empty(N_GROUPS, dtype=np.float32)
    weight = np.empty(GROUP, dtype=np.float32)
    sw = np.empty(N_GROUPS, dtype=np.float32)
    Ls = np.empty(N_GROUPS, dtype=np.int8)
    scratch = new_scratch()
    for ib in range(x.size // QK_K):
        x0 = ib * QK_K
        b0 = ib * BLOCK_BYTES
        if importance.size == 0:
            _quantize_block_ref(x, x0, L, scales, out, b0)
        else:
            _quantize_block_impl(x, x0, importance, L, scales, weight, sw, Ls, scratch, out, b0)
        _finish_block(x, x0, L, out, b0)


@njit(cache=True)
def dequantize_row_q3_k(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK_K):
        b0 = ib * BLOCK_BYTES
        d_super = load_fp16(data, b0 + D)
        for j in range(N_GROUPS):
            dl = F32(d_super * F32(_unpack_scale(data, b0, j)))
            for i in range(GROUP * j, GROUP * j + GROUP):
                low = (np.int64(data[b0 + QS + 32 * (i // 128) + i % 32]) >> (2 * ((i % 128) // 32))) & 3
                high = 0 if data[b0 + HMASK + i % 32] & (1 << (i // 32)) else 4
                out[ib * QK_K + i] = F32(dl * F32(low - high))
