"""Q4_K: super-blocks of 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.

Block layout (144 bytes):  d: fp16 | dmin: fp16 | scales: u8[12] | qs: u8[128]
  weight = d·sc[j]·q − dmin·m[j], q in 0..15; qs byte 32·k + l holds element l of sub-block 2k in its
  low nibble and of sub-block 2k+1 in its high nibble.
  scales (sc/m of sub-block j, 6 bits each; bytes 0-7 lend their top 2 bits to sub-blocks 4-7):
    byte j    (j < 4): sc[j] | (sc[j+4] >> 4) << 6
    byte j+4  (j < 4): m[j]  | (m[j+4]  >> 4) << 6
    byte j+8  (j < 4): (sc[j+4] & 0xF) | (m[j+4] & 0xF) << 4
Without importance ggml runs quantize_row_q4_K_ref (make_qkx2_quants per sub-block, then the
sub-block scales rounded against their maximum); with importance quantize_row_q4_K_impl
(make_qkx3_quants, then make_qp_quants over the scales and over the mins). Both end by re-deriving
the levels from the stored fp16 d/dmin and 6-bit scales. Q5_K shares all of this except the level
count and the packing of the levels, so the shared steps live here.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, nearest_int, positive_max, store_fp16
from rioquant.kernels.search_affine import make_qkx2_quants, make_qkx3_quants, new_scratch
from rioquant.kernels.search_qp import make_qp_quants

QK_K = 256
SUB = 32  # weights per sub-block
NSUB = QK_K // SUB
K_SCALE_SIZE = 12
BLOCK_BYTES = 2 + 2 + K_SCALE_SIZE + QK_K // 2
SCALES_AT = 4  # offset of scales[12] in both Q4_K and Q5_K blocks
QS_AT = SCALES_AT + K_SCALE_SIZE


@njit(cache=True)
def get_scale_min_k4(j: int, block: np.ndarray) -> tuple[int, int]:
    """6-bit (scale, min) of sub-block j from the packed scales of a Q4_K/Q5_K block."""
    q = SCALES_AT
    if j < 4:
        return np.int64(block[q + j]) & 63, np.int64(block[q + j + 4]) & 63
    sc = (np.int64(block[q + j + 4]) & 0xF) | ((np.int64(block[q + j - 4]) >> 6) << 4)
    m = (np.int64(block[q + j + 4]) >> 4) | ((np.int64(block[q + j]) >> 6) << 4)
    return sc, m


@njit(cache=True)
def _put_scales_mins(ls: np.ndarray, lm: np.ndarray, block: np.ndarray) -> None:
    """Pack 8 six-bit scales and mins into the block's scales (inverse of get_scale_min_k4)."""
    q = SCALES_AT
    for j in range(NSUB):
        if j < 4:
            block[q + j] = ls[j]
            block[q + j + 4] = lm[j]
        else:
            block[q + j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            block[q + j - 4] |= (ls[j] >> 4) << 6
            block[q + j] |= (lm[j] >> 4) << 6


@njit(cache=True, error_model="numpy")
def _requantize(xb: np.ndarray, nmax: int, block: np.ndarray, L: np.ndarray) -> None:
    """Levels against the stored fp16 d/dmin and 6-bit scales, as the decoder will see them.

    Sub-blocks whose stored scale is zero keep the levels their search chose.
    """
    d_all = load_fp16(block, 0)
    dmin_all = load_fp16(block, 2)
    for j in range(NSUB):
        sc, m = get_scale_min_k4(j, block)
        d = F32(d_all * F32(sc))
        if d == F32(0.0):
            continue
        dm = F32(dmin_all * F32(m))
        for i in range(SUB * j, SUB * (j + 1)):
            L[i] = max(0, min(nmax, nearest_int(F32(F32(xb[i] + dm) / d))))


@njit(cache=True, error_model="numpy")
def choose_levels_ref(
    xb: np.ndarray, nmax: int, rmin: np.float32, rdelta: np.float32, nstep: int,
    block: np.ndarray, L: np.ndarray, work: np.ndarray, scratch: np.ndarray,
) -> None:
    """quantize_row_q{4,5}_K_ref for the super-block xb: writes d, dmin, scales and the levels L."""
    weights = work[:QK_K]
    scales = work[QK_K : QK_K + NSUB]
    mins = work[QK_K + NSUB : QK_K + 2 * NSUB]
    for j in range(NSUB):
        sum_x2 = F32(0.0)
        for i in range(SUB * j, SUB * (j + 1)):
            sum_x2 = F32(sum_x2 + F32(xb[i] * xb[i]))
        av_x = np.sqrt(F32(sum_x2 / F32(SUB)))
        for i in range(SUB * j, SUB * (j + 1)):
            weights[i] = F32(av_x + abs(xb[i]))
    make_qkx2_quants(NSUB, SUB, nmax, xb, weights, L, rmin, rdelta, nstep, False, scales, mins, scratch)
    max_scale = positive_max(scales)
    max_min = positive_max(mins)
    inv_scale = F32(F32(63.0) / max_scale) if max_scale > F32(0.0) else F32(0.0)
    inv_min = F32(F32(63.0) / max_min) if max_min > F32(0.0) else F32(0.0)
    ls = np.empty(NSUB, dtype=np.uint8)
    lm = np.empty(NSUB, dtype=np.uint8)
    for j in range(NSUB):
        ls[j] = min(63, nearest_int(F32(inv_scale * scales[j])) & 0xFF)
        lm[j] = min(63, nearest_int(F32(inv_min * mins[j])) & 0xFF)
    _put_scales_mins(ls, lm, block)
    store_fp16(block, 0, F32(max_scale / F32(63.0)))
    store_fp16(block, 2, F32(max_min / F32(63.0)))
    _requantize(xb, nmax, block, L)


@njit(cache=True, error_model="numpy")
def choose_levels_impl(
    xb: np.ndarray, qw: np.ndarray, nmax: int, clamp_scales: bool, block: np.ndarray, L: np.ndarray,
    work: np.ndarray, scratch: np.ndarray,
) -> None:
    """quantize_row_q{4,5}_K_impl for the super-block xb with importance qw.

    Q5_K clamps the 6-bit scales to 63 before packing and Q4_K does not (`clamp_scales`); it only
    matters when a negative sub-block scale wrapped around in its uint8 level.
    """
    weights = work[:QK_K]
    scales = work[QK_K : QK_K + NSUB]
    mins = work[QK_K + NSUB : QK_K + 2 * NSUB]
    sw = work[QK_K + 2 * NSUB : QK_K + 3 * NSUB]
    sum_x2 = F32(0.0)
    for i in range(QK_K):
        sum_x2 = F32(sum_x2 + F32(xb[i] * xb[i]))
    sigma2 = F32(F32(F32(2.0) * sum_x2) / F32(QK_K))
    for i in range(QK_K):
        weights[i] = F32(qw[i] * np.sqrt(F32(sigma2 + F32(xb[i] * xb[i]))))
    for j in range(NSUB):
        sumw = F32(0.0)
        for i in range(SUB * j, SUB * (j + 1)):
            sumw = F32(sumw + weights[i])
        sw[j] = sumw
    make_qkx3_quants(NSUB, SUB, nmax, xb, weights, L, F32(-0.9), F32(0.05), 36, False, scales, mins, scratch)
    ls = np.empty(NSUB, dtype=np.uint8)
    lm = np.empty(NSUB, dtype=np.uint8)
    d_block = make_qp_quants(NSUB, 63, scales, ls, sw)
    m_block = make_qp_quants(NSUB, 63, mins, lm, sw)
    if clamp_scales:
        for j in range(NSUB):
            ls[j] = min(63, ls[j])
            lm[j] = min(63, lm[j])
    _put_scales_mins(ls, lm, block)
    store_fp16(block, 0, d_block)
    store_fp16(block, 2, m_block)
    _requantize(xb, nmax, block, L)


@njit(cache=True)
def new_work() -> np.ndarray:
    """Per-row float32 work space of choose_levels_*: weights[256], scales, mins, Σweights[8]."""
    return np.empty(QK_K + 3 * NSUB, dtype=np.float32)


@njit(cache=True)
def quantize_row_q4_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK_K, dtype=np.uint8)
    work = new_work()
    scratch = new_scratch()
    for ib in range(x.size // QK_K):
        xb = x[ib * QK_K : (ib + 1) * QK_K]
        block = out[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        if importance.size == 0:
            choose_levels_ref(xb, 15, F32(-1.0), F32(0.1), 20, block, L, work, scratch)
        else:
            qw = importance[ib * QK_K : (ib + 1) * QK_K]
            choose_levels_impl(xb, qw, 15, False, block, L, work, scratch)
        for j in range(0, QK_K // 2, SUB):  # 64 weights → 32 bytes: low nibbles first half
            for i in range(SUB):
                block[QS_AT + j + i] = L[2 * j + i] | (L[2 * j + i + SUB] << 4)


@njit(cache=True)
def dequantize_row_q4_k(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK_K):
        block = data[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        y = out[ib * QK_K : (ib + 1) * QK_K]
        d = load_fp16(block, 0)
        dmin = load_fp16(block, 2)
        for j in range(NSUB):
            sc, m = get_scale_min_k4(j, block)
            d1 = F32(d * F32(sc))
            m1 = F32(dmin * F32(m))
            shift = 4 * (j % 2)
            for i in range(SUB):
                q = (np.int64(block[QS_AT + (j // 2) * SUB + i]) >> shift) & 0xF
                y[j * SUB + i] = F32(F32(d1 * F32(q)) - m1)
