"""ggml's scale searches for affine (scale + min) quants: make_qkx2/qkx3_quants and make_qp_quants.

They must reproduce ggml's choices bit for bit, so every float op stays float32 and in ggml's order,
and each reduction over a group's elements stays sequential. The speed comes from the other axis:
ggml tries `nstep + 1` candidate scales one after the other, each re-reading the group; here one
pass over the group feeds all candidates at once (the innermost loop runs over candidates, which
the compiler vectorizes), so each candidate's sums are still accumulated in element order.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, GROUP_MAX_EPS, f32_as_i32, nearest_int

MAX_GROUP = 32  # the largest group any affine type searches (Q4_K / Q5_K / Q5_1 sub-blocks)
MAX_CANDIDATES = 37  # make_qkx3_quants with nstep = 36
SCRATCH_WIDTH = max(MAX_GROUP, MAX_CANDIDATES)
# Rows of the per-row scratch buffer used by the candidate search.
_ISCALE, _SUM_L, _SUM_L2, _SUM_XL, _DET, _SCALE, _MIN, _ERROR, _WEIGHT = range(9)


@njit(cache=True)
def new_scratch() -> np.ndarray:
    """Per-row work space for the searches; allocate once per row, not per group."""
    return np.empty((9, SCRATCH_WIDTH), dtype=np.float32)


@njit(cache=True, inline="always")
def _clamp(l: int, nmax: int) -> int:
    return max(0, min(nmax, l))


@njit(cache=True, error_model="numpy")
def _affine_search(
    n: int, nmax: int, x: np.ndarray, xo: int, w: np.ndarray, L: np.ndarray, lo: int,
    rmin: np.float32, rdelta: np.float32, nstep: int, use_mad: bool, scratch: np.ndarray,
) -> tuple[np.float32, np.float32]:
    """Weighted least-squares (or least-|error|) fit of x[xo:xo+n] ≈ scale·L + min over candidate scales.

    Writes the chosen levels to L[lo:lo+n] and returns (scale, -min). qkx2 and qkx3 differ only in
    their degenerate-group test (`max == min` vs `max <= min`), which agree because min ≤ max always.
    """
    fmin = x[xo]
    fmax = x[xo]
    sum_w = w[0]
    sum_x = F32(sum_w * x[xo])
    for i in range(1, n):
        xi = x[xo + i]
        if xi < fmin:
            fmin = xi
        if xi > fmax:
            fmax = xi
        sum_w = F32(sum_w + w[i])
        sum_x = F32(sum_x + F32(w[i] * xi))
    if fmin > F32(0.0):
        fmin = F32(0.0)
    if fmax <= fmin:
        for i in range(n):
            L[lo + i] = 0
        return F32(0.0), F32(-fmin)
    span = F32(fmax - fmin)
    iscale = F32(F32(nmax) / span)
    scale = F32(F32(1.0) / iscale)
    best_error = F32(0.0)
    for i in range(n):
        xi = x[xo + i]
        l = _clamp(nearest_int(F32(iscale * F32(xi - fmin))), nmax)
        L[lo + i] = l
        diff = F32(F32(F32(scale * F32(l)) + fmin) - xi)
        diff = abs(diff) if use_mad else F32(diff * diff)
        best_error = F32(best_error + F32(w[i] * diff))
    if nstep < 1:
        return scale, F32(-fmin)

    ncand = nstep + 1
    cand_iscale = scratch[_ISCALE]
    sum_l = scratch[_SUM_L]
    sum_l2 = scratch[_SUM_L2]
    sum_xl = scratch[_SUM_XL]
    det = scratch[_DET]
    cand_scale = scratch[_SCALE]
    cand_min = scratch[_MIN]
    error = scratch[_ERROR]
    first = 0
    while first < ncand:
        # Candidates first.. are evaluated together against the current best min; the scan below
        # accepts them in ggml's order and restarts after the first one that moves the min.
        span = F32(fmax - fmin)
        for c in range(first, ncand):
            cand_iscale[c] = F32(F32(F32(rmin + F32(rdelta * F32(c))) + F32(nmax)) / span)
            sum_l[c] = F32(0.0)
            sum_l2[c] = F32(0.0)
            sum_xl[c] = F32(0.0)
        for i in range(n):
            xi = x[xo + i]
            dx = F32(xi - fmin)
            wi = w[i]
            for c in range(first, ncand):
                fl = F32(_clamp(nearest_int(F32(cand_iscale[c] * dx)), nmax))
                wl = F32(wi * fl)
                sum_l[c] = F32(sum_l[c] + wl)
                sum_l2[c] = F32(sum_l2[c] + F32(wl * fl))
                sum_xl[c] = F32(sum_xl[c] + F32(wl * xi))
        for c in range(first, ncand):
            D = F32(F32(sum_w * sum_l2[c]) - F32(sum_l[c] * sum_l[c]))
            this_scale = F32(F32(F32(sum_w * sum_xl[c]) - F32(sum_x * sum_l[c])) / D)
            this_min = F32(F32(F32(sum_l2[c] * sum_x) - F32(sum_l[c] * sum_xl[c])) / D)
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = F32(sum_xl[c] / sum_l2[c])
            det[c] = D
            cand_scale[c] = this_scale
            cand_min[c] = this_min
            error[c] = F32(0.0)
        for i in range(n):
            xi = x[xo + i]
            dx = F32(xi - fmin)
            wi = w[i]
            for c in range(first, ncand):
                fl = F32(_clamp(nearest_int(F32(cand_iscale[c] * dx)), nmax))
                diff = F32(F32(F32(cand_scale[c] * fl) + cand_min[c]) - xi)
                diff = abs(diff) if use_mad else F32(diff * diff)
                error[c] = F32(error[c] + F32(wi * diff))

        restart = ncand
        for c in range(first, ncand):
            if det[c] > F32(0.0) and error[c] < best_error:
                best_error = error[c]
                scale = cand_scale[c]
                for i in range(n):
                    L[lo + i] = _clamp(nearest_int(F32(cand_iscale[c] * F32(x[xo + i] - fmin))), nmax)
                if f32_as_i32(cand_min[c]) != f32_as_i32(fmin):
                    fmin = cand_min[c]
                    restart = c + 1
                    break
        first = restart
    return scale, F32(-fmin)


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(
    n: int, nmax: int, x: np.ndarray, xo: int, weights: np.ndarray, L: np.ndarray, lo: int,
    rmin: np.float32, rdelta: np.float32, nstep: int, use_mad: bool, scratch: np.ndarray,
) -> tuple[np.float32, np.float32]:
    """ggml make_qkx2_quants on x[xo:xo+n] with weights[0:n]: returns (scale, the_min)."""
    return _affine_search(n, nmax, x, xo, weights, L, lo, rmin, rdelta, nstep, use_mad, scratch)


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(
    n: int, nmax: int, x: np.ndarray, xo: int, weights: np.ndarray, L: np.ndarray, lo: int,
    rmin: np.float32, rdelta: np.float32, nstep: int, use_mad: bool, scratch: np.ndarray,
) -> tuple[np.float32, np.float32]:
    """ggml make_qkx3_quants; an empty `weights` stands for ggml's NULL, which weighs each x by x²."""
    if weights.size == 0:
        weights = scratch[_WEIGHT]
        for i in range(n):
            weights[i] = F32(x[xo + i] * x[xo + i])
    return _affine_search(n, nmax, x, xo, weights, L, lo, rmin, rdelta, nstep, use_mad, scratch)


