"""ggml's make_qp_quants: one positive scale, no min, for non-negative values (search_affine's sibling).

Q2_K and Q4_K code their sub-block scales and mins with it; IQ2_XXS starts its search from
it. It works on one short vector at a time, so unlike the affine searches it is a plain loop.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, GROUP_MAX_EPS, nearest_int


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
