"""ggml's searches for a symmetric scale: `make_qx_quants` and `make_q3_quants`, bit for bit.

Q6_K, Q3_K, and the importance paths of Q4_0 / Q5_0 pick each group's scale with these. Both return
the scale and write levels shifted to be non-negative (`l + nmax`) into L[l0 : l0 + n].

Speed without changing a bit: `make_qx_quants` tries 19 candidate scales, and each candidate's two
sums must be accumulated in element order (float addition does not reassociate). ggml runs the
candidates one after another, each a chain of dependent adds; we run them side by side — element
outer, candidate inner — so every candidate's sum still sees its terms in ggml's order, but the 19
chains are independent and the inner loop vectorises. The winner is then chosen by replaying ggml's
acceptance test in candidate order, and only the winner's levels are written.

Arrays are passed with offsets (x0, l0, w0) instead of slices so hot loops build no array views.
An empty weight array stands for C's `qw == NULL`.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, GROUP_MAX_EPS, nearest_int

# Candidate 0 is ggml's first guess (-nmax / max); candidates 1..18 are its nudges is = -9..-1, 1..9.
N_CANDIDATES = 19
NUDGE_STEP = F32(0.1)
# Rows of the scratch array make_qx_quants works in (one row per quantity, 32 columns: n ≤ 32).
_ISCALE, _SUMLX, _SUML2, _W, _WX = range(5)
SCRATCH_ROWS, SCRATCH_COLS = 5, 32


@njit(cache=True)
def new_scratch() -> np.ndarray:
    """Working memory for make_qx_quants; allocate once per row, not once per group."""
    return np.empty((SCRATCH_ROWS, SCRATCH_COLS), dtype=np.float32)


@njit(cache=True, inline="always")
def _level(iscale: np.float32, v: np.float32, nmax: int) -> int:
    """ggml's clamp(nearest_int(iscale·v), -nmax, nmax-1), before the +nmax shift."""
    return max(-nmax, min(nmax - 1, nearest_int(F32(iscale * v))))


