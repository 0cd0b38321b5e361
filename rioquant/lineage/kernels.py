"""Numba kernels of `rioquant lineage`: one pass over a piece gives every sum the report needs.

Every statistic is a function of a few sums over elements, so each piece of a tensor is read once and
reduced here, block by block while the block is in cache, to per-block sums; the fit, its bootstrap,
the null and the verdict then work on those sums alone.

Notation, for one piece with parents P_0 … P_{k-1} and child W:
    R = P_{k-1}                       the reference parent (the last --parent)
    y = W − R                         the child's task vector
    X = [P_0 − R, …, P_{k-2} − R, R]  the parents' task vectors, and R itself (a weight sum ≠ 1)

Element arrays are float32, or uint16 holding bfloat16 bits (every source stored as bfloat16: the
bytes as read, half the memory traffic); `_f32` widens an element either way.

The moment sums run in any order (`reassoc` lets LLVM vectorise them; they are float64 and feed
statistics, not bytes). The exact-reproduction count is the opposite: it recomputes a merge as a merge
tool does, so it lives in its own function, compiled without any fast-math flag, with float32
arithmetic in the tool's order (LLVM keeps each instruction's flags when it inlines).
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from rioquant.kernels.common import f32_as_i32, i32_as_f32

F32 = np.float32
MOMENT_MATH = {"reassoc", "nsz"}
MODE_FLOAT32 = 0  # Σ w_i·P_i in float32, rounded once to the child's dtype (mergekit ≥ 0.1, torch on float32)
MODE_BFLOAT16 = 1  # every product rounded to bfloat16, summed in float32, rounded (torch on bfloat16 tensors)
MODE_FUSED = 2  # Σ w_i·P_i in float32 by fused multiply-adds (mergekit 0.1.5's addcmul_ on an FMA CPU or a GPU)


def _f32(x):
    """An element as float32: float arrays as they are, uint16 arrays as bfloat16 bit patterns (read
    straight from the file: no float32 copy of a bfloat16 model is ever made)."""


@overload(_f32, inline="always")
def _f32_overload(x):
    if isinstance(x, types.Float):
        return lambda x: np.float32(x)
    if isinstance(x, types.Integer) and x.bitwidth == 16 and not x.signed:
        return lambda x: i32_as_f32(np.int32(np.int64(x) << 16))
    return None


@njit(nogil=True, cache=True, fastmath=MOMENT_MATH)
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    s = 0.0
    for t in range(a.shape[0]):
        s += np.float64(a[t]) * np.float64(b[t])
    return s


@njit(nogil=True, cache=True, inline="always")
def _to_bf16(v: np.float32) -> np.float32:
    """float32 → the nearest bfloat16 (ties to even), as torch and ggml round; branch-free, so the loops
    around it vectorise (two's-complement addition is the same on the signed bits)."""
    bits = np.int64(f32_as_i32(v))
    return i32_as_f32(np.int32((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536))


@njit(nogil=True, cache=True, inline="always")
def _equal(v: np.float32, u: np.float32) -> int:
    return (f32_as_i32(v) == f32_as_i32(u)) | ((v == F32(0.0)) & (u == F32(0.0)))


@njit(nogil=True, cache=True, inline="always")
def _fma(p: np.float32, wi: np.float32, acc: np.float32) -> np.float32:
    """acc + wi·p rounded once to float32, as a fused multiply-add does (Python 3.11 and Numba have no fma).

    wi·p is exact in float64 (24 + 24 significant bits), and so is the sum as s + err (two-sum). Rounding
    s to float32 is then the single rounding of the exact sum, except when s lands on a float32 midpoint
    while err ≠ 0: the exact sum lies past it on err's side. (A midpoint is a float64, so rounding to
    float64 never carries the sum across one.)"""
    prod = np.float64(wi) * np.float64(p)
    a64 = np.float64(acc)
    s = a64 + prod
    back = s - a64
    err = (a64 - (s - back)) + (prod - back)
    r = F32(s)
    d = s - np.float64(r)
    if err != 0.0 and d != 0.0:
        other = np.nextafter(r, F32(np.inf) if d > 0.0 else F32(-np.inf))
        if s == (np.float64(r) + np.float64(other)) * 0.5 and (err > 0.0) == (d > 0.0):
            r = other
    return r


@njit(nogil=True, cache=True)
def _exact_two(w, a, b, wa, wb, mode) -> int:
    """_exact_block for bf16(wa·A + wb·B), fused: one vectorised loop per arithmetic."""
    count = 0
    if mode == MODE_BFLOAT16:
        for t in range(w.shape[0]):
            v = _to_bf16(F32(_to_bf16(F32(wa * _f32(a[t]))) + _to_bf16(F32(wb * _f32(b[t])))))
            count += _equal(v, _f32(w[t]))
    elif mode == MODE_FUSED:
        for t in range(w.shape[0]):
            count += _equal(_to_bf16(_fma(_f32(b[t]), wb, F32(wa * _f32(a[t])))), _f32(w[t]))
    else:
        for t in range(w.shape[0]):
            count += _equal(_to_bf16(F32(F32(wa * _f32(a[t])) + F32(wb * _f32(b[t])))), _f32(w[t]))
    return count


@njit(nogil=True, cache=True)
def _exact_block(w, parents, lo, hi, weights, mode, denominator, round_bf16, acc) -> int:
    """How many of w[lo:hi] one candidate merge reproduces bit for bit (+0 and −0 taken as equal).

    One loop per operation of the merge, in the merge's order, each over the whole block; two parents
    and a bfloat16 child (the common case) take one fused loop instead."""
    m = hi - lo
    if len(parents) == 2 and round_bf16 and denominator == F32(1.0):
        return _exact_two(w[lo:hi], parents[0][lo:hi], parents[1][lo:hi], weights[0], weights[1], mode)
    for i in range(len(parents)):
        p = parents[i]
        wi = weights[i]
        if i == 0 and mode == MODE_BFLOAT16:
            for t in range(m):
                acc[t] = _to_bf16(F32(wi * _f32(p[lo + t])))
        elif i == 0:
            for t in range(m):
                acc[t] = F32(wi * _f32(p[lo + t]))
        elif mode == MODE_BFLOAT16:
            for t in range(m):
                acc[t] = F32(acc[t] + _to_bf16(F32(wi * _f32(p[lo + t]))))
        elif mode == MODE_FUSED:
            for t in range(m):
                acc[t] = _fma(_f32(p[lo + t]), wi, acc[t])
        else:
            for t in range(m):
                acc[t] = F32(acc[t] + F32(wi * _f32(p[lo + t])))
    if mode == MODE_BFLOAT16:
        for t in range(m):
            acc[t] = _to_bf16(acc[t])
    if denominator != F32(1.0):
        for t in range(m):
            acc[t] = F32(acc[t] / denominator)
    if round_bf16:
        for t in range(m):
            acc[t] = _to_bf16(acc[t])
    count = 0
    for t in range(m):
        count += _equal(acc[t], _f32(w[lo + t]))
    return count


@njit(nogil=True, cache=True, inline="always")
def _ulp(v: np.float32, ulp_scale: np.float64) -> np.float64:
    """The spacing of v's float format at v: v's power of two (its exponent field alone, a float) times
    2^-mantissa_bits (`ulp_scale`); zero for zero. Branch-free, so the loops around it vectorise."""
    return np.float64(i32_as_f32(np.int32(np.int64(f32_as_i32(v)) & 0x7F800000))) * ulp_scale


@njit(nogil=True, cache=True, fastmath=MOMENT_MATH)
def _floor(w, ulp_scale) -> float:
    """Σ ulp² over w; the expected squared error of rounding to w's format is that over 12."""
    total = 0.0
    for t in range(w.shape[0]):
        u = _ulp(_f32(w[t]), ulp_scale)
        total += u * u
    return total


@njit(nogil=True, cache=True, fastmath=MOMENT_MATH)
def _moments_two(w, a, r, x, y, ulp_scale, out) -> None:
    """Two parents: X = [A − R, R] and y = W − R in one loop; x and y are kept for the null.
    out = (xx, xr, rr, xy, ry, yy, Σ ulp(w)²)."""
    xx = xr = rr = xy = ry = yy = uu = 0.0
    for t in range(w.shape[0]):
        u = _ulp(_f32(w[t]), ulp_scale)
        uu += u * u
        rt = _f32(r[t])
        xt = _f32(a[t]) - rt
        yt = _f32(w[t]) - rt
        x[t] = xt
        y[t] = yt
        x64, r64, y64 = np.float64(xt), np.float64(rt), np.float64(yt)
        xx += x64 * x64
        xr += x64 * r64
        rr += r64 * r64
        xy += x64 * y64
        ry += r64 * y64
        yy += y64 * y64
    out[0], out[1], out[2], out[3], out[4], out[5], out[6] = xx, xr, rr, xy, ry, yy, uu


@njit(nogil=True, cache=True, fastmath=MOMENT_MATH)
def _moments(w, parents, lo, hi, cols, gram, cross, ulp_scale, sums) -> None:
    """One block's XᵀX into gram, Xᵀy into cross, then (yᵀy, Σ ulp(w)²) into sums[5:7]; the columns are
    left in cols[0..k] (X's, then y). Two parents take one fused loop; more take one dot per pair."""
    k = len(parents)
    ref = parents[k - 1]
    m = hi - lo
    if k == 2:
        _moments_two(w[lo:hi], parents[0][lo:hi], ref[lo:hi], cols[0, :m], cols[k, :m], ulp_scale, sums)
        gram[0, 0], gram[0, 1], gram[1, 0], gram[1, 1] = sums[0], sums[1], sums[1], sums[2]
        cross[0], cross[1] = sums[3], sums[4]
        return
    for t in range(m):
        r = _f32(ref[lo + t])
        cols[k, t] = _f32(w[lo + t]) - r
        cols[k - 1, t] = r
    for i in range(k - 1):
        p = parents[i]
        for t in range(m):
            cols[i, t] = _f32(p[lo + t]) - _f32(ref[lo + t])
    for i in range(k):
        for j in range(i, k):
            g = _dot(cols[i, :m], cols[j, :m])
            gram[i, j] = g
            gram[j, i] = g
        cross[i] = _dot(cols[i, :m], cols[k, :m])
    sums[5] = _dot(cols[k, :m], cols[k, :m])
    sums[6] = _floor(w[lo:hi], ulp_scale)


@njit(nogil=True, cache=True, fastmath=MOMENT_MATH)
def _null_dots(y, ring, b, out) -> None:
    """out[j-1] = y · ring[(b − j) mod len(ring)] for j = 1 … len(out), in one pass over y. The blocks of a
    piece have equal lengths but the last, which is shorter, so every ring row covers y."""
    m = y.shape[0]
    slots = ring.shape[0]
    n = out.shape[0]
    if n == 4:
        r1, r2, r3, r4 = ring[(b - 1) % slots], ring[(b - 2) % slots], ring[(b - 3) % slots], ring[(b - 4) % slots]
        s1 = s2 = s3 = s4 = 0.0
        for t in range(m):
            yt = np.float64(y[t])
            s1 += yt * np.float64(r1[t])
            s2 += yt * np.float64(r2[t])
            s3 += yt * np.float64(r3[t])
            s4 += yt * np.float64(r4[t])
        out[0], out[1], out[2], out[3] = s1, s2, s3, s4
        return
    for j in range(1, n + 1):
        out[j - 1] = _dot(y, ring[(b - j) % slots, :m])


@njit(nogil=True, cache=True, fastmath=MOMENT_MATH)
def reduce_piece(w, parents, bounds, ulp_scale, n_shifts, gram, cross, yy, null_cross,
                 weights, modes, denominators, round_bf16, best, sample_step, block_offset, matched, tested):
    """Reduce one piece, block by block (elements bounds[b]:bounds[b+1]); returns the best candidate.

    Per block b: gram[b] = XᵀX (k, k), cross[b] = Xᵀy (k,), yy[b] = yᵀy. Over the piece:
    null_cross[j-1, i] += y_b · (P_i − R)_{b−j} for b ≥ n_shifts, the child's task vector against the
    parents' task vectors of the block j places earlier (block-permuted regressors: the null); the returned floor
    is the child's expected squared rounding error (ulp_scale 2^-mantissa bits; 0: not a float). Candidate
    merges (rows of `weights`, with `modes` and `denominators`) are counted into matched/tested:
    `best` on every block, the others on blocks whose index (plus block_offset) is a multiple of
    sample_step. best < 0: choose it on the first block.
    """
    k = len(parents)
    n_blocks = bounds.shape[0] - 1
    longest = 0
    for b in range(n_blocks):
        longest = max(longest, bounds[b + 1] - bounds[b])
    cols = np.empty((k + 1, longest), dtype=np.float32)  # X's columns, then y
    ring = np.zeros((max(k - 1, 1), n_shifts + 1, longest), dtype=np.float32)  # recent blocks' P_i − R
    acc = np.empty(longest, dtype=np.float32)
    null_sums = np.zeros(max(n_shifts, 1))
    sums = np.empty(7)
    floor = 0.0
    for b in range(n_blocks):
        lo, hi = bounds[b], bounds[b + 1]
        m = hi - lo
        _moments(w, parents, lo, hi, cols, gram[b], cross[b], ulp_scale, sums)
        yy[b] = sums[5]
        floor += sums[6] / 12.0
        slot = b % (n_shifts + 1)
        for i in range(k - 1):
            ring[i, slot, :m] = cols[i, :m]
            if b >= n_shifts:  # the null needs n_shifts earlier blocks of this piece
                _null_dots(cols[k, :m], ring[i], b, null_sums)
                for j in range(n_shifts):
                    null_cross[j, i] += null_sums[j]
        for c in range(weights.shape[0]):
            if best < 0 or c == best or (b + block_offset) % sample_step == 0:
                matched[c] += _exact_block(w, parents, lo, hi, weights[c], modes[c], denominators[c], round_bf16, acc)
                tested[c] += m
        if best < 0 and weights.shape[0] > 0:
            best = np.argmax(matched)
    return floor, best
