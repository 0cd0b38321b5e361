"""Q2_K: super-blocks of 256 weights in 16 sub-blocks of 16, each with a 4-bit scale and 4-bit min.

Block layout (84 bytes):  scales: u8[16] | qs: u8[64] | d: fp16 | dmin: fp16
  weight = d·(scales[j] & 0xF)·q − dmin·(scales[j] >> 4), q in 0..3; element l of sub-block j sits
  in qs[32·(j // 8) + 16·(j % 2) + l] at bit 2·((j % 8) // 2).
Without importance ggml runs quantize_row_q2_K_ref: make_qkx2_quants(16, 3, |x| weights, -0.5, 0.1,
15, least |error|), scales and mins rounded to 4 bits against their maxima. With importance,
quantize_row_q2_K_impl: make_qkx3_quants(16, 3, importance·√(σ² + x²), -0.9, 0.05, 36), then
make_qp_quants(16, 15) over the scales and over the mins. Both end by re-deriving the levels from
the stored fp16 d/dmin and 4-bit scales.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, nearest_int, positive_max, store_fp16
from rioquant.kernels.search_affine import make_qkx2_quants, make_qkx3_quants, new_scratch
from rioquant.kernels.search_qp import make_qp_quants

QK_K = 256
SUB = 16  # weights per sub-block
NSUB = QK_K // SUB
QS_AT = NSUB
D_AT = QS_AT + QK_K // 4
BLOCK_BYTES = D_AT + 2 + 2


@njit(cache=True, error_model="numpy")
def _requantize(xb: np.ndarray, block: np.ndarray, L: np.ndarray) -> None:
    """Levels against the stored fp16 d/dmin and 4-bit scales; zero-scale sub-blocks keep theirs."""
    d_all = load_fp16(block, D_AT)
    dmin_all = load_fp16(block, D_AT + 2)
    for j in range(NSUB):
        d = F32(d_all * F32(np.int64(block[j]) & 0xF))
        if d == F32(0.0):
            continue
        dm = F32(dmin_all * F32(np.int64(block[j]) >> 4))
        for i in range(SUB * j, SUB * (j + 1)):
            L[i] = max(0, min(3, nearest_int(F32(F32(xb[i] + dm) / d))))


@njit(cache=True, error_model="numpy")
def _choose_levels_ref(
    xb: np.ndarray, block: np.ndarray, L: np.ndarray, work: np.ndarray, scratch: np.ndarray,
) -> None:
    """quantize_row_q2_K_ref for the super-block xb: writes scales, d, dmin and the levels L."""
    weights = work[:QK_K]
    scales = work[QK_K : QK_K + NSUB]
    mins = work[QK_K + NSUB : QK_K + 2 * NSUB]
    for i in range(QK_K):
        weights[i] = abs(xb[i])
    make_qkx2_quants(NSUB, SUB, 3, xb, weights, L, F32(-0.5), F32(0.1), 15, True, scales, mins, scratch)
    max_scale = positive_max(scales)
    max_min = positive_max(mins)
    q4scale = F32(15.0)
    if max_scale > F32(0.0):
        iscale = F32(q4scale / max_scale)
        for j in range(NSUB):
            block[j] = nearest_int(F32(iscale * scales[j]))
        store_fp16(block, D_AT, F32(max_scale / q4scale))
    else:
        block[:NSUB] = 0
        store_fp16(block, D_AT, F32(0.0))
    if max_min > F32(0.0):
        iscale = F32(q4scale / max_min)
        for j in range(NSUB):
            block[j] |= nearest_int(F32(iscale * mins[j])) << 4
        store_fp16(block, D_AT + 2, F32(max_min / q4scale))
    else:
        store_fp16(block, D_AT + 2, F32(0.0))
    _requantize(xb, block, L)


@njit(cache=True, error_model="numpy")
def _choose_levels_impl(
    xb: np.ndarray, qw: np.ndarray, block: np.ndarray, L: np.ndarray, work: np.ndarray, scratch: np.ndarray,
) -> None:
    """quantize_row_q2_K_impl for the super-block xb with importance qw (σ² without Q4_K's factor 2)."""
    weights = work[:QK_K]
    scales = work[QK_K : QK_K + NSUB]
    mins = work[QK_K + NSUB : QK_K + 2 * NSUB]
    sw = work[QK_K + 2 * NSUB : QK_K + 3 * NSUB]
    sumx2 = F32(0.0)
    for i in range(QK_K):
        sumx2 = F32(sumx2 + F32(xb[i] * xb[i]))
    sigma2 = F32(sumx2 / F32(QK_K))
    for i in range(QK_K):
        weights[i] = F32(qw[i] * np.sqrt(F32(sigma2 + F32(xb[i] * xb[i]))))
    for j in range(NSUB):
        total = F32(0.0)
        for i in range(SUB * j, SUB * (j + 1)):
            total = F32(total + weights[i])
        sw[j] = total
    make_qkx3_quants(NSUB, SUB, 3, xb, weights, L, F32(-0.9), F32(0.05), 36, False, scales, mins, scratch)
    ls = np.empty(NSUB, dtype=np.uint8)
    lm = np.empty(NSUB, dtype=np.uint8)
    store_fp16(block, D_AT, make_qp_quants(NSUB, 15, scales, ls, sw))
    store_fp16(block, D_AT + 2, make_qp_quants(NSUB, 15, mins, lm, sw))
    for j in range(NSUB):
        block[j] = ls[j] | (lm[j] << 4)
    _requantize(xb, block, L)


@njit(cache=True)
def quantize_row_q2_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK_K, dtype=np.uint8)
    work = np.empty(QK_K + 3 * NSUB, dtype=np.float32)  # weights, scales, mins, Σweights
    scratch = new_scratch()
    for ib in range(x.size // QK_K):
        xb = x[ib * QK_K : (ib + 1) * QK_K]
        block = out[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        if importance.size == 0:
            _choose_levels_ref(xb, block, L, work, scratch)
        else:
            _choose_levels_impl(xb, importance[ib * QK_K : (ib + 1) * QK_K], block, L, work, scratch)
        qs = block[QS_AT:D_AT]
        for j in range(0, QK_K // 4, 32):  # 128 weights → 32 bytes, four 2-bit levels per byte
            for i in range(32):
                base = 4 * j + i
                qs[j + i] = L[base] | (L[base + 32] << 2) | (L[base + 64] << 4) | (L[base + 96] << 6)


@njit(cache=True)
def dequantize_row_q2_k(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK_K):
        block = data[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        y = out[ib * QK_K : (ib + 1) * QK_K]
        d = load_fp16(block, D_AT)
        dmin = load_fp16(block, D_AT + 2)
        for j in range(NSUB):
            sc = np.int64(block[j])
            dl = F32(d * F32(sc & 0xF))
            ml = F32(dmin * F32(sc >> 4))
            q_at = QS_AT + 32 * (j // 8) + 16 * (j % 2)
            shift = 2 * ((j % 8) // 2)
            for i in range(SUB):
                q = (np.int64(block[q_at + i]) >> shift) & 3
                y[j * SUB + i] = F32(F32(dl * F32(q)) - ml)
