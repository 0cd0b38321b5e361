"""Q3_K: super-blocks of 256 weights, 16 groups of 16 with 6-bit scales (ggml quantize_row_q3_K_*).

Block layout (110 bytes):  hmask: u8[32] | qs: u8[64] | scales: u8[12] | d: fp16
    hmask: bit k of byte m is set when weight 32k+m has level ≥ 4 (so its offset is 0, not -4)
    qs:    low 2 bits; byte l of each 32-byte half holds weights l, l+32, l+64, l+96 of that
           128-weight half at bits 0, 2, 4, 6
    scales: 6-bit codes c_j = scale_j + 32
        bytes 0-7:  low nibble = c_j (j < 8), high nibble = c_(j+8)
        bytes 8-11: byte 8+k holds the top 2 bits of c_k, c_(k+4), c_(k+8), c_(k+12) at bits 0, 2, 4, 6
    weight = d · (c_j - 32) · (low2 - (0 if hmask bit else 4))
Without importance ggml takes quantize_row_q3_K_ref (make_q3_quants per group, scales scaled by
-32/max); with it, quantize_row_q3_K_impl (weights qw·√(σ² + x²), make_qx_quants for the levels
and again, weighted by each group's total weight, for the 6-bit scales).

Rows go through in phases — search all groups, code all scales, requantize all weights, pack — so
each phase is one long loop the compiler can vectorise; the bytes are ggml's, block by block.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, nearest_int, signed_max_abs, store_fp16
from rioquant.kernels.search_symmetric import make_q3_quants, make_qx_quants, requantize

QK_K = 256
GROUP = 16
N_GROUPS = QK_K // GROUP
HMASK, QS, SCALES, D = 0, QK_K // 8, QK_K // 8 + QK_K // 4, QK_K // 8 + QK_K // 4 + 12
BLOCK_BYTES = D + 2


@njit(cache=True, error_model="numpy")
def _code_scales_ref(scales: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:
    """_ref: per block, 6-bit codes of the group scales over the largest (signed) one, and d."""
    for ib in range(scales.size // N_GROUPS):
        g0 = ib * N_GROUPS
        max_scale, _ = signed_max_abs(scales[g0 : g0 + N_GROUPS])
        if max_scale != F32(0.0):
            iscale = F32(F32(-32.0) / max_scale)
            for j in range(N_GROUPS):
                l = nearest_int(F32(iscale * scales[g0 + j])) & 0xFF  # ggml stores it in an int8 first
                codes[g0 + j] = max(-32, min(31, l - 256 if l > 127 else l)) + 32
            store_fp16(out, ib * BLOCK_BYTES + D, F32(F32(1.0) / iscale))
        else:  # scale bytes stay zero
            codes[g0 : g0 + N_GROUPS] = 0
            store_fp16(out, ib * BLOCK_BYTES + D, F32(0.0))


@njit(cache=True, error_model="numpy")
def _impl_weights(xg: np.ndarray, qwg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_impl's weights qw·√(σ² + x²), σ² = 2·Σx²/256 per block, and their sum per group."""
    weight = np.empty(xg.shape, dtype=np.float32)
    group_weight = np.empty(xg.shape[0], dtype=np.float32)
    for g0 in range(0, xg.shape[0], N_GROUPS):
        sumx2 = F32(0.0)
        for g in range(g0, g0 + N_GROUPS):
            for i in range(GROUP):
                sumx2 += F32(xg[g, i] * xg[g, i])
        sigma2 = F32(F32(F32(2.0) * sumx2) / F32(QK_K))
        for g in range(g0, g0 + N_GROUPS):
            sumw = F32(0.0)
            for i in range(GROUP):
                v = xg[g, i]
                weight[g, i] = F32(qwg[g, i] * F32(np.sqrt(F32(sigma2 + F32(v * v)))))
                sumw += weight[g, i]
            group_weight[g] = sumw
    return weight, group_weight


