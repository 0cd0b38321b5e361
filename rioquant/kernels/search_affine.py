"""ggml's scale searches for affine (scale + min) quants: make_qkx2_quants and make_qkx3_quants.

They must reproduce ggml's choices bit for bit, so every float op stays float32 and in ggml's order,
and each group's reductions over its elements stay sequential. ggml tries `nstep + 1` candidate
scales one after another, re-reading the group for each, and moves its running `min` whenever a
candidate wins, which changes every later candidate. Here the groups of a super-block are searched
together, in rounds: each round gives every group still searching its next CHUNK candidates, all
evaluated against the group's current min in one pass over the elements, with candidates innermost
so that the compiler vectorizes across them and the many independent accumulator chains hide each
other's latency. Winners are then taken in ggml's order; the first that moves the min ends the
group's round, and the candidates after it are evaluated again in the next.

`error_model="numpy"`: a candidate whose determinant is not positive divides by zero; ggml skips
it before dividing, we divide and then discard it, which must not raise.
"""

from collections.abc import Callable

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, MAGIC_ROUND, f32_as_i32, nearest_int

MAX_BATCH = 16  # groups searched together: Q2_K's 16 sub-blocks, Q4_K/Q5_K's 8, Q5_1's 8 blocks
MAX_GROUP = 32  # elements per group (a multiple of 4)
CHUNK = 8  # candidates a group evaluates per round
FAST_LEVEL_LIMIT = F32(2097152.0)  # 2^21: |iscale·(x - min)| below it may take _level_near
VECTOR = 8  # float32 lanes of the SIMD vectors the candidate loops compile to
_SLOTS = MAX_BATCH * CHUNK
# The scratch buffer is one flat float32 array of regions at constant offsets, so the compiler can
# tell them apart and vectorize without run-time alias checks.
# Per candidate slot (group g's k-th candidate of the round at g·CHUNK + k):
_ISCALE, _SUM_L, _SUM_L2, _SUM_XL, _DET, _SCALE, _MIN, _ERROR = (r * _SLOTS for r in range(8))
# Per group: current min, max, smallest x, Σw, Σw·x, best error and scale, the plain scale's
# 1/scale, whether a candidate has beaten the plain scale, and the 1/scale and min that the best
# candidate's levels come from.
_GROUP = 8 * _SLOTS
_FMIN, _FMAX, _DMIN, _SUM_W, _SUM_X, _BEST, _BEST_SCALE, _ISCALE0, _WON, _BEST_ISCALE, _BEST_SHIFT = (
    _GROUP + r * MAX_BATCH for r in range(11)
)
# Per element, element-major (element i of group g at i·MAX_BATCH + g): x, weight, plain-scale level.
_XT = _GROUP + 11 * MAX_BATCH
_WT = _XT + MAX_GROUP * MAX_BATCH
_LT = _WT + MAX_GROUP * MAX_BATCH
SCRATCH_SIZE = _LT + MAX_GROUP * MAX_BATCH

LevelFn = Callable[[np.float32, np.int32], np.float32]  # _level or _level_near


@njit(cache=True)
def new_scratch() -> np.ndarray:
    """Work space for the searches; allocate once per row, not per group."""
    return np.empty(SCRATCH_SIZE, dtype=np.float32)


@njit(cache=True)
def _level(v: np.float32, nmax: np.int32) -> np.float32:
    """float(clamp(nearest_int(v), 0, nmax)) for any v, in int32 so the loops vectorize narrowly."""
    bits = f32_as_i32(F32(v + MAGIC_ROUND))
    l = np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000))
    return F32(np.int32(max(np.int32(0), np.int32(min(nmax, l)))))


