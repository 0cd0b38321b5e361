"""IQ2_XXS, IQ2_XS, IQ2_S: 2-bit lattice quants (ggml quantize_row_iq2_{xxs,xs,s}_impl).

Every 8 weights are a codebook point (see rioquant.kernels.iq_lattice) times a group scale, with signs.
weight = d · (0.5 + s) / 4 · grid[point][i] · ±1, s the group's 4-bit scale code.

IQ2_XXS (66 bytes):  d: fp16 | 8 × (u32 points, u32 signs+scale) per 32 weights
    points: four 8-bit codebook indices (256 points), byte k for weights 8k..8k+7
    signs+scale: four 7-bit sign codes at bits 7k (8th sign by even parity), scale code in bits 28-31
IQ2_XS (74 bytes):   d: fp16 | qs: u16[32] | scales: u8[8]
    qs[j]: 9-bit codebook index (512 points) | 7-bit sign code << 9, for weights 8j..8j+7
    scales[b]: codes of the 16-weight groups 2b (low nibble) and 2b+1 (high nibble)
IQ2_S (82 bytes):    d: fp16 | qs: u8[32] | signs: u8[32] | qh: u8[8] | scales: u8[8]
    index of point j (1024 points) = qs[j] | ((qh[j/4] >> 2·(j%4)) & 3) << 8; signs[j]: 8 sign bits
    d is stored ×0.9875 (ggml's correction of the scale codes' bias); scales as in IQ2_XS
ggml requires an importance matrix for IQ2_XXS and IQ2_XS; IQ2_S without one weighs by σ²/4 + x².

The rows' scratch arrays lie in the kernel's stack frame (common.frame_array): the searches pass them
to inlined helpers hundreds of times per block, and Numba's reference counting of heap arrays made
its atomic updates half of IQ2_S's time.
"""

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from rioquant.kernels.common import F32, GROUP_MAX_EPS, frame_array, load_fp16, store_fp16
from rioquant.kernels.iq2_search import (
    TERMS,
    block_weights,
    flip_to_even_parity,
    group_max,
    point_index,
    scale_code,
    search_16,
    search_32,
    sum_squares,
)
from rioquant.kernels.iq_lattice import lattice

T = GGMLQuantizationType
QK_K = 256
XXS_BYTES, XS_BYTES, S_BYTES = 66, 74, 82
XS_SCALES = 2 + 64  # offset of IQ2_XS's scales[8]
S_SIGNS, S_QH, S_SCALES = 2 + 32, 2 + 64, 2 + 64 + 8
GROUP_MAX_EPS_IQ2_S = F32(1e-8)
IQ2_S_D_FACTOR = F32(0.9875)

# Module-level tables become constants of the compiled kernels.
_XXS, _XS, _S = lattice(T.IQ2_XXS), lattice(T.IQ2_XS), lattice(T.IQ2_S)
XXS_KMAP, XXS_NEIGHBOURS, XXS_KEYS = _XXS.kmap, _XXS.neighbours, _XXS.neighbour_keys
XS_KMAP, XS_NEIGHBOURS, XS_KEYS = _XS.kmap, _XS.neighbours, _XS.neighbour_keys
S_KMAP, S_NEIGHBOURS, S_KEYS = _S.kmap, _S.neighbours, _S.neighbour_keys
XXS_VALUES, XS_VALUES, S_VALUES = _XXS.values, _XS.values, _S.values
KSIGNS = np.frombuffer(gguf.quants.IQ2_XXS.ksigns, dtype=np.uint8)  # 7-bit code → 8 signs of even parity


@njit(cache=True, inline="always")
def _store_u32(out: np.ndarray, at: int, v: int) -> None:
    for b in range(4):
        out[at + b] = np.uint8((v >> (8 * b)) & 0xFF)


@njit(cache=True, inline="always")
def _load_u32(data: np.ndarray, at: int) -> int:
    return np.int64(data[at]) | (np.int64(data[at + 1]) << 8) | (np.int64(data[at + 2]) << 16) | (np.int64(data[at + 3]) << 24)


@njit(cache=True, inline="always")
def _search_scratch(n: int) -> tuple[np.ndarray, ...]:
    """A search over rows of n weights: weight, waux, xval float32[n], L and Laux int64[n] (zeroed) and
    best_neighbour's terms, in the calling row kernel's frame (inlined there; n a constant)."""
    L = frame_array(n, np.int64)
    Laux = frame_array(n, np.int64)
    L[:] = 0
    Laux[:] = 0
    return frame_array(n, np.float32), frame_array(n, np.float32), frame_array(n, np.float32), L, Laux, \
        frame_array(TERMS, np.float32)


