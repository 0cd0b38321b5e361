"""IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear codebook kvalues_iq4nl (16 int8 values).

Block layouts:
  IQ4_NL (18 bytes, 32 weights):  d: fp16 | qs: u8[16]
  IQ4_XS (136 bytes, 256 weights): d: fp16 | scales_h: u16 | scales_l: u8[4] | qs: u8[128]
  weight = d·kvalues[q] (IQ4_NL), d·(ls - 32)·kvalues[q] for sub-block j of 32 (IQ4_XS), with ls the
  6-bit scale whose low 4 bits are nibble j of scales_l and high 2 bits are bits 2j, 2j+1 of scales_h.
  qs as Q4_0: per 32 weights, byte l holds index l (low nibble) and l+16 (high nibble).
ggml_quantize_chunk runs quantize_row_iq4_nl_impl with ntry = 7 on both paths; importance only
changes the weights (qw·√(σ² + x²) with σ² = 2·Σx²/block, else x²). Per 32 weights it tries 16
scales and keeps the one that maximises (Σw·q·x)²/Σw·q², each level being best_index_int8: the
codebook entry nearest to x/scale, ties settled by ggml's float32 differences.

Speed: ggml's best_index_int8 is a branchy binary search per weight and candidate. Here the nearest
entry is a count of decision thresholds at or below the argument (`_THRESHOLDS`: the smallest float
for which ggml picks the upper of two neighbours, found once by bisection on ggml's own test), so the
16 candidates run side by side as vector lanes, each lane's sums in ggml's element order.
"""

import numpy as np
from gguf import quants as gguf_quants
from numba import njit

from rioquant.kernels.common import F32, GROUP_MAX_EPS, load_fp16, nearest_int, store_fp16

QK = 32  # weights per scale (the whole IQ4_NL block, an IQ4_XS sub-block)
QK_K = 256
NSUB = QK_K // QK
NL_BYTES = 2 + QK // 2
XS_BYTES = 2 + 2 + NSUB // 2 + QK_K // 2
XS_SCALES_H_AT, XS_SCALES_L_AT, XS_QS_AT = 2, 4, 8
NTRY = 7  # ggml_quantize_chunk's ntry for both types: candidates -7..7 around -kvalues[0]
N_CAND = 2 * NTRY + 2  # the first-guess scale, then the 15 tries


def _decision_thresholds(values: np.ndarray) -> np.ndarray:
    """For each pair of neighbouring codebook values (a, b): the smallest float32 x with
    fl(x - a) >= fl(b - x), where best_index_int8 starts to pick b. The test is monotone in x
    (float rounding is), so bisection over the ordered float32 values between a and b finds it."""

    def key(f: np.float32) -> int:  # float32 → integer of the same order
        bits = int(np.float32(f).view(np.int32))
        return bits if bits >= 0 else -(bits & 0x7FFFFFFF)

    def value(k: int) -> np.float32:
        bits = k if k >= 0 else (-k) | 0x80000000
        return np.array([bits], dtype=np.uint32).view(np.float32)[0]

    out = np.empty(values.size - 1, dtype=np.float32)
    for i in range(values.size - 1):
        a, b = F32(values[i]), F32(values[i + 1])
        lo, hi = key(a), key(b)  # picks a at lo, b at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            x = value(mid)
            if F32(x - a) >= F32(b - x):
                hi = mid
            else:
                lo = mid
        out[i] = value(hi)
    return out


KVALUES = np.array(gguf_quants.IQ4_NL.kvalues, dtype=np.float32)  # format data, from gguf-py
_THRESHOLDS = _decision_thresholds(KVALUES)
_STEPS = np.diff(KVALUES).astype(np.float32)  # value gained crossing each threshold
_V0 = KVALUES[0]


@njit(cache=True, inline="always")
def _index(al: np.float32) -> int:
    """best_index_int8(16, kvalues, al), NaN included (ggml's search ends at 15 for NaN)."""
    idx = 0
    for k in range(_THRESHOLDS.size):
        idx += 0 if al < _THRESHOLDS[k] else 1
    return idx


@njit(cache=True, inline="always")
def _value(al: np.float32) -> np.float32:
    """kvalues[best_index_int8(al)] as a float, summed from the thresholds (no table gather)."""
    q = _V0
    for k in range(_THRESHOLDS.size):
        q += F32(0.0) if al < _THRESHOLDS[k] else _STEPS[k]
    return q


@njit(cache=True, error_model="numpy")
def _best_scale(x: np.ndarray, xo: int, w: np.ndarray, work: np.ndarray) -> np.float32:
    """The scale ggml picks for the 32 weights at x[xo:] with weights w[0:32]; 0 for an all-zero group."""
    amax = F32(0.0)
    vmax = F32(0.0)
    for j in range(QK):
        ax = abs(x[xo + j])
        if ax > amax:
            amax = ax
            vmax = x[xo + j]
    if amax < GROUP_MAX_EPS:
        return F32(0.0)
    inv = work[0]
    sqx = work[1]
    sq2 = work[2]
    inv[0] = F32(F32(1.0) / F32(F32(-vmax) / _V0))  # id = 1/d, d = -max/kvalues[0]
    for c in range(1, N_CAND):
        inv[c] = F32(F32(F32(c - 1 - NTRY) + _V0) / vmax)  # id = (itry + kvalues[0])/max
    ncand = work.shape[1]  # a run-time trip count, so the lanes loop is vectorized, not unrolled
    for c in range(ncand):
        sqx[c] = F32(0.0)
        sq2[c] = F32(0.0)
    for j in range(QK):
        xj = x[xo + j]
        wj = w[j]
        for c in range(ncand):
            q = _value(F32(inv[c] * xj))
            wq = F32(wj * q)
            sqx[c] = F32(sqx[c] + F32(wq * xj))
            sq2[c] = F32(sq2[c] + F32(wq * q))
    d = F32(sqx[0] / sq2[0]) if sq2[0] > F32(0.0) else F32(0.0)
    best = F32(d * sqx[0])
    for c in range(1, N_CAND):
        if sq2[c] > F32(0.0) and F32(sqx[c] * sqx[c]) > F32(best * sq2[c]):
            d = F32(sqx[c] / sq2[c])
            best = F32(d * sqx[c])
    return d