@njit(cache=True)
def _level_near(v: np.float32, nmax: np.int32) -> np.float32:
    """_level for |v| < FAST_LEVEL_LIMIT, where v + 1.5·2^23 lands in [2^23, 2^24) and its rounding
    is the whole answer: clamping and subtracting stay in float, two instructions fewer."""
    r = F32(v + MAGIC_ROUND)
    r = r if r > MAGIC_ROUND else MAGIC_ROUND
    top = F32(MAGIC_ROUND + F32(nmax))
    r = r if r < top else top
    return F32(r - MAGIC_ROUND)


@njit(cache=True)
def _lanes(first: int, ncand: int) -> int:
    """CHUNK (each round's candidates, padded to whole vectors), as a run-time value: with a literal
    trip count LLVM unrolls the candidate loop into scalar code before its vectorizer sees it."""
    return (min(CHUNK, ncand - first) + VECTOR - 1) // VECTOR * VECTOR


@njit(cache=True, error_model="numpy")
def _start(groups: int, n: int, nmax: np.int32, use_mad: bool, s: np.ndarray) -> None:
    """ggml's first passes, for all groups at once: range, weight sums, levels and error of the
    plain scale nmax/(max - min). The innermost loops run across groups, each group's sums in
    element order."""
    for g in range(groups):
        x0 = s[_XT + g]
        s[_FMIN + g] = x0
        s[_FMAX + g] = x0
        s[_SUM_W + g] = s[_WT + g]
        s[_SUM_X + g] = F32(s[_WT + g] * x0)
    for i in range(1, n):
        for g in range(groups):
            xi = s[_XT + i * MAX_BATCH + g]
            wi = s[_WT + i * MAX_BATCH + g]
            s[_FMIN + g] = xi if xi < s[_FMIN + g] else s[_FMIN + g]
            s[_FMAX + g] = xi if xi > s[_FMAX + g] else s[_FMAX + g]
            s[_SUM_W + g] = F32(s[_SUM_W + g] + wi)
            s[_SUM_X + g] = F32(s[_SUM_X + g] + F32(wi * xi))
    for g in range(groups):
        s[_DMIN + g] = s[_FMIN + g]
        fmin = F32(0.0) if s[_FMIN + g] > F32(0.0) else s[_FMIN + g]
        iscale = F32(F32(nmax) / F32(s[_FMAX + g] - fmin))
        s[_FMIN + g] = fmin
        s[_ISCALE0 + g] = iscale
        s[_BEST_SCALE + g] = F32(F32(1.0) / iscale)
        s[_BEST + g] = F32(0.0)
    for i in range(n):
        for g in range(groups):
            xi = s[_XT + i * MAX_BATCH + g]
            fmin = s[_FMIN + g]
            fl = _level(F32(s[_ISCALE0 + g] * F32(xi - fmin)), nmax)
            s[_LT + i * MAX_BATCH + g] = fl
            diff = F32(F32(F32(s[_BEST_SCALE + g] * fl) + fmin) - xi)
            diff = abs(diff) if use_mad else F32(diff * diff)
            s[_BEST + g] = F32(s[_BEST + g] + F32(s[_WT + i * MAX_BATCH + g] * diff))


