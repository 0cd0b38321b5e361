"""Q6_K: super-blocks of 256 weights, 16 groups of 16 with int8 scales (ggml quantize_row_q6_K_*).

Block layout (210 bytes):  ql: u8[128] | qh: u8[64] | scales: i8[16] | d: fp16
    ql: low 4 bits; byte l of each 64-byte half holds weights l (low nibble) and l+64 (high),
        byte l+32 holds weights l+32 and l+96 (of that 128-weight half)
    qh: top 2 bits; byte l of each 32-byte half holds weights l, l+32, l+64, l+96 at bits 0, 2, 4, 6
    weight = d · scales[g] · (q - 32)
Without importance ggml takes quantize_row_q6_K_ref; with it, quantize_row_q6_K_impl, which differs
only in weighting each group's scale search by the importance itself.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, GROUP_MAX_EPS, load_fp16, nearest_int, signed_max_abs, store_fp16
from rioquant.kernels.search_symmetric import make_qx_quants, requantize

QK_K = 256
GROUP = 16
N_GROUPS = QK_K // GROUP
QL, QH, SCALES, D = 0, QK_K // 2, QK_K // 2 + QK_K // 4, QK_K // 2 + QK_K // 4 + N_GROUPS
BLOCK_BYTES = D + 2


@njit(cache=True, error_model="numpy")
def _code_scales(scales: np.ndarray, out: np.ndarray, group_step: np.ndarray) -> np.ndarray:
    """Per block: int8 scale codes over the largest (signed) group scale, and d; each group's step
    d·code (as ggml re-reads it) goes to group_step. Returns which blocks are all zero."""
    n_blocks = scales.size // N_GROUPS
    zero = np.zeros(n_blocks, dtype=np.bool_)
    for ib in range(n_blocks):
        b0 = ib * BLOCK_BYTES
        g0 = ib * N_GROUPS
        max_scale, max_abs_scale = signed_max_abs(scales[g0 : g0 + N_GROUPS])
        if max_abs_scale < GROUP_MAX_EPS:
            zero[ib] = True
            group_step[g0 : g0 + N_GROUPS] = F32(0.0)
            continue
        iscale = F32(F32(-128.0) / max_scale)
        store_fp16(out, b0 + D, F32(F32(1.0) / iscale))
        d_super = load_fp16(out, b0 + D)
        for j in range(N_GROUPS):
            sc = min(127, nearest_int(F32(iscale * scales[g0 + j]))) & 0xFF
            out[b0 + SCALES + j] = np.uint8(sc)
            group_step[g0 + j] = F32(d_super * F32(sc - 256 if sc > 127 else sc))  # the int8 ggml stored
    return zero


@njit(cache=True, error_model="numpy")
def quantize_row_q6_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    xg = x.reshape(-1, GROUP)  # (groups, 16)
    qwg = importance.reshape(-1, GROUP)  # (groups, 16), or (0, 16): ggml's NULL, i.e. the _ref path
    L = np.empty(xg.shape, dtype=np.int8)
    scales = np.empty(xg.shape[0], dtype=np.float32)
    make_qx_quants(32, xg, L, scales, 1, qwg)
    group_step = np.empty(xg.shape[0], dtype=np.float32)
    zero = _code_scales(scales, out, group_step)
    levels = L.reshape(x.size)
    requantize(x, group_step, 32, levels)

    for ib in range(zero.size):
        b0 = ib * BLOCK_BYTES
        if zero[ib]:
            out[b0 : b0 + BLOCK_BYTES] = 0
            continue
        lv = levels[ib * QK_K : (ib + 1) * QK_K]
        for half in range(2):
            ql = b0 + QL + 64 * half
            qh = b0 + QH + 32 * half
            l0 = 128 * half
            for l in range(32):
                q1 = np.int64(lv[l0 + l])
                q2 = np.int64(lv[l0 + l + 32])
                q3 = np.int64(lv[l0 + l + 64])
                q4 = np.int64(lv[l0 + l + 96])
                out[ql + l] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                out[ql + l + 32] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                out[qh + l] = np.uint8((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


@njit(cache=True, error_model="numpy")
def dequantize_row_q6_k(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK_K):
        b0 = ib * BLOCK_BYTES
        d = load_fp16(data, b0 + D)
        for half in range(2):
            ql = b0 + QL + 64 * half
            qh = b0 + QH + 32 * half
            sc = b0 + SCALES + 8 * half
            y = ib * QK_K + 128 * half
            for l in range(32):
                lo1 = np.int64(data[ql + l])
                lo2 = np.int64(data[ql + l + 32])
                hi = np.int64(data[qh + l])
                q = (
                    (lo1 & 0xF) | ((hi & 3) << 4),
                    (lo2 & 0xF) | (((hi >> 2) & 3) << 4),
                    (lo1 >> 4) | (((hi >> 4) & 3) << 4),
                    (lo2 >> 4) | (((hi >> 6) & 3) << 4),
                )
                for k in range(4):
                    s = np.int64(data[sc + l // 16 + 2 * k])
                    s = s - 256 if s > 127 else s
                    out[y + l + 32 * k] = F32(F32(d * F32(s)) * F32(q[k] - 32))
