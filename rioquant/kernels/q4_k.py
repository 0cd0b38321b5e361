"""Q4_K: super-blocks of 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.

Block layout (144 bytes):  d: fp16 | dmin: fp16 | scales: u8[12] | qs: u8[128]
  weight = d·sc[j]·q − dmin·m[j], q in 0..15; qs byte 32·k + l holds sub-block 2k (low nibble) and
  2k+1 (high nibble) at position l.
  scales (sc/m of sub-block j, 6 bits each; bytes 0-3 / 4-7 keep the top 2 bits of sub-blocks 4-7):
    byte j    (j < 4): sc[j]   | (sc[j+4] >> 4) << 6
    byte j+4  (j < 4): m[j]    | (m[j+4]  >> 4) << 6
    byte j+8  (j < 4): sc[j+4] & 0xF | (m[j+4] & 0xF) << 4
Without importance ggml runs quantize_row_q4_K_ref (make_qkx2_quants per sub-block, then the
sub-block scales rounded against their maximum); with importance quantize_row_q4_K_impl
(make_qkx3_quants, then make_qp_quants over the scales and over the mins). Q5_K shares all of this
except the level count and the packing of the levels, so those helpers live here.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, nearest_int, store_fp16
from rioquant.kernels.search_affine import make_qkx2_quants, make_qkx3_quants, make_qp_quants, new_scratch

QK_K = 256
SUB = 32  # weights per sub-block
K_SCALE_SIZE = 12
BLOCK_BYTES = 2 + 2 + K_SCALE_SIZE + QK_K // 2
SCALES_AT = 4  # offset of scales[12] in both Q4_K and Q5_K blocks


@njit(cache=True, inline="always")
def get_scale_min_k4(j: int, q: np.ndarray, qo: int) -> tuple[int, int]:
    """6-bit (scale, min) of sub-block j from the 12 packed bytes at q[qo:]."""
    if j < 4:
        return np.int64(q[qo + j]) & 63, np.int64(q[qo + j + 4]) & 63
    sc = (np.int64(q[qo + j + 4]) & 0xF) | ((np.int64(q[qo + j - 4]) >> 6) << 4)
    m = (np.int64(q[qo + j + 4]) >> 4) | ((np.int64(q[qo + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always")
def _put_scale_min_k4(j: int, ls: int, lm: int, q: np.ndarray, qo: int) -> None:
    """Inverse of get_scale_min_k4; sub-blocks must be stored in order 0..7."""
    if j < 4:
        q[qo + j] = ls
        q[qo + j + 4] = lm
    else:
        q[qo + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        q[qo + j - 4] |= np.uint8((ls >> 4) << 6)
        q[qo + j] |= np.uint8((lm >> 4) << 6)


@njit(cache=True, error_model="numpy")
def _requantize(x: np.ndarray, xo: int, nmax: int, out: np.ndarray, ob: int, L: np.ndarray) -> None:
    """Levels against the stored fp16 d/dmin and 6-bit scales, as the decoder will see them.

    Sub-blocks whose stored scale is zero keep the levels their search chose.
    """
    d_all = load_fp16(out, ob)
    dmin_all = load_fp16(out, ob + 2)
    for j in range(QK_K // SUB):
        sc, m = get_scale_min_k4(j, out, ob + SCALES_AT)
        d = F32(d_all * F32(sc))
        if d == F32(0.0):
            continue
        dm = F32(dmin_all * F32(m))
        for ii in range(SUB):
            l = nearest_int(F32(F32(x[xo + SUB * j + ii] + dm) / d))
            L[SUB * j + ii] = max(0, min(nmax, l))


@njit(cache=True, error_model="numpy")
def choose_levels_ref(
    x: np.ndarray, xo: int, nmax: int, rmin: np.float32, rdelta: np.float32, nstep: int,
    out: np.ndarray, ob: int, L: np.ndarray, weights: np.ndarray, scratch: np.ndarray,
) -> None:
    """quantize_row_q{4,5}_K_ref for the super-block at x[xo:]: writes d, dmin, scales and L[0:256]."""
    scales = np.empty(QK_K // SUB, dtype=np.float32)
    mins = np.empty(QK_K // SUB, dtype=np.float32)
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(QK_K // SUB):
        so = xo + SUB * j
        sum_x2 = F32(0.0)
        for l in range(SUB):
            sum_x2 = F32(sum_x2 + F32(x[so + l] * x[so + l]))
        av_x = np.sqrt(F32(sum_x2 / F32(SUB)))
        for l in range(SUB):
            weights[l] = F32(av_x + abs(x[so + l]))
        scales[j], mins[j] = make_qkx2_quants(
            SUB, nmax, x, so, weights, L, SUB * j, rmin, rdelta, nstep, False, scratch
        )
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(F32(63.0) / max_scale) if max_scale > F32(0.0) else F32(0.0)
    inv_min = F32(F32(63.0) / max_min) if max_min > F32(0.0) else F32(0.0)
    for j in range(QK_K // SUB):
        ls = min(63, nearest_int(F32(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(F32(inv_min * mins[j])) & 0xFF)
        _put_scale_min_k4(j, ls, lm, out, ob + SCALES_AT)
    store_fp16(out, ob, F32(max_scale / F32(63.0)))
    store_fp16(out, ob + 2, F32(max_min / F32(63.0)))
    _requantize(x, xo, nmax, out, ob, L)


@njit(cache=True, error_model="numpy")
def choose_levels_impl(
    x: np.ndarray, xo: int, importance: np.ndarray, nmax: int,
    out: np.ndarray, ob: int, L: np.ndarray, weights: np.ndarray, scratch: np.ndarray,
) -> None:
    """quantize_row_q{4,5}_K_impl for the super-block at x[xo:], weighted by importance[xo:]."""
    scales = np.empty(QK_K // SUB, dtype=np.float32)
    mins = np.empty(QK_K // SUB, dtype=np.float32)
    sw = np.empty(QK_K // SUB, dtype=np.float32)
    Ls = np.empty(QK_K // SUB, dtype=np.uint8)
    Lm = np.empty(QK_K // SUB, dtype=np.uint8)
    sum_x2 = F32(0.0)
    for l in range(QK_K):
        sum_x2 = F32(sum_x2 + F32(x[xo + l] * x[xo + l]))
    sigma2 = F32(F32(F32(2.0) * sum_x2) / F32(QK_K))
    for j in range(QK_K // SUB):
        so = xo + SUB * j
        sumw = F32(0.0)
        for l in range(SUB):
            xl = x[so + l]
            weights[l] = F32(importance[so + l] * np.sqrt(F32(sigma2 + F32(xl * xl))))
            sumw = F32(sumw + weights[l])
        sw[j] = sumw
        scales[j], mins[j] = make_qkx3_quants(
            SUB, nmax, x, so, weights, L, SUB * j, F32(-0.9), F32(0.05), 36, False, scratch
        )
    d_block = make_qp_quants(QK_K // SUB, 63, scales, Ls, sw)
    m_block = make_qp_quants(QK_K // SUB, 63, mins, Lm, sw)
    for j in range(QK_K // SUB):
        _put_scale_min_k4(j, min(63, np.int64(Ls[j])), min(63, np.int64(Lm[j])), out, ob + SCALES_AT)
    store_fp16(out, ob, d_block)
    store_fp16(out, ob + 2, m_block)
    _requantize(x, xo, nmax, out, ob, L)


@njit(cache=True)
def quantize_row_q4_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK_K, dtype=np.uint8)
    weights = np.empty(SUB, dtype=np.float32)
    scratch = new_scratch()
    for ib in range(x.size // QK_K):
        xo = ib * QK_K
        ob = ib * BLOCK_BYTES
        if importance.size == 0:
            choose_levels_ref(x, xo, 15, F32(-1.0), F32(0.1), 20, out, ob, L, weights, scratch)
        else:
            choose_levels_impl(x, xo, importance, 15, out, ob, L, weights, scratch)
        qs = ob + SCALES_AT + K_SCALE_SIZE
        for j in range(0, QK_K, 2 * SUB):
            for l in range(SUB):
                out[qs + j // 2 + l] = L[j + l] | (L[j + l + SUB] << 4)


@njit(cache=True)
def dequantize_row_q4_k(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK_K):
        base = ib * BLOCK_BYTES
        d = load_fp16(data, base)
        dmin = load_fp16(data, base + 2)
        qs = base + SCALES_AT + K_SCALE_SIZE
        for j in range(QK_K // SUB):
            sc, m = get_scale_min_k4(j, data, base + SCALES_AT)
            d1 = F32(d * F32(sc))
            m1 = F32(dmin * F32(m))
            shift = 4 * (j % 2)
            for l in range(SUB):
                q = (np.int64(data[qs + (j // 2) * SUB + l]) >> shift) & 0xF
                out[ib * QK_K + j * SUB + l] = F32(F32(d1 * F32(q)) - m1)