@njit(cache=True, error_model="numpy")
def _sums_pass(
    level: LevelFn, groups: int, n: int, nmax: np.int32, first: np.ndarray, ncand: int, s: np.ndarray,
) -> None:
    """Σw·l, Σw·l², Σw·l·x of each searching group's candidates of the round.

    Four elements per step quarter the accumulator loads and stores; each sum still adds the
    elements one at a time, in order.
    """
    for i in range(0, n, 4):
        r0 = i * MAX_BATCH
        r1 = r0 + MAX_BATCH
        r2 = r1 + MAX_BATCH
        r3 = r2 + MAX_BATCH
        for g in range(groups):
            if first[g] >= ncand:
                continue
            base = g * CHUNK
            fmin = s[_FMIN + g]
            x0, x1, x2, x3 = s[_XT + r0 + g], s[_XT + r1 + g], s[_XT + r2 + g], s[_XT + r3 + g]
            w0, w1, w2, w3 = s[_WT + r0 + g], s[_WT + r1 + g], s[_WT + r2 + g], s[_WT + r3 + g]
            dx0, dx1, dx2, dx3 = F32(x0 - fmin), F32(x1 - fmin), F32(x2 - fmin), F32(x3 - fmin)
            for k in range(_lanes(first[g], ncand)):
                iscale = s[_ISCALE + base + k]
                l0 = level(F32(iscale * dx0), nmax)
                l1 = level(F32(iscale * dx1), nmax)
                l2 = level(F32(iscale * dx2), nmax)
                l3 = level(F32(iscale * dx3), nmax)
                wl0, wl1, wl2, wl3 = F32(w0 * l0), F32(w1 * l1), F32(w2 * l2), F32(w3 * l3)
                acc = s[_SUM_L + base + k]
                acc = F32(F32(F32(F32(acc + wl0) + wl1) + wl2) + wl3)
                s[_SUM_L + base + k] = acc
                acc = s[_SUM_L2 + base + k]
                acc = F32(acc + F32(wl0 * l0))
                acc = F32(acc + F32(wl1 * l1))
                acc = F32(acc + F32(wl2 * l2))
                s[_SUM_L2 + base + k] = F32(acc + F32(wl3 * l3))
                acc = s[_SUM_XL + base + k]
                acc = F32(acc + F32(wl0 * x0))
                acc = F32(acc + F32(wl1 * x1))
                acc = F32(acc + F32(wl2 * x2))
                s[_SUM_XL + base + k] = F32(acc + F32(wl3 * x3))


@njit(cache=True, error_model="numpy")
def _solve(groups: int, first: np.ndarray, ncand: int, s: np.ndarray) -> None:
    """Each candidate's least-squares scale and min (min clamped to ≤ 0, as ggml does)."""
    for g in range(groups):
        if first[g] >= ncand:
            continue
        base = g * CHUNK
        sum_w = s[_SUM_W + g]
        sum_x = s[_SUM_X + g]
        for k in range(_lanes(first[g], ncand)):
            sl = s[_SUM_L + base + k]
            sl2 = s[_SUM_L2 + base + k]
            sxl = s[_SUM_XL + base + k]
            D = F32(F32(sum_w * sl2) - F32(sl * sl))
            this_scale = F32(F32(F32(sum_w * sxl) - F32(sum_x * sl)) / D)
            this_min = F32(F32(F32(sl2 * sum_x) - F32(sl * sxl)) / D)
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = F32(sxl / sl2)
            s[_DET + base + k] = D
            s[_SCALE + base + k] = this_scale
            s[_MIN + base + k] = this_min
            s[_ERROR + base + k] = F32(0.0)


@njit(cache=True)
def _error_term(
    scale: np.float32, fmin: np.float32, fl: np.float32, x: np.float32, use_mad: bool,
) -> np.float32:
    """ggml's per-element error: |scale·l + min - x| or its square."""
    diff = F32(F32(F32(scale * fl) + fmin) - x)
    return abs(diff) if use_mad else F32(diff * diff)


