"""IQ1_S: super-blocks of 256 weights in 8 blocks of 32, each 8 weights one point of a 2048-point
ternary lattice (ggml quantize_row_iq1_s_impl; the importance matrix is mandatory, as in ggml).

Block layout (50 bytes):  d: fp16 | qs: u8[32] | qh: u16[8]
  qh[ib] bits 0-11: the high 3 bits of the 4 grid indices of block ib (qs holds the low 8);
         bits 12-14: the block's scale code s;  bit 15: the sign of the block's shift delta
  weight = d·(2s + 1)·(grid value ∈ {-1, 0, 1} ± IQ1S_DELTA)

The search per block: sort the weights, then try every split of the sorted order into three groups
(levels -1, 0, 1, offset by +delta or -delta) and keep the weighted least-squares best; groups of 8
whose levels are not a lattice point take the best of that key's precomputed neighbours.

Shared with IQ1_M (rioquant.kernels.iq1_m): the lattice tables, the sort and the neighbour search.
ggml sorts with the C library's qsort, which glibc implements as a merge sort for arrays this small,
so equal values keep their index order; the rank sort here orders ties the same way. The tie order
matters: it decides both the order of the prefix sums and which of two equal values land on either
side of a split.

Speed: the split search is exhaustive (~1,100 candidates per block of 32). For each first boundary
i1 the candidates over all second boundaries are first computed and counted against the best score so
far with ggml's exact test, in a loop the compiler vectorises; only rows holding a candidate that
would win are then scanned in ggml's order. Skipping a row nothing in it beats is exact, because the best score only
changes when a candidate wins.
"""

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from rioquant.kernels.common import F32, load_fp16, nearest_int, store_fp16
from rioquant.kernels.iq_lattice import lattice

QK_K = 256
BLOCK = 32  # IQ1S_BLOCK_SIZE
N_BLOCKS = QK_K // BLOCK
PAD = 40  # BLOCK + 1 boundaries, padded to whole SIMD vectors
D_AT, QS_AT, QH_AT = 0, 2, 2 + QK_K // 8
BLOCK_BYTES = QH_AT + QK_K // 16
DELTA = F32(0.125)  # IQ1S_DELTA (IQ1M_DELTA is the same)
GROUP_MAX_EPS = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
FLT_MAX = F32(3.4028234663852886e38)
ONE, ZERO = F32(1.0), F32(0.0)
# The three levels shifted up (x_p) or down (x_m) by delta, as ggml builds them in float.
X_P = np.array([-ONE + DELTA, DELTA, ONE + DELTA], dtype=np.float32)
X_M = np.array([-ONE - DELTA, -DELTA, ONE - DELTA], dtype=np.float32)