@njit(cache=True, error_model="numpy")
def make_qp_quants(n: int, nmax: int, x: np.ndarray, L: np.ndarray, quant_weights: np.ndarray) -> np.float32:
    """ggml make_qp_quants: one positive scale for the non-negative x[0:n] (sub-block scales or mins).

    A coarse scan of 9 scales, then up to 5 rounds of moving single levels while that raises the
    weighted correlation. Levels are stored as uint8 as in ggml, so the modular truncation matches.
    """
    fmax = F32(0.0)
    for i in range(n):
        fmax = fmax if fmax > x[i] else x[i]
    if fmax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(F32(nmax) / fmax)
    for i in range(n):
        L[i] = np.uint8(nearest_int(F32(iscale * x[i])) & 0xFF)
    scale = F32(F32(1.0) / iscale)
    best_mse = F32(0.0)
    for i in range(n):
        diff = F32(x[i] - F32(scale * F32(L[i])))
        best_mse = F32(best_mse + F32(F32(quant_weights[i] * diff) * diff))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = F32(F32(F32(F32(0.1) * F32(step)) + F32(nmax)) / fmax)
        scale_is = F32(F32(1.0) / iscale_is)
        mse = F32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(F32(iscale_is * x[i])))
            diff = F32(x[i] - F32(scale_is * F32(l)))
            mse = F32(mse + F32(F32(quant_weights[i] * diff) * diff))
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(F32(iscale * x[i])))
        L[i] = np.uint8(l & 0xFF)
        w = quant_weights[i]
        sumlx = F32(sumlx + F32(F32(w * x[i]) * F32(l)))
        suml2 = F32(suml2 + F32(F32(w * F32(l)) * F32(l)))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            li = F32(L[i])
            slx = F32(sumlx - F32(F32(w * x[i]) * li))
            sl2 = F32(suml2 - F32(F32(w * li) * li))
            if slx > F32(0.0) and sl2 > F32(0.0):
                new_l = min(nmax, nearest_int(F32(F32(x[i] * sl2) / slx)))
                if new_l != L[i]:
                    fl = F32(new_l)
                    slx = F32(slx + F32(F32(w * x[i]) * fl))
                    sl2 = F32(sl2 + F32(F32(w * fl) * fl))
                    if F32(F32(slx * slx) * suml2) > F32(F32(sumlx * sumlx) * sl2):
                        L[i] = np.uint8(new_l & 0xFF)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return F32(sumlx / suml2) if suml2 > F32(0.0) else F32(0.0)