@njit(cache=True, error_model="numpy")
def _error_pass(
    level: LevelFn, groups: int, n: int, nmax: np.int32, use_mad: bool, first: np.ndarray, ncand: int,
    s: np.ndarray,
) -> None:
    """Σw·|err| or Σw·err² of each searching group's candidates, accumulated in element order."""
    for i in range(0, n, 4):
        r0 = i * MAX_BATCH
        r1 = r0 + MAX_BATCH
        r2 = r1 + MAX_BATCH
        r3 = r2 + MAX_BATCH
        for g in range(groups):
            if first[g] >= ncand:
                continue
            base = g * CHUNK
            fmin = s[_FMIN + g]
            x0, x1, x2, x3 = s[_XT + r0 + g], s[_XT + r1 + g], s[_XT + r2 + g], s[_XT + r3 + g]
            w0, w1, w2, w3 = s[_WT + r0 + g], s[_WT + r1 + g], s[_WT + r2 + g], s[_WT + r3 + g]
            dx0, dx1, dx2, dx3 = F32(x0 - fmin), F32(x1 - fmin), F32(x2 - fmin), F32(x3 - fmin)
            for k in range(_lanes(first[g], ncand)):
                iscale = s[_ISCALE + base + k]
                scale = s[_SCALE + base + k]
                cmin = s[_MIN + base + k]
                e0 = _error_term(scale, cmin, level(F32(iscale * dx0), nmax), x0, use_mad)
                e1 = _error_term(scale, cmin, level(F32(iscale * dx1), nmax), x1, use_mad)
                e2 = _error_term(scale, cmin, level(F32(iscale * dx2), nmax), x2, use_mad)
                e3 = _error_term(scale, cmin, level(F32(iscale * dx3), nmax), x3, use_mad)
                acc = s[_ERROR + base + k]
                acc = F32(acc + F32(w0 * e0))
                acc = F32(acc + F32(w1 * e1))
                acc = F32(acc + F32(w2 * e2))
                s[_ERROR + base + k] = F32(acc + F32(w3 * e3))


@njit(cache=True)
def _accept(g: int, first: int, ncand: int, s: np.ndarray) -> int:
    """Take group g's winners of this round in ggml's order; returns its next candidate.

    A winner that moves the min ends the round: the candidates after it were evaluated against
    the old min. Only the last winner's levels survive, so a winner records the scale and min its
    levels come from instead of writing them.
    """
    base = g * CHUNK
    fmin = s[_FMIN + g]
    for k in range(min(CHUNK, ncand - first)):
        if s[_DET + base + k] > F32(0.0) and s[_ERROR + base + k] < s[_BEST + g]:
            s[_BEST + g] = s[_ERROR + base + k]
            s[_BEST_SCALE + g] = s[_SCALE + base + k]
            s[_WON + g] = F32(1.0)
            s[_BEST_ISCALE + g] = s[_ISCALE + base + k]
            s[_BEST_SHIFT + g] = fmin
            if f32_as_i32(s[_MIN + base + k]) != f32_as_i32(fmin):
                s[_FMIN + g] = s[_MIN + base + k]
                return first + k + 1
    return first + CHUNK


