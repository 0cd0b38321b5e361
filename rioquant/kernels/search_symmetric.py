"""ggml's searches for a symmetric scale: `make_qx_quants` and `make_q3_quants`, bit for bit.

Q6_K, Q3_K, and the importance paths of Q4_0 / Q5_0 pick each group's scale with these (and
`requantize` is the pass that Q6_K and Q3_K make afterwards against the rounded scales). Each call
searches every group of a quantized row: x (groups, n) → scales (groups,) and levels L (groups, n),
shifted to be non-negative (`l + nmax`) as ggml stores them (an all-zero group gets levels 0). Groups
are independent, so this is ggml's per-group routine over all groups; the row at once lets us index
x[g, i] with i counting from 0 (LLVM then hoists Numba's negative-index fix-up and uses plain vector
loads) and lets make_q3_quants put the groups on the vector lanes.

Speed without changing a bit — every float operation is ggml's, in ggml's order, in float32:
- make_qx_quants tries 19 candidate scales, and each candidate's two sums must be accumulated in
  element order (float addition does not reassociate). ggml runs the candidates one after another,
  each a chain of dependent adds; we run them side by side — element outer, candidate inner — so
  every sum still sees its terms in ggml's order, but the chains are independent and the inner loop
  vectorises. The winner is then chosen by replaying ggml's acceptance test in candidate order.
- make_q3_quants runs all groups in lockstep, one group per vector lane (see its docstring).
- nearest_int's clamped result is computed in float from the bits of t + 1.5·2^23 (_level_f), which
  keeps the lanes 32-bit and reproduces ggml's output for out-of-range and NaN arguments too.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from rioquant.kernels.common import F32, GROUP_MAX_EPS, MAGIC_ROUND, f32_as_i32, i32_as_f32, nearest_int

# Candidate 0 is ggml's first guess (-nmax / max); candidates 1..18 are its nudges is = -9..-1, 1..9.
N_CANDIDATES = 19
N_LANES = 24  # candidates padded to whole SIMD vectors
NUDGE_STEP = F32(0.1)
SWEEP_BATCH = 32  # make_q3_quants' sweeps step over lanes in multiples of this (whole vectors)
# Rows of make_qx_quants' working array.
_NUMERATOR, _ISCALE, _SUMLX, _SUML2, _W, _WX = range(6)


@intrinsic
def _trailing_zeros(typingctx, value):
    """Index of the lowest set bit of a non-zero int64 (LLVM cttz)."""
    if value != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.int64(types.int64), codegen


@njit(cache=True, error_model="numpy", inline="always")
def _level(iscale: np.float32, v: np.float32, nmax: int) -> int:
    """ggml's clamp(nearest_int(iscale·v), -nmax, nmax-1), before the +nmax shift."""
    return max(-nmax, min(nmax - 1, nearest_int(F32(iscale * v))))


@njit(cache=True, error_model="numpy", inline="always")
def _level_f(t: np.float32, lo: np.float32, hi: np.float32) -> np.float32:
    """clamp(nearest_int(t), lo, hi) as a float, for any t (out-of-range garbage included).

    nearest_int's result is the low 23 bits of t + 1.5·2^23, minus 2^22: done in float, every step
    is exact, and the lanes stay 32-bit instead of widening to int64.
    """
    mantissa = F32(f32_as_i32(F32(t + MAGIC_ROUND)) & 0x007FFFFF)
    return max(lo, min(hi, F32(mantissa - F32(4194304.0))))


@njit(cache=True, error_model="numpy", inline="always")
def group_max(x: np.ndarray, g: int) -> tuple[np.float32, np.float32]:
    """(max |x[g]|, the signed value holding it): the first one wins ties and NaNs never win, as in
    ggml's running `if (|x| > amax)` (x can hold NaN when make_qx_quants searches Q3_K's scales).

    That running compare is a chain; on the bit patterns of |x| (which order like the floats) both
    the maximum and the first index reaching it are integer reductions, which vectorise. An all-zero
    group gives (0, +0), ggml's initial values, whatever the signs of its zeros.
    """
    n = x.shape[1]
    top = 0
    for i in range(n):
        bits = f32_as_i32(x[g, i]) & 0x7FFFFFFF
        top = max(top, bits if bits <= 0x7F800000 else 0)
    at_top = 0
    for i in range(n):
        if f32_as_i32(x[g, i]) & 0x7FFFFFFF == top:
            at_top |= 1 << i
    return i32_as_f32(np.int32(top)), x[g, _trailing_zeros(at_top)] if top != 0 else F32(0.0)


