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

from rioquant.kernels.common import F32, GROUP_MAX_EPS, load_fp16, nearest_int, store_fp16
from rioquant.kernels.search_symmetric import make_qx_quants, new_scratch

QK_K = 256
GROUP = 16
N_GROUPS = QK_K // GROUP
QL, QH, SCALES, D = 0, QK_K // 2, QK_K // 2 + QK_K // 4, QK_K // 2 + QK_K // 4 + N_GROUPS
BLOCK_BYTES = D + 2


@njit(cache=True)
def quantize_row_q6_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK_K, dtype=np.int8)
    scales = np.empty(N_GROUPS, dtype=np.float32)
    scratch = new_scratch()
    for ib in range(x.size // QK_K):
        x0 = ib * QK_K
        b0 = ib * BLOCK_BYTES
        max_scale = F32(0.0)
        max_abs_scale = F32(0.0)
        for g in range(N_GROUPS):
            # an empty `importance` is ggml's NULL weights, i.e. the _ref path's x² weighting
            scale = make_qx_quants(GROUP, 32, x, x0 + GROUP * g, L, GROUP * g, 1, importance, x0 + GROUP * g, scratch)
            scales[g] = scale
            if abs(scale) > max_abs_scale:
                max_abs_scale = abs(scale)
                max_scale = scale
        if max_abs_scale < GROUP_MAX_EPS:
            out[b0 : b0 + BLOCK_BYTES] = 0
            continue

        iscale = F32(F32(-128.0) / max_scale)
        store_fp16(out, b0 + D, F32(F32(1.0) / iscale))
        d_super = load_fp16(out, b0 + D)
        for g in range(N_GROUPS):
            sc = min(127, nearest_int(F32(iscale * scales[g])))
            out[b0 + SCALES + g] = np.uint8(sc & 0xFF)
            sc = (sc & 0xFF) - 256 if (sc & 0x80) else sc & 0xFF  # the int8 ggml stored
            d = F32(d_super * F32(sc))
            if d == F32(0.0):
                continue
            for i in range(GROUP * g, GROUP * g + GROUP):
                L[i] = max(-32, min(31, nearest_int(F32(x[x0 + i] / d)))) + 32

        for half in range(2):
            ql = b0 + QL + 64 * half
            qh = b0 + QH + 32 * half
            l0 = 128 * half
            for l in range(32):
                q1 = np.int64(L[l0 + l])
                q2 = np.int64(L[l0 + l + 32])
                q3 = np.int64(L[l0 + l + 64])
                q4 = np.int64(L[l0 + l + 96])
                out[ql + l] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                out[ql + l + 32] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                out[qh + l] = np.uint8((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


@njit(cache=True)
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