@njit(cache=True, error_model="numpy")
def _affine_search(
    groups: int, n: int, nmax: int, x: np.ndarray, w: np.ndarray, L: np.ndarray,
    rmin: np.float32, rdelta: np.float32, nstep: int, use_mad: bool,
    scales: np.ndarray, the_mins: np.ndarray, s: np.ndarray,
) -> None:
    """Weighted least-squares (or least-|error|) fits x ≈ scale·L + min of `groups` groups of n.

    Group g is x[g·n : (g+1)·n] with weights w[g·n : (g+1)·n]; its levels go to L[g·n : (g+1)·n],
    its scale to scales[g] and -min to the_mins[g]. qkx2 and qkx3 differ only in their
    degenerate-group test (`max == min` vs `max <= min`), which agree because min ≤ max always.

    ggml moves `min` whenever a candidate wins, and every later candidate depends on it, so a
    group's round ends at its first winner that moves the min; its later candidates go again.
    """
    assert groups <= MAX_BATCH and n <= MAX_GROUP and n % 4 == 0, "search batch outside the scratch layout"
    for g in range(groups):
        for i in range(n):
            s[_XT + i * MAX_BATCH + g] = x[g * n + i]
            s[_WT + i * MAX_BATCH + g] = w[g * n + i]
    nmax32 = np.int32(nmax)
    _start(groups, n, nmax32, use_mad, s)
    ncand = nstep + 1 if nstep >= 1 else 0
    first = np.empty(groups, dtype=np.int64)  # each group's next candidate; ncand once settled
    for g in range(groups):
        degenerate = s[_FMAX + g] <= s[_FMIN + g]
        if degenerate:  # ggml: all levels 0, scale 0, nothing to search
            s[_BEST_SCALE + g] = F32(0.0)
            for i in range(n):
                s[_LT + i * MAX_BATCH + g] = F32(0.0)
        s[_WON + g] = F32(0.0)
        first[g] = ncand if degenerate else 0

    while True:
        searching = False
        all_near = True  # every level of the round is within reach of the cheaper _level_near
        for g in range(groups):
            if first[g] >= ncand:
                continue
            searching = True
            base = g * CHUNK
            fmin = s[_FMIN + g]
            span = F32(s[_FMAX + g] - fmin)
            c0 = first[g]
            for k in range(CHUNK):
                c = F32(c0 + k)
                s[_ISCALE + base + k] = F32(F32(F32(rmin + F32(rdelta * c)) + F32(nmax)) / span)
            for k in range(CHUNK):
                s[_SUM_L + base + k] = F32(0.0)
                s[_SUM_L2 + base + k] = F32(0.0)
                s[_SUM_XL + base + k] = F32(0.0)
            # With span > 0 the 1/scales are monotonic in k, and x - min lies between dmin - min
            # and max - min, rounding included: the end candidates bound every |level argument|.
            top = max(abs(s[_ISCALE + base]), abs(s[_ISCALE + base + CHUNK - 1]))
            reach = max(abs(F32(s[_DMIN + g] - fmin)), span)
            all_near = all_near and span > F32(0.0) and F32(top * reach) < FAST_LEVEL_LIMIT
        if not searching:
            break
        if all_near:
            _sums_pass(_level_near, groups, n, nmax32, first, ncand, s)
            _solve(groups, first, ncand, s)
            _error_pass(_level_near, groups, n, nmax32, use_mad, first, ncand, s)
        else:
            _sums_pass(_level, groups, n, nmax32, first, ncand, s)
            _solve(groups, first, ncand, s)
            _error_pass(_level, groups, n, nmax32, use_mad, first, ncand, s)
        for g in range(groups):
            if first[g] < ncand:
                first[g] = _accept(g, first[g], ncand, s)

    for g in range(groups):
        scales[g] = s[_BEST_SCALE + g]
        the_mins[g] = -s[_FMIN + g]
        won = s[_WON + g] != F32(0.0)
        iscale = s[_BEST_ISCALE + g]
        shift = s[_BEST_SHIFT + g]
        for i in range(n):
            if won:
                xi = s[_XT + i * MAX_BATCH + g]
                L[g * n + i] = max(0, min(nmax, nearest_int(F32(iscale * F32(xi - shift)))))
            else:
                L[g * n + i] = np.uint8(s[_LT + i * MAX_BATCH + g])


@njit(cache=True)
def make_qkx2_quants(
    groups: int, n: int, nmax: int, x: np.ndarray, weights: np.ndarray, L: np.ndarray,
    rmin: np.float32, rdelta: np.float32, nstep: int, use_mad: bool,
    scales: np.ndarray, the_mins: np.ndarray, scratch: np.ndarray,
) -> None:
    """ggml make_qkx2_quants on each of `groups` consecutive groups of n (see _affine_search)."""
    _affine_search(groups, n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, scales, the_mins, scratch)


@njit(cache=True)
def make_qkx3_quants(
    groups: int, n: int, nmax: int, x: np.ndarray, weights: np.ndarray, L: np.ndarray,
    rmin: np.float32, rdelta: np.float32, nstep: int, use_mad: bool,
    scales: np.ndarray, the_mins: np.ndarray, scratch: np.ndarray,
) -> None:
    """ggml make_qkx3_quants on each group; an empty `weights` is ggml's NULL: each x weighs x²."""
    if weights.size == 0:
        weights = np.empty(groups * n, dtype=np.float32)
        for i in range(groups * n):
            weights[i] = F32(x[i] * x[i])
    _affine_search(groups, n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, scales, the_mins, scratch)