_LATTICE = lattice(GGMLQuantizationType.IQ1_S)
KMAP = _LATTICE.kmap
NEIGHBOURS = _LATTICE.neighbours
# Each point's 8 levels (0..2) packed 2 bits apiece, lowest coordinate first: the kmap key of the point.
GRID_KEYS = (((_LATTICE.grid.astype(np.int32) - 1) // 2) << (2 * np.arange(8, dtype=np.int32))).sum(axis=1)
GRID_KEYS = GRID_KEYS.astype(np.int32)
# gguf-py's dequantization values of each point (-1, 0, 1).
GRID_VALUES = _LATTICE.values


@njit(cache=True, inline="always")
def level(grid_index: int, j: int) -> int:
    """Level 0..2 of coordinate j of lattice point grid_index."""
    return (GRID_KEYS[grid_index] >> (2 * j)) & 3


@njit(cache=True)
def sort_order(xb: np.ndarray, order: np.ndarray) -> None:
    """order ← the indices of xb sorted ascending, ties in index order (glibc qsort, see above).

    Each value's rank is counted against all others, branch-free (the compiler vectorises it), which
    beats a comparison sort at 16 or 32 values.
    """
    n = xb.size
    for i in range(n):
        v = xb[i]
        rank = 0
        for j in range(n):
            rank += (xb[j] < v) | ((xb[j] == v) & (j < i))
        order[rank] = i


@njit(cache=True)
def block_weights(xb: np.ndarray, qw: np.ndarray, sigma2: np.float32, weight: np.ndarray) -> np.float32:
    """weight ← qw·√(σ² + x²) for the block xb; returns the block's max |x|."""
    amax = abs(xb[0])
    for i in range(xb.size):
        weight[i] = F32(qw[i] * np.sqrt(F32(sigma2 + F32(xb[i] * xb[i]))))
        amax = amax if amax > abs(xb[i]) else abs(xb[i])
    return amax


@njit(cache=True)
def super_block_sigma2(xbl: np.ndarray) -> np.float32:
    """σ² = 2·Σx²/256 over the super-block, summed in ggml's order."""
    sumx2 = ZERO
    for v in xbl:
        sumx2 = F32(sumx2 + F32(v * v))
    return F32(F32(F32(2.0) * sumx2) / F32(QK_K))


@njit(cache=True, error_model="numpy")
def best_neighbour(
    key: int, xv: np.ndarray, w: np.ndarray, scale: np.float32, xx: np.ndarray, terms: np.ndarray
) -> int:
    """iq1_find_best_neighbour2 for the 8 weights xv off the lattice at `key`: the first neighbour
    of smallest Σ w·(scale·xx[level] − x)², or -1 when none is below FLT_MAX (where ggml falls into
    an out-of-bounds scan and then asserts).

    Every term depends only on (coordinate, level), so the 24 possible terms are computed once and
    each neighbour's sum adds 8 of them in ggml's order.
    """
    for j in range(8):
        for lv in range(3):
            diff = F32(F32(scale * xx[lv]) - xv[j])
            terms[4 * j + lv] = F32(F32(w[j] * diff) * diff)
    at = -KMAP[key] - 1
    best, best_index = FLT_MAX, -1
    for n in range(at + 1, at + 1 + np.int64(NEIGHBOURS[at])):
        g = np.int64(NEIGHBOURS[n])
        u = GRID_KEYS[g]
        d2 = ZERO
        for j in range(8):
            d2 = F32(d2 + terms[4 * j + ((u >> (2 * j)) & 3)])
        if d2 < best:
            best, best_index = d2, g
    return best_index


@njit(cache=True, error_model="numpy")
def snap_group(
    L: np.ndarray, k: int, xb: np.ndarray, weight: np.ndarray, scale: np.float32, xx: np.ndarray,
    terms: np.ndarray,
) -> tuple[int, bool]:
    """(lattice index for the levels L[8k:8k+8], whether those levels were a lattice point)."""
    key = 0
    for j in range(8):
        key |= np.int64(L[8 * k + j]) << (2 * j)
    g = np.int64(KMAP[key])
    if g >= 0:
        return g, True
    g = best_neighbour(key, xb[8 * k : 8 * k + 8], weight[8 * k : 8 * k + 8], scale, xx, terms)
    if g < 0:
        raise ValueError("IQ1: no lattice neighbour at a finite distance (ggml asserts): values too large")
    return g, False


@njit(cache=True, error_model="numpy")
def refit_terms(
    g: int, xb: np.ndarray, weight: np.ndarray, k: int, xx: np.ndarray, mult: np.float32,
    sumqx: np.float32, sumq2: np.float32,
) -> tuple[np.float32, np.float32]:
    """Add group k's Σ w·q·x and Σ w·q² for lattice point g (q = xx[level]·mult) in ggml's order."""
    for j in range(8):
        w = weight[8 * k + j]
        q = F32(xx[level(g, j)] * mult)
        sumqx = F32(sumqx + F32(F32(w * q) * xb[8 * k + j]))
        sumq2 = F32(sumq2 + F32(F32(w * q) * q))
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def _split_search(
    xb: np.ndarray, weight: np.ndarray, order: np.ndarray, sumx: np.ndarray, sumw: np.ndarray,
    cs: np.ndarray, row: np.ndarray,
) -> tuple[int, int, int, np.float32]:
    """(i1, i2, shift ±1, scale) of the best split of the sorted block, or i1 = -1 if none scores.

    sumx, sumw: prefix sums, padded to PAD entries; cs holds per second boundary i2 the terms that
    depend on it alone: (Σ_{≥i2} x)·x_p[2], (Σ_{≥i2} x)·x_m[2] and the matching weight terms.
    """
    n = xb.size
    sumx[:] = ZERO
    sumw[:] = ZERO
    for j in range(n):
        i = order[j]
        sumx[j + 1] = F32(sumx[j] + F32(weight[i] * xb[i]))
        sumw[j + 1] = F32(sumw[j] + weight[i])
    p0, p1, p2, m0, m2 = X_P[0], X_P[1], X_P[2], X_M[0], X_M[2]
    cx_p, cx_m, cw_p, cw_m = cs[0], cs[1], cs[2], cs[3]
    for i2 in range(PAD):
        c = F32(sumx[n] - sumx[i2])
        cw = F32(sumw[n] - sumw[i2])
        cx_p[i2] = F32(c * p2)
        cx_m[i2] = F32(c * m2)
        cw_p[i2] = F32(F32(cw * p2) * p2)
        cw_m[i2] = F32(F32(cw * m2) * m2)
    best, scale = -FLT_MAX, ZERO
    best1, best2, best_shift = -1, -1, 0
    for i1 in range(n + 1):
        a = F32(sumx[i1] - sumx[0])
        aw = F32(sumw[i1] - sumw[0])
        a_p, a_m = F32(a * p0), F32(a * m0)
        aw_p, aw_m = F32(F32(aw * p0) * p0), F32(F32(aw * m0) * m0)
        s1, w1 = sumx[i1], sumw[i1]
        # x_m[1] = -x_p[1], so the middle group's terms of x_m are those of x_p negated (exactly).
        hits = 0
        for i2 in range(PAD):  # fixed trip count: vectorised whole; i2 outside [i1, n] masked
            b = F32(F32(sumx[i2] - s1) * p1)
            bw = F32(F32(F32(sumw[i2] - w1) * p1) * p1)
            qx_p, q2_p = F32(F32(a_p + b) + cx_p[i2]), F32(F32(aw_p + bw) + cw_p[i2])
            qx_m, q2_m = F32(F32(a_m - b) + cx_m[i2]), F32(F32(aw_m + bw) + cw_m[i2])
            row[0, i2], row[1, i2], row[2, i2], row[3, i2] = qx_p, q2_p, qx_m, q2_m
            win_p = (q2_p > ZERO) & (F32(qx_p * qx_p) > F32(best * q2_p))
            win_m = (q2_m > ZERO) & (F32(qx_m * qx_m) > F32(best * q2_m))
            hits += (i2 >= i1) & (i2 <= n) & (win_p | win_m)
        if hits == 0:
            continue
        for i2 in range(i1, n + 1):  # ggml's order, on the row's sums computed above
            for c in range(2):
                qx, q2 = row[2 * c, i2], row[2 * c + 1, i2]
                if q2 > ZERO and F32(qx * qx) > F32(best * q2):
                    scale = F32(qx / q2)
                    best = F32(scale * qx)
                    best1, best2, best_shift = i1, i2, 1 - 2 * c
    return best1, best2, best_shift, scale


@njit(cache=True)
def split_levels(order: np.ndarray, i1: int, i2: int, L: np.ndarray) -> None:
    """Levels 0 / 1 / 2 for the sorted positions below i1 / below i2 / from i2 on."""
    for j in range(order.size):
        L[order[j]] = 0 if j < i1 else (1 if j < i2 else 2)


@njit(cache=True, error_model="numpy")
def quantize_row_iq1_s(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_iq1_s_impl; `importance` must hold n weights (ggml asserts it)."""
    weight = np.empty(BLOCK, dtype=np.float32)
    order = np.empty(BLOCK, dtype=np.int64)
    sumx = np.empty(PAD, dtype=np.float32)
    sumw = np.empty(PAD, dtype=np.float32)
    cs = np.empty((4, PAD), dtype=np.float32)
    row = np.empty((4, PAD), dtype=np.float32)
    L = np.empty(BLOCK, dtype=np.uint8)
    index = np.empty(BLOCK // 8, dtype=np.int64)
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
            qw = importance[ibl * QK_K + ib * BLOCK : ibl * QK_K + (ib + 1) * BLOCK]
            amax = block_weights(xb, qw, sigma2, weight)
            scales[ib], shifts[ib] = ZERO, 1
            if amax < GROUP_MAX_EPS:
                continue
            sort_order(xb, order)
            i1, i2, shift, scale = _split_search(xb, weight, order, sumx, sumw, cs, row)
            if i1 < 0 or i2 < 0 or shift == 0:
                continue
            split_levels(order, i1, i2, L)
            if scale < ZERO:
                for j in range(BLOCK):
                    L[j] = 2 - L[j]
                scale, shift = -scale, -shift
            xx = X_P if shift == 1 else X_M
            all_on_grid = True
            for k in range(BLOCK // 8):
                index[k], on_grid = snap_group(L, k, xb, weight, scale, xx, terms)
                all_on_grid &= on_grid
            if not all_on_grid:
                sumqx, sumq2 = ZERO, ZERO
                for k in range(BLOCK // 8):
                    sumqx, sumq2 = refit_terms(index[k], xb, weight, k, xx, ONE, sumqx, sumq2)
                if sumqx > ZERO and sumq2 > ZERO:
                    scale = F32(sumqx / sumq2)
            h = 0
            for k in range(BLOCK // 8):
                block[QS_AT + (BLOCK // 8) * ib + k] = index[k] & 255
                h |= (index[k] >> 8) << (3 * k)
            block[QH_AT + 2 * ib] = h & 255
            block[QH_AT + 2 * ib + 1] = h >> 8
            if not scale >= ZERO:
                raise ValueError("IQ1_S: non-finite block scale (ggml asserts): values too large")
            scales[ib], shifts[ib] = scale, shift
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == ZERO:
            continue
        d = F32(max_scale / F32(15.0))
        store_fp16(block, D_AT, F32(d * F32(1.125)))
        inv_d = F32(ONE / d)
        for ib in range(N_BLOCKS):
            s = max(0, min(7, nearest_int(F32(F32(0.5) * F32(F32(inv_d * scales[ib]) - ONE)))))
            if shifts[ib] == -1:
                s |= 8
            block[QH_AT + 2 * ib + 1] |= s << 4


@njit(cache=True)
def dequantize_row_iq1_s(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        block = data[ibl * BLOCK_BYTES : (ibl + 1) * BLOCK_BYTES]
        d = load_fp16(block, D_AT)
        for ib in range(N_BLOCKS):
            qh = np.int64(block[QH_AT + 2 * ib]) | (np.int64(block[QH_AT + 2 * ib + 1]) << 8)
            dl = F32(d * F32(2 * ((qh >> 12) & 7) + 1))
            delta = -DELTA if qh & 0x8000 else DELTA
            for k in range(BLOCK // 8):
                g = np.int64(block[QS_AT + (BLOCK // 8) * ib + k]) | (((qh >> (3 * k)) & 7) << 8)
                at = ibl * QK_K + ib * BLOCK + 8 * k
                for j in range(8):
                    out[at + j] = F32(dl * F32(GRID_VALUES[g, j] + delta))