@njit(cache=True, error_model="numpy", inline="always")
def _write_levels(x: np.ndarray, L: np.ndarray, g: int, iscale: np.float32, nmax: int, shift: int) -> None:
    """A loop of its own, so the clamps vectorise instead of becoming branches inside a sum loop."""
    for i in range(x.shape[1]):
        L[g, i] = shift + _level(iscale, x[g, i], nmax)


@njit(cache=True, error_model="numpy", inline="always")
def _fill_weights(x: np.ndarray, g: int, rmse_type: int, qw: np.ndarray, work: np.ndarray) -> None:
    """work[_W] = ggml's weights for group g (qw if given, else by rmse_type), work[_WX] = w·x."""
    for i in range(x.shape[1]):
        v = x[g, i]
        if qw.size != 0:
            wi = qw[g, i]
        elif rmse_type == 1:
            wi = F32(v * v)
        elif rmse_type == 2:
            wi = F32(1.0)
        elif rmse_type == 3:
            wi = abs(v)
        else:
            wi = F32(np.sqrt(abs(v)))
        work[_W, i] = wi
        work[_WX, i] = F32(wi * v)


@njit(cache=True, error_model="numpy", inline="always")
def _first_fit(
    x: np.ndarray, L: np.ndarray, g: int, iscale: np.float32, nmax: int, work: np.ndarray
) -> np.float32:
    """The negative-rmse_type exit: fit of the first candidate, averaged with 1/iscale."""
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(x.shape[1]):
        l = _level(iscale, x[g, i], nmax)
        L[g, i] = l + nmax
        fl = F32(l)
        sumlx += F32(work[_WX, i] * fl)
        suml2 += F32(F32(work[_W, i] * fl) * fl)
    scale = F32(sumlx / suml2) if suml2 != F32(0.0) else F32(0.0)
    return F32(F32(0.5) * F32(scale + F32(F32(1.0) / iscale))) if suml2 > 0 else F32(F32(1.0) / iscale)


@njit(cache=True, error_model="numpy", inline="always")
def _best_candidate(
    x: np.ndarray, L: np.ndarray, g: int, vmax: np.float32, nmax: int, work: np.ndarray
) -> np.float32:
    """ggml's 19-candidate search for group g, weights already in work; writes the winner's levels."""
    for c in range(N_LANES):
        work[_ISCALE, c] = F32(work[_NUMERATOR, c] / vmax)
        work[_SUMLX, c] = F32(0.0)
        work[_SUML2, c] = F32(0.0)
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    for i in range(x.shape[1]):  # element outer, candidate inner: independent chains, each in ggml's order
        v = x[g, i]
        wi = work[_W, i]
        wxi = work[_WX, i]
        for c in range(N_LANES):
            fl = _level_f(F32(work[_ISCALE, c] * v), lo, hi)
            work[_SUMLX, c] += F32(wxi * fl)
            work[_SUML2, c] += F32(F32(wi * fl) * fl)

    sumlx = work[_SUMLX, 0]
    suml2 = work[_SUML2, 0]
    scale = F32(sumlx / suml2) if suml2 != F32(0.0) else F32(0.0)
    best = F32(scale * sumlx)
    winner = 0
    for c in range(1, N_CANDIDATES):
        sumlx = work[_SUMLX, c]
        suml2 = work[_SUML2, c]
        if suml2 > 0 and F32(sumlx * sumlx) > F32(best * suml2):
            scale = F32(sumlx / suml2)
            best = F32(scale * sumlx)
            winner = c
    _write_levels(x, L, g, work[_ISCALE, winner], nmax, nmax)
    return scale