@njit(cache=True, error_model="numpy")
def quantize_row_iq2_xxs(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    if importance.size != x.size:
        raise ValueError("IQ2_XXS needs an importance matrix")
    weight, waux, xval, L, Laux, terms = _search_scratch(32)
    Lqp = frame_array(32, np.uint8)
    signs = frame_array(4, np.int64)
    scales = frame_array(8, np.float32)
    q2 = frame_array(16, np.int64)  # the block's 16 u32 words
    for ibl in range(x.size // QK_K):
        xbl = x[ibl * QK_K : (ibl + 1) * QK_K]
        qwbl = importance[ibl * QK_K : (ibl + 1) * QK_K]
        block = out[ibl * XXS_BYTES : (ibl + 1) * XXS_BYTES]
        q2[:] = 0
        max_scale = F32(0.0)
        sigma2 = F32(sum_squares(xbl) / F32(QK_K))
        for ib in range(8):
            block_weights(xbl, qwbl, sigma2, weight, waux, 32 * ib, 32)
            flip_to_even_parity(xbl[32 * ib : 32 * ib + 32], weight, xval, signs)
            if group_max(xval) < GROUP_MAX_EPS:
                scales[ib] = F32(0.0)
                continue
            scale, searched = search_32(XXS_KMAP, XXS_NEIGHBOURS, XXS_KEYS, terms, xval, weight, waux, L, Laux, Lqp)
            if not searched:
                scales[ib] = F32(0.0)
                continue
            if scale < F32(0.0):  # never expected (ggml guards it the same way): flip every sign
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(4):
                q2[2 * ib] |= point_index(XXS_KMAP, L, 8 * k) << (8 * k)
                q2[2 * ib + 1] |= signs[k] << (7 * k)
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0.0):
            block[:] = 0
            continue
        d = F32(max_scale / F32(31.0))
        store_fp16(block, 0, d)
        inv_d = F32(F32(1.0) / d)
        for ib in range(8):
            q2[2 * ib + 1] |= scale_code(inv_d, scales[ib]) << 28
        for w in range(16):
            _store_u32(block, 2 + 4 * w, q2[w])


@njit(cache=True, error_model="numpy")
def _quantize_row_16(x: np.ndarray, importance: np.ndarray, out: np.ndarray, iq2_s: bool) -> None:
    """IQ2_XS (iq2_s False) and IQ2_S: the same search over 16-weight groups, two layouts."""
    block_bytes = S_BYTES if iq2_s else XS_BYTES
    eps = GROUP_MAX_EPS_IQ2_S if iq2_s else GROUP_MAX_EPS
    weight, waux, xval, L, Laux, terms = _search_scratch(16)
    signs = frame_array(2, np.int64)
    scales = frame_array(16, np.float32)
    for ibl in range(x.size // QK_K):
        xbl = x[ibl * QK_K : (ibl + 1) * QK_K]
        block = out[ibl * block_bytes : (ibl + 1) * block_bytes]
        block[:] = 0
        max_scale = F32(0.0)
        sumx2 = sum_squares(xbl)
        sigma2 = F32(F32(F32(2.0) * sumx2) / F32(QK_K)) if iq2_s else F32(sumx2 / F32(QK_K))
        for ib in range(16):
            xb = xbl[16 * ib : 16 * ib + 16]
            if importance.size:
                block_weights(xbl, importance[ibl * QK_K : (ibl + 1) * QK_K], sigma2, weight, waux, 16 * ib, 16)
            else:
                for i in range(16):
                    weight[i] = F32(F32(F32(0.25) * sigma2) + F32(xb[i] * xb[i]))
                    waux[i] = np.sqrt(weight[i])
            if iq2_s:
                for k in range(2):
                    s = 0
                    for i in range(8):
                        v = xb[8 * k + i]
                        xval[8 * k + i] = v if v >= F32(0.0) else -v
                        if v < F32(0.0):
                            s |= 1 << i
                    signs[k] = s
            else:
                flip_to_even_parity(xb, weight, xval, signs)
            xmax = group_max(xval)
            if xmax < eps:
                scales[ib] = F32(0.0)
                continue
            if iq2_s:
                scale = search_16(S_KMAP, S_NEIGHBOURS, S_KEYS, terms, xval, weight, waux, L, Laux, xmax)
            else:
                scale = search_16(XS_KMAP, XS_NEIGHBOURS, XS_KEYS, terms, xval, weight, waux, L, Laux, xmax)
            if scale < F32(0.0):  # never expected (ggml guards it the same way): flip every sign
                scale = -scale
                for k in range(2):
                    signs[k] = ~signs[k] & (255 if iq2_s else 127)
            for k in range(2):
                j = 2 * ib + k
                if iq2_s:
                    index = point_index(S_KMAP, L, 8 * k)
                    block[2 + j] = index & 255
                    block[S_QH + j // 4] |= (index >> 8) << (2 * (j % 4))
                    block[S_SIGNS + j] = signs[k]
                else:
                    packed = point_index(XS_KMAP, L, 8 * k) | (signs[k] << 9)
                    block[2 + 2 * j] = packed & 0xFF
                    block[3 + 2 * j] = packed >> 8
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0.0):
            if not iq2_s:
                block[:] = 0
            continue
        d = F32(max_scale / F32(31.0))
        store_fp16(block, 0, F32(d * IQ2_S_D_FACTOR) if iq2_s else d)
        inv_d = F32(F32(1.0) / d)
        at = S_SCALES if iq2_s else XS_SCALES
        for ib in range(16):
            block[at + ib // 2] |= scale_code(inv_d, scales[ib]) << (4 * (ib % 2))


@njit(cache=True, error_model="numpy")
def quantize_row_iq2_xs(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    if importance.size != x.size:
        raise ValueError("IQ2_XS needs an importance matrix")
    _quantize_row_16(x, importance, out, False)


@njit(cache=True, error_model="numpy")
def quantize_row_iq2_s(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    _quantize_row_16(x, importance, out, True)


@njit(cache=True, inline="always")
def _group_step(d: np.float32, code: int) -> np.float32:
    """d·(0.5 + code)·0.25, in gguf-py's order."""
    return F32(F32(d * F32(F32(0.5) + F32(code))) * F32(0.25))


@njit(cache=True, inline="always")
def _put_point(y: np.ndarray, at: int, db: np.float32, values: np.ndarray, index: int, sign_bits: int) -> None:
    for i in range(8):
        v = F32(db * values[index, i])
        y[at + i] = -v if (sign_bits >> i) & 1 else v


@njit(cache=True)
def dequantize_row_iq2_xxs(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        block = data[ibl * XXS_BYTES : (ibl + 1) * XXS_BYTES]
        d = load_fp16(block, 0)
        for ib in range(8):
            points = _load_u32(block, 2 + 8 * ib)
            aux = _load_u32(block, 6 + 8 * ib)
            db = _group_step(d, aux >> 28)
            for k in range(4):
                signs = np.int64(KSIGNS[(aux >> (7 * k)) & 127])
                _put_point(out, ibl * QK_K + 32 * ib + 8 * k, db, XXS_VALUES, (points >> (8 * k)) & 0xFF, signs)


@njit(cache=True)
def dequantize_row_iq2_xs(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        block = data[ibl * XS_BYTES : (ibl + 1) * XS_BYTES]
        d = load_fp16(block, 0)
        for j in range(32):
            db = _group_step(d, (np.int64(block[XS_SCALES + j // 4]) >> (4 * ((j // 2) % 2))) & 0xF)
            packed = np.int64(block[2 + 2 * j]) | (np.int64(block[3 + 2 * j]) << 8)
            _put_point(out, ibl * QK_K + 8 * j, db, XS_VALUES, packed & 511, np.int64(KSIGNS[packed >> 9]))


@njit(cache=True)
def dequantize_row_iq2_s(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        block = data[ibl * S_BYTES : (ibl + 1) * S_BYTES]
        d = load_fp16(block, 0)
        for j in range(32):
            db = _group_step(d, (np.int64(block[S_SCALES + j // 4]) >> (4 * ((j // 2) % 2))) & 0xF)
            index = np.int64(block[2 + j]) | (((np.int64(block[S_QH + j // 4]) >> (2 * (j % 4))) & 3) << 8)
            _put_point(out, ibl * QK_K + 8 * j, db, S_VALUES, index, np.int64(block[S_SIGNS + j]))
