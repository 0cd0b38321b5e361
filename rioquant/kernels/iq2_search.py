"""The scale-and-lattice searches shared by IQ2_XXS, IQ2_XS and IQ2_S (ggml-quants.c).

Each group of 8 weights is coded as |x| ≈ scale·(2l+1), l ∈ {0,1,2}, where the 8 levels must form a
point of the type's codebook (see rioquant.kernels.iq_lattice). For a trial 1/scale `id` a group is
rounded to levels; when those levels are not a codebook point, ggml's `iq2_find_best_neighbour`
takes the neighbour (from the precomputed list, first wins ties) nearest to x in the √weight-scaled
distance at that scale. Each trial's levels get the least-squares scale Σwxq/Σwq², and the trial
with the largest Σwxq·scale wins. The tables are passed in as arguments, so one compiled search
serves every codebook.

All arithmetic mirrors ggml's float32 expressions in ggml's order; `error_model="numpy"` lets a
division by zero give inf/NaN as in C instead of raising.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, nearest_int
from rioquant.kernels.search_qp import make_qp_quants

GROUP = 8  # weights per lattice point
K_MAX_Q = 3  # ggml's kMaxQ: levels 0..kMaxQ-1, positions 1, 3, 5
FLT_MAX = F32(3.4028234663852886e38)
TERMS = 4 * GROUP  # scratch of best_neighbour: (coordinate, level) terms, 4 levels per coordinate


@njit(cache=True, error_model="numpy", inline="always")
def best_neighbour(
    neighbours: np.ndarray, neighbour_keys: np.ndarray, start: int,
    xval: np.ndarray, waux: np.ndarray, base: int, scale: np.float32, L: np.ndarray, terms: np.ndarray,
) -> int:
    """iq2_find_best_neighbour: the listed point nearest to xval[base:base+8] (first wins ties); its
    levels go to L[base:base+8] and its key is returned.

    Each term w·(scale·q − x)² of a distance depends only on (coordinate, level), so the 24 possible
    terms are computed once (ggml's expression, so each is ggml's float) and each listed point's
    distance adds its 8 in ggml's order: 8 loads and adds instead of 40 operations per point. When no
    distance compares below FLT_MAX (inf/NaN weights) ggml aborts; the API refuses rows that large
    before any kernel runs, so the first listed point stands in there.
    """
    for i in range(GROUP):
        x = xval[base + i]
        w = waux[base + i]
        for lv in range(K_MAX_Q):
            diff = F32(F32(scale * F32(2 * lv + 1)) - x)
            terms[4 * i + lv] = F32(F32(w * diff) * diff)
    count = np.int64(neighbours[start])
    best_d2 = FLT_MAX
    best = start + 1
    for j in range(start + 1, start + 1 + count):
        key = np.int64(neighbour_keys[j])
        d2 = F32(0.0)
        for i in range(GROUP):
            d2 = F32(d2 + terms[4 * i + ((key >> (2 * i)) & 3)])
        if d2 < best_d2:
            best_d2 = d2
            best = j
    key = np.int64(neighbour_keys[best])
    for i in range(GROUP):
        L[base + i] = (key >> (2 * i)) & 3
    return key


@njit(cache=True, error_model="numpy", inline="always")
def snap_group(
    kmap: np.ndarray, neighbours: np.ndarray, neighbour_keys: np.ndarray,
    xval: np.ndarray, waux: np.ndarray, base: int, inv_scale: np.float32, scale: np.float32, L: np.ndarray, terms: np.ndarray,
) -> tuple[int, bool]:
    """Round xval[base:base+8] at 1/scale `inv_scale` to levels in L[base:base+8], moved to the best
    neighbour when off the codebook: (the key of the levels taken, whether the rounded point was on
    the codebook)."""
    u = 0
    for i in range(GROUP):
        l = nearest_int(F32(F32(0.5) * F32(F32(inv_scale * xval[base + i]) - F32(1.0))))
        l = max(0, min(K_MAX_Q - 1, l))
        L[base + i] = l
        u |= l << (2 * i)
    g = kmap[u]
    if g >= 0:
        return u, True
    return best_neighbour(neighbours, neighbour_keys, -g - 1, xval, waux, base, scale, L, terms), False


@njit(cache=True, error_model="numpy", inline="always")
def fit_scale(xval: np.ndarray, weight: np.ndarray, L: np.ndarray, n: int) -> tuple[np.float32, np.float32]:
    """(Σ w·x·q, Σ w·q²) over q = 2L+1, summed in ggml's order."""
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(n):
        w = weight[i]
        q = F32(2 * L[i] + 1)
        sumqx = F32(sumqx + F32(F32(w * xval[i]) * q))
        sumq2 = F32(sumq2 + F32(F32(w * q) * q))
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def flip_to_even_parity(xb: np.ndarray, weight: np.ndarray, xval: np.ndarray, signs: np.ndarray) -> None:
    """|x| into xval and 7-bit sign codes per group of 8 (IQ2_XXS, IQ2_XS): the 8th sign is implied by
    even parity, so a group with an odd count of negatives flips the element of least w·x² back."""
    for k in range(xb.size // GROUP):
        nflip = 0
        s = 0
        for i in range(GROUP * k, GROUP * (k + 1)):
            if xb[i] >= F32(0.0):
                xval[i] = xb[i]
            else:
                xval[i] = -xb[i]
                nflip += 1
                s |= 1 << (i - GROUP * k)
        if nflip % 2:
            imin = 0
            least = F32(F32(weight[GROUP * k] * xb[GROUP * k]) * xb[GROUP * k])
            for i in range(1, GROUP):
                ax = F32(F32(weight[GROUP * k + i] * xb[GROUP * k + i]) * xb[GROUP * k + i])
                if ax < least:
                    least = ax
                    imin = i
            xval[GROUP * k + imin] = -xval[GROUP * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127


@njit(cache=True, inline="always")
def group_max(xval: np.ndarray) -> np.float32:
    """ggml's `max = xval[0]; max = MAX(max, xval[i])`."""
    m = xval[0]
    for i in range(1, xval.size):
        m = m if m > xval[i] else xval[i]
    return m


@njit(cache=True, error_model="numpy")
def search_32(
    kmap: np.ndarray, neighbours: np.ndarray, neighbour_keys: np.ndarray, terms: np.ndarray,
    xval: np.ndarray, weight: np.ndarray, waux: np.ndarray, L: np.ndarray, Laux: np.ndarray, Lqp: np.ndarray,
) -> tuple[np.float32, bool]:
    """IQ2_XXS's search over 32 weights (4 points): (the scale, with the codebook levels in L, True),
    or (0, False) for a group ggml leaves empty: make_qp_quants found no positive starting scale.
    The caller has already excluded all-zero groups.
    """
    scale = make_qp_quants(32, K_MAX_Q + 1, xval, Lqp, weight)
    eff_max = F32(scale * F32(K_MAX_Q))
    if eff_max <= F32(0.0):
        return F32(0.0), False
    best = F32(0.0)
    last = -1
    for step in range(-6, 7):
        inv = F32(F32(F32(2 * K_MAX_Q - 1) + F32(F32(step) * F32(0.1))) / eff_max)
        this_scale = F32(F32(1.0) / inv)
        points = 0
        for k in range(4):
            key, _ = snap_group(kmap, neighbours, neighbour_keys, xval, waux, GROUP * k, inv, this_scale, Laux, terms)
            points |= key << (16 * k)
        if points == last:  # the trial before's points: same sums, so same outcome (see search_16)
            continue
        last = points
        sumqx, sumq2 = fit_scale(xval, weight, Laux, 32)
        if sumq2 > F32(0.0) and F32(sumqx * sumqx) > F32(best * sumq2):
            scale = F32(sumqx / sumq2)
            best = F32(scale * sumqx)
            L[:32] = Laux[:32]
    if scale > F32(0.0):
        inv = F32(F32(1.0) / scale)
        for k in range(4):
            snap_group(kmap, neighbours, neighbour_keys, xval, waux, GROUP * k, inv, scale, L, terms)
        sumqx, sumq2 = fit_scale(xval, weight, L, 32)
        if sumq2 > F32(0.0):
            scale = F32(sumqx / sumq2)
    return scale, True


@njit(cache=True, error_model="numpy")
def search_16(
    kmap: np.ndarray, neighbours: np.ndarray, neighbour_keys: np.ndarray, terms: np.ndarray,
    xval: np.ndarray, weight: np.ndarray, waux: np.ndarray, L: np.ndarray, Laux: np.ndarray, xmax: np.float32,
) -> np.float32:
    """IQ2_XS's and IQ2_S's search over 16 weights (2 points) whose largest |x| is xmax: the scale,
    with the codebook levels in L. Only points that ended off the codebook are rounded again."""
    L[:16] = 0
    best = F32(0.0)
    scale = F32(xmax / F32(2 * K_MAX_Q - 1))
    on_grid0 = True
    on_grid1 = True
    last = -1
    for step in range(-9, 10):
        inv = F32(F32(F32(2 * K_MAX_Q - 1) + F32(F32(step) * F32(0.1))) / xmax)
        this_scale = F32(F32(1.0) / inv)
        key0, aux0 = snap_group(kmap, neighbours, neighbour_keys, xval, waux, 0, inv, this_scale, Laux, terms)
        key1, aux1 = snap_group(kmap, neighbours, neighbour_keys, xval, waux, GROUP, inv, this_scale, Laux, terms)
        points = key0 | (key1 << 16) | (np.int64(aux0) << 32) | (np.int64(aux1) << 33)
        # The trial before's points and flags give the same sums: had that trial won, this one would
        # store the same values again; had it lost, best is unchanged and this one loses too.
        if points == last:
            continue
        last = points
        sumqx, sumq2 = fit_scale(xval, weight, Laux, 16)
        if sumq2 > F32(0.0) and F32(sumqx * sumqx) > F32(best * sumq2):
            scale = F32(sumqx / sumq2)
            best = F32(scale * sumqx)
            L[:16] = Laux[:16]
            on_grid0 = aux0
            on_grid1 = aux1
    if (not on_grid0 or not on_grid1) and scale > F32(0.0):
        inv = F32(F32(1.0) / scale)
        if not on_grid0:
            snap_group(kmap, neighbours, neighbour_keys, xval, waux, 0, inv, scale, L, terms)
        if not on_grid1:
            snap_group(kmap, neighbours, neighbour_keys, xval, waux, GROUP, inv, scale, L, terms)
        sumqx, sumq2 = fit_scale(xval, weight, L, 16)
        if sumq2 > F32(0.0):
            scale = F32(sumqx / sumq2)
    return scale


@njit(cache=True, inline="always")
def point_index(kmap: np.ndarray, L: np.ndarray, base: int) -> int:
    """Codebook index of the levels L[base:base+8] (always on the codebook after a search)."""
    u = 0
    for i in range(GROUP):
        u |= np.int64(L[base + i]) << (2 * i)
    return kmap[u]


@njit(cache=True, error_model="numpy")
def scale_code(inv_d: np.float32, scale: np.float32) -> int:
    """A group's 4-bit scale code against the block's d (ggml: nearest_int(0.5·(scale/d − 1)))."""
    return max(0, min(15, nearest_int(F32(F32(0.5) * F32(F32(inv_d * scale) - F32(1.0))))))


@njit(cache=True, error_model="numpy")
def block_weights(
    xbl: np.ndarray, qwbl: np.ndarray, sigma2: np.float32, weight: np.ndarray, waux: np.ndarray, at: int, n: int
) -> None:
    """weight = qw·√(σ² + x²) and waux = √weight over xbl[at:at+n] (the importance-weighted path)."""
    for i in range(n):
        x = xbl[at + i]
        weight[i] = F32(qwbl[at + i] * np.sqrt(F32(sigma2 + F32(x * x))))
    for i in range(n):
        waux[i] = np.sqrt(weight[i])


@njit(cache=True)
def sum_squares(xbl: np.ndarray) -> np.float32:
    """Σx² over a super-block, sequential as in ggml."""
    s = F32(0.0)
    for v in xbl:
        s = F32(s + F32(v * v))
    return s