@njit(cache=True, error_model="numpy")
def make_qx_quants(
    nmax: int, x: np.ndarray, L: np.ndarray, scales: np.ndarray, rmse_type: int, qw: np.ndarray
) -> None:
    """Per group, the scale minimising the weighted error Σw(x - s·l)² over ggml's 19 candidates.

    qw is (groups, n) or empty; when empty rmse_type picks the weight (1: x², 2: 1, 3: |x|, other:
    √|x|). rmse_type 0 skips the search; a negative value stops after the first candidate.
    """
    n_groups, n = x.shape
    work = np.empty((6, max(n, N_LANES)), dtype=np.float32)
    # candidate c's iscale is work[_NUMERATOR, c] / max; lanes past the 19 repeat candidate 0
    work[_NUMERATOR, :] = F32(-nmax)
    for c, step in enumerate((-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9)):
        work[_NUMERATOR, c + 1] = -F32(F32(nmax) + F32(NUDGE_STEP * F32(step)))
    for g in range(n_groups):
        amax, vmax = group_max(x, g)
        if amax < GROUP_MAX_EPS:  # all zero
            for i in range(n):
                L[g, i] = 0
            scales[g] = F32(0.0)
            continue
        iscale = F32(F32(-nmax) / vmax)
        if rmse_type == 0:
            _write_levels(x, L, g, iscale, nmax, nmax)
            scales[g] = F32(F32(1.0) / iscale)
            continue
        _fill_weights(x, g, abs(rmse_type), qw, work)
        if rmse_type < 0:
            scales[g] = _first_fit(x, L, g, iscale, nmax, work)
        else:
            scales[g] = _best_candidate(x, L, g, vmax, nmax, work)