@njit(cache=True, inline="always")
def _group_max(x: np.ndarray, x0: int, n: int) -> tuple[np.float32, np.float32]:
    """(max |x|, the signed value holding it): the first one wins ties, as in ggml."""
    amax = F32(0.0)
    vmax = F32(0.0)
    for i in range(x0, x0 + n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    return amax, vmax


@njit(cache=True)
def make_qx_quants(
    n: int,
    nmax: int,
    x: np.ndarray,
    x0: int,
    L: np.ndarray,
    l0: int,
    rmse_type: int,
    qw: np.ndarray,
    w0: int,
    scratch: np.ndarray,
) -> np.float32:
    """Scale minimising the weighted error Σw(x - s·l)² over ggml's 19 candidate scales.

    rmse_type picks the weight when qw is empty (1: x², 2: 1, 3: |x|, other: √|x|); 0 skips the
    search; a negative value stops after the first candidate and averages its fit with -max/nmax.
    """
    amax, vmax = _group_max(x, x0, n)
    if amax < GROUP_MAX_EPS:
        for i in range(l0, l0 + n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(F32(-nmax) / vmax)
    if rmse_type == 0:
        for i in range(n):
            L[l0 + i] = nmax + _level(iscale, x[x0 + i], nmax)
        return F32(F32(1.0) / iscale)
    return_early = rmse_type < 0
    rmse_type = abs(rmse_type)

    w = scratch[_W]
    wx = scratch[_WX]
    for i in range(n):
        v = x[x0 + i]
        if qw.size != 0:
            wi = qw[w0 + i]
        elif rmse_type == 1:
            wi = F32(v * v)
        elif rmse_type == 2:
            wi = F32(1.0)
        elif rmse_type == 3:
            wi = abs(v)
        else:
            wi = F32(np.sqrt(abs(v)))
        w[i] = wi
        wx[i] = F32(wi * v)

    if return_early:
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = _level(iscale, x[x0 + i], nmax)
            L[l0 + i] = l + nmax
            fl = F32(l)
            sumlx += F32(wx[i] * fl)
            suml2 += F32(F32(w[i] * fl) * fl)
        scale = F32(sumlx / suml2) if suml2 != F32(0.0) else F32(0.0)
        return F32(F32(0.5) * F32(scale + F32(F32(1.0) / iscale))) if suml2 > 0 else F32(F32(1.0) / iscale)

    iscales = scratch[_ISCALE]
    sumlxs = scratch[_SUMLX]
    suml2s = scratch[_SUML2]
    iscales[0] = iscale
    c = 1
    for step in range(-9, 10):
        if step != 0:
            iscales[c] = F32(-F32(F32(nmax) + F32(NUDGE_STEP * F32(step))) / vmax)
            c += 1
    for c in range(N_CANDIDATES):
        sumlxs[c] = F32(0.0)
        suml2s[c] = F32(0.0)
    for i in range(n):  # element outer, candidate inner: 19 independent chains, each in ggml's order
        v = x[x0 + i]
        wi = w[i]
        wxi = wx[i]
        for c in range(N_CANDIDATES):
            fl = F32(_level(iscales[c], v, nmax))
            sumlxs[c] += F32(wxi * fl)
            suml2s[c] += F32(F32(wi * fl) * fl)

    sumlx = sumlxs[0]
    suml2 = suml2s[0]
    scale = F32(sumlx / suml2) if suml2 != F32(0.0) else F32(0.0)
    best = F32(scale * sumlx)
    winner = 0
    for c in range(1, N_CANDIDATES):
        sumlx = sumlxs[c]
        suml2 = suml2s[c]
        if suml2 > 0 and F32(sumlx * sumlx) > F32(best * suml2):
            scale = F32(sumlx / suml2)
            best = F32(scale * sumlx)
            winner = c
    iscale = iscales[winner]
    for i in range(n):
        L[l0 + i] = nmax + _level(iscale, x[x0 + i], nmax)
    return scale


@njit(cache=True)
def make_q3_quants(n: int, nmax: int, x: np.ndarray, x0: int, L: np.ndarray, l0: int, do_rmse: bool) -> np.float32:
    """Scale for x²-weighted levels, refined by up to 5 sweeps of one-level-at-a-time moves.

    A move is kept when it raises (Σwxl)²/Σwl²; `x·sl2/slx` can be far out of int range when slx
    is tiny, and nearest_int's bit-cast garbage there is part of ggml's output, so it is kept too.
    """
    amax, vmax = _group_max(x, x0, n)
    if amax < GROUP_MAX_EPS:
        for i in range(l0, l0 + n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(F32(-nmax) / vmax)
    if not do_rmse:
        for i in range(n):
            L[l0 + i] = nmax + _level(iscale, x[x0 + i], nmax)
        return F32(F32(1.0) / iscale)

    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        v = x[x0 + i]
        l = _level(iscale, v, nmax)
        L[l0 + i] = l
        fl = F32(l)
        w = F32(v * v)
        sumlx += F32(F32(w * v) * fl)
        suml2 += F32(F32(w * fl) * fl)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            v = x[x0 + i]
            w = F32(v * v)
            wx = F32(w * v)
            fl = F32(L[l0 + i])
            slx = F32(sumlx - F32(wx * fl))
            if slx > 0:
                sl2 = F32(suml2 - F32(F32(w * fl) * fl))
                new_l = max(-nmax, min(nmax - 1, nearest_int(F32(F32(v * sl2) / slx))))
                if new_l != L[l0 + i]:
                    fnew = F32(new_l)
                    slx = F32(slx + F32(wx * fnew))
                    sl2 = F32(sl2 + F32(F32(w * fnew) * fnew))
                    if sl2 > 0 and F32(F32(slx * slx) * suml2) > F32(F32(sumlx * sumlx) * sl2):
                        L[l0 + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(l0, l0 + n):
        L[i] += nmax
    return F32(sumlx / suml2) if suml2 > F32(0.0) else F32(0.0)