@njit(cache=True, error_model="numpy")
def _pack(codes: np.ndarray, levels: np.ndarray, out: np.ndarray) -> None:
    for ib in range(codes.size // N_GROUPS):
        b0 = ib * BLOCK_BYTES
        c = codes[ib * N_GROUPS : (ib + 1) * N_GROUPS]
        for k in range(8):
            out[b0 + SCALES + k] = np.uint8((c[k] & 0xF) | ((c[k + 8] & 0xF) << 4))
        for k in range(4):
            out[b0 + SCALES + 8 + k] = np.uint8(
                (c[k] >> 4) | ((c[k + 4] >> 4) << 2) | ((c[k + 8] >> 4) << 4) | ((c[k + 12] >> 4) << 6)
            )
        lv = levels[ib * QK_K : (ib + 1) * QK_K]  # each 0..7: bit 2 to hmask, bits 0-1 to qs
        for m in range(32):
            bits = 0
            for k in range(8):
                bits |= (np.int64(lv[32 * k + m]) >> 2) << k
            out[b0 + HMASK + m] = np.uint8(bits)
        for half in range(2):
            for l in range(32):
                j = 128 * half + l
                out[b0 + QS + 32 * half + l] = np.uint8(
                    (np.int64(lv[j]) & 3)
                    | ((np.int64(lv[j + 32]) & 3) << 2)
                    | ((np.int64(lv[j + 64]) & 3) << 4)
                    | ((np.int64(lv[j + 96]) & 3) << 6)
                )


@njit(cache=True, error_model="numpy")
def quantize_row_q3_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    xg = x.reshape(-1, GROUP)  # (groups, 16)
    n_groups = xg.shape[0]
    L = np.empty(xg.shape, dtype=np.int8)
    scales = np.empty(n_groups, dtype=np.float32)
    codes = np.empty(n_groups, dtype=np.int64)
    if importance.size == 0:
        make_q3_quants(4, xg, L, scales, True)
        _code_scales_ref(scales, codes, out)
    else:
        weight, group_weight = _impl_weights(xg, importance.reshape(-1, GROUP))
        make_qx_quants(4, xg, L, scales, 1, weight)
        # second level: each block's 16 scales are one group, weighted by the groups' total weights
        n_blocks = n_groups // N_GROUPS
        Ls = np.empty((n_blocks, N_GROUPS), dtype=np.int8)
        d_blocks = np.empty(n_blocks, dtype=np.float32)
        block_scales = scales.reshape(n_blocks, N_GROUPS)
        make_qx_quants(32, block_scales, Ls, d_blocks, 1, group_weight.reshape(n_blocks, N_GROUPS))
        for ib in range(n_blocks):
            store_fp16(out, ib * BLOCK_BYTES + D, d_blocks[ib])
        codes[:] = Ls.reshape(n_groups)
    group_step = np.empty(n_groups, dtype=np.float32)  # d·(code - 32), as ggml re-reads it
    for g in range(n_groups):
        group_step[g] = F32(load_fp16(out, (g // N_GROUPS) * BLOCK_BYTES + D) * F32(codes[g] - 32))
    levels = L.reshape(x.size)
    requantize(x, group_step, 4, levels)
    _pack(codes, levels, out)


@njit(cache=True, error_model="numpy")
def dequantize_row_q3_k(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK_K):
        b0 = ib * BLOCK_BYTES
        d_super = load_fp16(data, b0 + D)
        for j in range(N_GROUPS):
            low4 = np.int64(data[b0 + SCALES + j % 8]) >> (4 * (j // 8)) & 0xF
            high2 = np.int64(data[b0 + SCALES + 8 + j % 4]) >> (2 * (j // 4)) & 3
            dl = F32(d_super * F32((low4 | (high2 << 4)) - 32))
            for i in range(GROUP * j, GROUP * j + GROUP):
                low = (np.int64(data[b0 + QS + 32 * (i // 128) + i % 32]) >> (2 * ((i % 128) // 32))) & 3
                high = 0 if data[b0 + HMASK + i % 32] & (1 << (i // 32)) else 4
                out[ib * QK_K + i] = F32(dl * F32(low - high))