@njit(cache=True, error_model="numpy")
def make_q3_quants(nmax: int, x: np.ndarray, L: np.ndarray, scales: np.ndarray, do_rmse: bool) -> None:
    """Per group, a scale for x²-weighted levels refined by up to 5 sweeps of one-level moves.

    x must be finite (quantizer input). A move is kept when it raises (Σwxl)²/Σwl²; `x·sl2/slx` can
    be far out of int range when slx is tiny, and nearest_int's bit-cast garbage there is part of
    ggml's output, so it is kept too.

    All groups advance in lockstep with groups along the vector lanes (x transposed to (element,
    group)): element i of every group is visited at once, each lane with its own running sums, so
    every group sees exactly ggml's sequence of operations. ggml stops a group after a sweep that
    moved nothing; another sweep from the same state would move nothing either, so running the
    sweeps until no group moves gives the same levels.
    """
    n_groups, n = x.shape
    if not do_rmse:
        for g in range(n_groups):
            amax, vmax = group_max(x, g)
            iscale = F32(F32(-nmax) / vmax)
            _write_levels(x, L, g, iscale, nmax, nmax)
            scales[g] = F32(F32(1.0) / iscale)
            if amax < GROUP_MAX_EPS:  # all zero
                L[g, :] = 0
                scales[g] = F32(0.0)
        return

    lanes = -(-n_groups // SWEEP_BATCH) * SWEEP_BATCH  # columns padded with zeros, which never move
    xt = np.zeros((n, lanes), dtype=np.float32)  # (element, group)
    for g in range(n_groups):
        for i in range(n):
            xt[i, g] = x[g, i]
    amax = np.zeros(n_groups, dtype=np.float32)
    for i in range(n):
        for g in range(n_groups):
            amax[g] = max(amax[g], abs(xt[i, g]))
    vmax = np.zeros(n_groups, dtype=np.float32)
    for i in range(n - 1, -1, -1):  # the first element reaching the max is written last
        for g in range(n_groups):
            if abs(xt[i, g]) == amax[g]:
                vmax[g] = xt[i, g]
    iscale = np.empty(n_groups, dtype=np.float32)
    for g in range(n_groups):
        iscale[g] = F32(F32(-nmax) / vmax[g])  # ±inf for an all-zero group; overwritten below

    lt = np.zeros((n, lanes), dtype=np.float32)  # levels before the +nmax shift, as floats
    sumlx = np.zeros(lanes, dtype=np.float32)  # Σ w·x·l with w = x²
    suml2 = np.zeros(lanes, dtype=np.float32)  # Σ w·l²
    for i in range(n):
        for g in range(n_groups):
            v = xt[i, g]
            fl = F32(_level(iscale[g], v, nmax))
            lt[i, g] = fl
            w = F32(v * v)
            sumlx[g] += F32(F32(w * v) * fl)
            suml2[g] += F32(F32(w * fl) * fl)

    # Sweeps over the groups still moving, kept packed in the first `active` lanes: lane k holds
    # group active_groups[k]. A group leaves after a sweep in which it did not move. Sweeps run
    # over whole batches of lanes (a scalar remainder would be slow); lanes past `active` hold
    # stale copies whose results are ignored.
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    active_groups = np.arange(n_groups)
    moved = np.empty(lanes, dtype=np.bool_)
    active = n_groups
    for sweep in range(5):
        batch = -(-active // SWEEP_BATCH) * SWEEP_BATCH
        moved[:batch] = False
        for i in range(n):
            for k in range(batch):  # ggml's step for element i, as selects so the lanes vectorise
                v = xt[i, k]
                w = F32(v * v)
                wx = F32(w * v)
                fl = lt[i, k]
                sx = sumlx[k]
                s2 = suml2[k]
                slx = F32(sx - F32(wx * fl))
                sl2 = F32(s2 - F32(F32(w * fl) * fl))
                new_l = _level_f(F32(F32(v * sl2) / slx), lo, hi)
                slx_new = F32(slx + F32(wx * new_l))
                sl2_new = F32(sl2 + F32(F32(w * new_l) * new_l))
                accept = (
                    (slx > 0)
                    & (new_l != fl)
                    & (sl2_new > 0)
                    & (F32(F32(slx_new * slx_new) * s2) > F32(F32(sx * sx) * sl2_new))
                )
                lt[i, k] = new_l if accept else fl
                sumlx[k] = slx_new if accept else sx
                suml2[k] = sl2_new if accept else s2
                moved[k] |= accept
        still = 0
        for k in range(active):
            if moved[k] and sweep < 4:  # keep it, packed to the front
                active_groups[still] = active_groups[k]
                sumlx[still] = sumlx[k]
                suml2[still] = suml2[k]
                for i in range(n):
                    xt[i, still] = xt[i, k]
                    lt[i, still] = lt[i, k]
                still += 1
            else:
                g = active_groups[k]
                if amax[g] < GROUP_MAX_EPS:  # all zero: levels 0, not shifted, as in ggml
                    for i in range(n):
                        L[g, i] = 0
                    scales[g] = F32(0.0)
                else:
                    for i in range(n):
                        L[g, i] = nmax + np.int64(lt[i, k])
                    scales[g] = F32(sumlx[k] / suml2[k]) if suml2[k] > F32(0.0) else F32(0.0)
        active = still


@njit(cache=True, error_model="numpy")
def requantize(x: np.ndarray, group_step: np.ndarray, nmax: int, levels: np.ndarray) -> None:
    """ggml's second pass: levels = clamp(nearest_int(x / step), -nmax, nmax-1) + nmax against each
    group's stored (rounded) step; a group whose step is 0 keeps the levels of its search.

    The step is first repeated per weight: with an indexed load or a branch on the step in the
    division loop, LLVM would not vectorise it.
    """
    group = x.size // group_step.size
    step = np.empty(x.size, dtype=np.float32)
    for g in range(group_step.size):
        for i in range(group):
            step[g * group + i] = group_step[g]
    for k in range(x.size):
        l = max(-nmax, min(nmax - 1, nearest_int(F32(x[k] / step[k])))) + nmax
        levels[k] = l if step[k] != F32(0.0) else levels[k]
