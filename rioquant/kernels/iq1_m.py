"""IQ1_M: super-blocks of 256 weights in 16 blocks of 16, each 8 weights one point of IQ1_S's lattice,
with a delta sign per group of 8 (ggml quantize_row_iq1_m_impl, importance-weighted path).

Block layout (56 bytes):  qs: u8[32] | qh: u8[16] | scales: u16[4]
  qh[ib]: bits 0-2 and 4-6 the high 3 bits of block ib's two grid indices (qs holds the low 8);
          bit 3 / bit 7 set: that group of 8 is offset by -delta instead of +delta
  scales: 3-bit scale code s of block ib at bits 3·(ib%4) of scales[ib/4]; the fp16 super-block
          scale d is split over the top nibbles: bits 0-3 in scales[0], 4-7 in scales[1], ... 12-15 in
          scales[3]
  weight = d·(2s + 1)·(grid value ∈ {-1, 0, 1} ± IQ1M_DELTA)

ggml quantizes IQ1_M without an importance matrix too (weights x²), but llama-quantize refuses to,
and so does rioquant (types.REQUIRES_IMATRIX): only the importance-weighted path is implemented.

The split search is IQ1_S's with four delta-sign combinations (+,+ / +,- / -,+ / -,-) for the two
halves, each half keeping its own prefix sums; it uses the same exact row skipping (see iq1.py).
After all blocks, d is refitted by least squares over the whole super-block with the coded scales.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, fp16_bits_to_fp32, fp32_to_fp16_bits, nearest_int
from rioquant.kernels.iq1 import (
    DELTA,
    FLT_MAX,
    GRID_VALUES,
    ONE,
    X_M,
    X_P,
    ZERO,
    block_weights,
    refit_terms,
    snap_group,
    sort_order,
    split_levels,
    super_block_sigma2,
)

QK_K = 256
BLOCK = 16  # IQ1M_BLOCK_SIZE
HALF = BLOCK // 2
N_BLOCKS = QK_K // BLOCK
PAD = 24  # BLOCK + 1 boundaries, padded to whole SIMD vectors
QS_AT, QH_AT, SCALES_AT = 0, QK_K // 8, QK_K // 8 + QK_K // 16
BLOCK_BYTES = SCALES_AT + QK_K // 32
GROUP_MAX_EPS = F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
# qh bits of a block whose delta-sign combination is k (bit 1 of k: first half -, bit 0: second half -)
SIGN_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.int64)


@njit(cache=True, inline="always")
def half_levels(k: int, half: int) -> np.ndarray:
    """x_p or x_m for group `half` (0, 1) of a block whose delta-sign combination is k."""
    return X_M if (k >> (1 - half)) & 1 else X_P


@njit(cache=True, error_model="numpy")
def _split_search(
    xb: np.ndarray, weight: np.ndarray, order: np.ndarray, px: np.ndarray, pw: np.ndarray, cs: np.ndarray,
    row: np.ndarray,
) -> tuple[int, int, int, np.float32]:
    """(i1, i2, sign combination k, scale) of the best split of the sorted block, or i1 = -1.

    ggml's identity: with levels one apart, Σ q·x of a split is T·v2 − S(i1) − S(i2) per half, and
    Σ q² is W·v2² + W(i1)·(v0² − v1²) + W(i2)·(v1² − v2²). cs[h, c, i2] holds the i2-only terms.
    """
    n = xb.size
    for h in range(2):
        px[h, 0] = ZERO
        pw[h, 0] = ZERO
    for j in range(n):
        i = order[j]
        h = 0 if i < HALF else 1
        px[h, j + 1] = F32(px[h, j] + F32(weight[i] * xb[i]))
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = F32(pw[h, j] + weight[i])
        pw[1 - h, j + 1] = pw[1 - h, j]
    p2, m2 = X_P[2], X_M[2]
    cp1 = F32(F32(X_P[0] * X_P[0]) - F32(X_P[1] * X_P[1]))
    cp2 = F32(F32(X_P[1] * X_P[1]) - F32(X_P[2] * X_P[2]))
    cm1 = F32(F32(X_M[0] * X_M[0]) - F32(X_M[1] * X_M[1]))
    cm2 = F32(F32(X_M[1] * X_M[1]) - F32(X_M[2] * X_M[2]))
    tx_p0, tx_p1 = F32(px[0, n] * p2), F32(px[1, n] * p2)
    tx_m0, tx_m1 = F32(px[0, n] * m2), F32(px[1, n] * m2)
    tw_p0, tw_p1 = F32(F32(pw[0, n] * p2) * p2), F32(F32(pw[1, n] * p2) * p2)
    tw_m0, tw_m1 = F32(F32(pw[0, n] * m2) * m2), F32(F32(pw[1, n] * m2) * m2)
    for i2 in range(PAD):
        cs[0, i2] = F32(pw[0, i2] * cp2)
        cs[1, i2] = F32(pw[1, i2] * cp2)
        cs[2, i2] = F32(pw[0, i2] * cm2)
        cs[3, i2] = F32(pw[1, i2] * cm2)
    best, scale = -FLT_MAX, ZERO
    best1, best2, best_k = -1, -1, -1
    for i1 in range(n + 1):
        a0, a1 = px[0, i1], px[1, i1]
        wp0, wp1 = F32(tw_p0 + F32(pw[0, i1] * cp1)), F32(tw_p1 + F32(pw[1, i1] * cp1))
        wm0, wm1 = F32(tw_m0 + F32(pw[0, i1] * cm1)), F32(tw_m1 + F32(pw[1, i1] * cm1))
        hits = 0
        for i2 in range(PAD):  # fixed trip count: vectorised whole; i2 outside [i1, n] masked
            sx0, sx1 = F32(a0 + px[0, i2]), F32(a1 + px[1, i2])
            qp0, qp1 = F32(tx_p0 - sx0), F32(tx_p1 - sx1)
            qm0, qm1 = F32(tx_m0 - sx0), F32(tx_m1 - sx1)
            vp0, vp1 = F32(wp0 + cs[0, i2]), F32(wp1 + cs[1, i2])
            vm0, vm1 = F32(wm0 + cs[2, i2]), F32(wm1 + cs[3, i2])
            x0, x1, x2, x3 = F32(qp0 + qp1), F32(qp0 + qm1), F32(qm0 + qp1), F32(qm0 + qm1)
            v0, v1, v2, v3 = F32(vp0 + vp1), F32(vp0 + vm1), F32(vm0 + vp1), F32(vm0 + vm1)
            row[0, i2], row[1, i2], row[2, i2], row[3, i2] = x0, x1, x2, x3
            row[4, i2], row[5, i2], row[6, i2], row[7, i2] = v0, v1, v2, v3
            win = (
                ((v0 > ZERO) & (F32(x0 * x0) > F32(best * v0)))
                | ((v1 > ZERO) & (F32(x1 * x1) > F32(best * v1)))
                | ((v2 > ZERO) & (F32(x2 * x2) > F32(best * v2)))
                | ((v3 > ZERO) & (F32(x3 * x3) > F32(best * v3)))
            )
            hits += (i2 >= i1) & (i2 <= n) & win
        if hits == 0:
            continue
        for i2 in range(i1, n + 1):  # ggml's order, on the row's sums computed above
            for k in range(4):
                qx, q2 = row[k, i2], row[4 + k, i2]
                if q2 > ZERO and F32(qx * qx) > F32(best * q2):
                    scale = F32(qx / q2)
                    best = F32(scale * qx)
                    best1, best2, best_k = i1, i2, k
    return best1, best2, best_k, scale


@njit(cache=True, error_model="numpy")
def quantize_row_iq1_m(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_iq1_m_impl with quant_weights; `importance` must hold n weights."""
    weights = np.empty(QK_K, dtype=np.float32)
    order = np.empty(BLOCK, dtype=np.int64)
    px = np.zeros((2, PAD), dtype=np.float32)
    pw = np.zeros((2, PAD), dtype=np.float32)
    cs = np.empty((4, PAD), dtype=np.float32)
    row = np.empty((8, PAD), dtype=np.float32)
    L = np.empty(BLOCK, dtype=np.uint8)
    index = np.empty(2, dtype=np.int64)
    terms = np.empty(32, dtype=np.float32)
    scales = np.empty(N_BLOCKS, dtype=np.float32)
    shifts = np.empty(N_BLOCKS, dtype=np.int64)
    for ibl in range(x.size // QK_K):
        xbl = x[ibl * QK_K : (ibl + 1) * QK_K]
        block = out[ibl * BLOCK_BYTES : (ibl + 1) * BLOCK_BYTES]
        block[:] = 0
        sigma2 = super_block_sigma2(xbl)
        max_scale = ZERO
        for ib in range(N_BLOCKS):
            xb = xbl[ib * BLOCK : (ib + 1) * BLOCK]
            weight = weights[ib * BLOCK : (ib + 1) * BLOCK]
            amax = block_weights(xb, importance[ibl * QK_K + ib * BLOCK : ibl * QK_K + (ib + 1) * BLOCK], sigma2, weight)
            scales[ib], shifts[ib] = ZERO, 0
            if amax < GROUP_MAX_EPS:
                continue
            sort_order(xb, order)
            i1, i2, k, scale = _split_search(xb, weight, order, px, pw, cs, row)
            if i1 < 0 or i2 < 0 or k < 0:
                continue
            split_levels(order, i1, i2, L)
            if scale < ZERO:
                for j in range(BLOCK):
                    L[j] = 2 - L[j]
                scale, k = -scale, 3 - k
            all_on_grid = True
            for half in range(2):
                index[half], on_grid = snap_group(L, half, xb, weight, scale, half_levels(k, half), terms)
                all_on_grid &= on_grid
            if not all_on_grid:
                sumqx, sumq2 = ZERO, ZERO
                for half in range(2):
                    sumqx, sumq2 = refit_terms(index[half], xb, weight, half, half_levels(k, half), ONE, sumqx, sumq2)
                if sumqx > ZERO and sumq2 > ZERO:
                    scale = F32(sumqx / sumq2)
            block[QS_AT + 2 * ib] = index[0] & 255
            block[QS_AT + 2 * ib + 1] = index[1] & 255
            block[QH_AT + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
            if not scale >= ZERO:
                raise ValueError("IQ1_M: non-finite block scale (ggml asserts): values too large")
            scales[ib], shifts[ib] = scale, k
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == ZERO:
            continue
        _code_scales(xbl, weights, scales, shifts, max_scale, block)


@njit(cache=True, error_model="numpy")
def _code_scales(
    xbl: np.ndarray, weights: np.ndarray, scales: np.ndarray, shifts: np.ndarray, max_scale: np.float32,
    block: np.ndarray,
) -> None:
    """3-bit block scales against max_scale/15, sign bits, then d refitted with the coded scales."""
    d = F32(max_scale / F32(15.0))
    inv_d = F32(ONE / d)
    sumqx, sumq2 = ZERO, ZERO
    sc = np.zeros(4, dtype=np.int64)
    for ib in range(N_BLOCKS):
        s = max(0, min(7, nearest_int(F32(F32(0.5) * F32(F32(inv_d * scales[ib]) - ONE)))))
        sc[ib // 4] |= s << (3 * (ib % 4))
        qh = np.int64(block[QH_AT + ib]) | SIGN_MASKS[shifts[ib]]
        block[QH_AT + ib] = qh
        mult = F32(2 * s + 1)
        for half in range(2):
            g = np.int64(block[QS_AT + 2 * ib + half]) | ((qh << (8 - 4 * half)) & 0x700)
            xb = xbl[ib * BLOCK : (ib + 1) * BLOCK]
            sumqx, sumq2 = refit_terms(
                g, xb, weights[ib * BLOCK : (ib + 1) * BLOCK], half, half_levels(shifts[ib], half), mult, sumqx, sumq2
            )
    if sumq2 > ZERO:
        d = F32(sumqx / sumq2)
    bits = np.int64(fp32_to_fp16_bits(F32(d * F32(1.1125))))
    for i in range(4):
        sc[i] |= ((bits >> (4 * i)) & 0xF) << 12
        block[SCALES_AT + 2 * i] = sc[i] & 255
        block[SCALES_AT + 2 * i + 1] = sc[i] >> 8


@njit(cache=True)
def dequantize_row_iq1_m(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        block = data[ibl * BLOCK_BYTES : (ibl + 1) * BLOCK_BYTES]
        sc = np.empty(4, dtype=np.int64)
        for i in range(4):
            sc[i] = np.int64(block[SCALES_AT + 2 * i]) | (np.int64(block[SCALES_AT + 2 * i + 1]) << 8)
        d_bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0xF0) | ((sc[2] >> 4) & 0xF00) | (sc[3] & 0xF000)
        d = fp16_bits_to_fp32(np.uint16(d_bits))
        for ib in range(N_BLOCKS):
            dl = F32(d * F32(2 * ((sc[ib // 4] >> (3 * (ib % 4))) & 7) + 1))
            qh = np.int64(block[QH_AT + ib])
            for half in range(2):
                g = np.int64(block[QS_AT + 2 * ib + half]) | ((qh << (8 - 4 * half)) & 0x700)
                delta = -DELTA if (qh >> (3 + 4 * half)) & 1 else DELTA
                at = ibl * QK_K + ib * BLOCK + 8 * half
                for j in range(8):
                    out[at + j] = F32(dl * F32(GRID_VALUES[g, j] + delta))