@njit(cache=True, error_model="numpy")
def _weights(x: np.ndarray, xo: int, n: int, importance: np.ndarray, w: np.ndarray) -> None:
    """ggml's weights for the super-block x[xo:xo+n] into w[0:n]: qw·√(σ² + x²), σ² = 2·Σx²/n, or x²."""
    if importance.size == 0:
        for j in range(n):
            w[j] = F32(x[xo + j] * x[xo + j])
        return
    sum_x2 = F32(0.0)
    for j in range(n):
        sum_x2 = F32(sum_x2 + F32(x[xo + j] * x[xo + j]))
    sigma2 = F32(F32(sum_x2 * F32(2.0)) / F32(n))
    for j in range(n):
        w[j] = F32(importance[xo + j] * np.sqrt(F32(sigma2 + F32(x[xo + j] * x[xo + j]))))


@njit(cache=True, error_model="numpy")
def _store_indices(x: np.ndarray, xo: int, inv: np.float32, out: np.ndarray, qo: int) -> None:
    """best_index_int8(inv·x) of the 32 weights at x[xo:], packed as 16 bytes at out[qo:]."""
    for j in range(QK // 2):
        lo = _index(F32(inv * x[xo + j]))
        hi = _index(F32(inv * x[xo + j + QK // 2]))
        out[qo + j] = lo | (hi << 4)


@njit(cache=True)
def _new_work() -> np.ndarray:
    """Per-row candidate lanes: 1/scale, Σw·q·x, Σw·q² of each of the N_CAND candidates."""
    return np.empty((3, N_CAND), dtype=np.float32)


@njit(cache=True, error_model="numpy")
def quantize_row_iq4_nl(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    w = np.empty(QK, dtype=np.float32)
    work = _new_work()
    for ib in range(x.size // QK):
        xo = ib * QK
        ob = ib * NL_BYTES
        _weights(x, xo, QK, importance, w)
        d = _best_scale(x, xo, w, work)
        store_fp16(out, ob, d)
        _store_indices(x, xo, F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0), out, ob + 2)


@njit(cache=True, error_model="numpy")
def quantize_row_iq4_xs(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    w = np.empty(QK_K, dtype=np.float32)
    work = _new_work()
    scales = np.empty(NSUB, dtype=np.float32)
    for ibl in range(x.size // QK_K):
        xo = ibl * QK_K
        ob = ibl * XS_BYTES
        _weights(x, xo, QK_K, importance, w)
        max_scale = F32(0.0)
        amax_scale = F32(0.0)
        for ib in range(NSUB):
            d = _best_scale(x, xo + ib * QK, w[ib * QK :], work)
            scales[ib] = d
            if abs(d) > amax_scale:
                amax_scale = abs(d)
                max_scale = d
        d = F32(F32(-max_scale) / F32(32.0))
        store_fp16(out, ob, d)
        inv = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
        scales_h = 0
        for ib in range(NSUB):
            l = max(-32, min(31, nearest_int(F32(inv * scales[ib]))))
            dl = F32(d * F32(l))
            _store_indices(x, xo + ib * QK, F32(F32(1.0) / dl) if dl != F32(0.0) else F32(0.0), out,
                           ob + XS_QS_AT + ib * QK // 2)
            l += 32
            if ib % 2 == 0:
                out[ob + XS_SCALES_L_AT + ib // 2] = l & 0xF
            else:
                out[ob + XS_SCALES_L_AT + ib // 2] |= (l & 0xF) << 4
            scales_h |= (l >> 4) << (2 * ib)
        out[ob + XS_SCALES_H_AT] = scales_h & 0xFF
        out[ob + XS_SCALES_H_AT + 1] = scales_h >> 8


@njit(cache=True)
def _dequantize_group(data: np.ndarray, qo: int, d: np.float32, out: np.ndarray, yo: int) -> None:
    for j in range(QK // 2):
        q = np.int64(data[qo + j])
        out[yo + j] = F32(d * KVALUES[q & 0xF])
        out[yo + j + QK // 2] = F32(d * KVALUES[q >> 4])


@njit(cache=True)
def dequantize_row_iq4_nl(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK):
        _dequantize_group(data, ib * NL_BYTES + 2, load_fp16(data, ib * NL_BYTES), out, ib * QK)


@njit(cache=True)
def dequantize_row_iq4_xs(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        b0 = ibl * XS_BYTES
        d = load_fp16(data, b0)
        scales_h = np.int64(data[b0 + XS_SCALES_H_AT]) | (np.int64(data[b0 + XS_SCALES_H_AT + 1]) << 8)
        for ib in range(NSUB):
            low = (np.int64(data[b0 + XS_SCALES_L_AT + ib // 2]) >> (4 * (ib % 2))) & 0xF
            ls = low | (((scales_h >> (2 * ib)) & 3) << 4)
            _dequantize_group(data, b0 + XS_QS_AT + ib * QK // 2, F32(d * F32(ls - 32)), out, ibl * QK_K + ib * QK)
