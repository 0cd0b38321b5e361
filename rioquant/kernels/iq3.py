"""IQ3_XXS and IQ3_S: super-blocks of 256 weights whose 4-weight groups are points of a 3-bit codebook.

Each sub-block of 32 weights is quantized as |x| ≈ scale·(2l + 1) per weight, l ∈ 0..7, with the sign
kept apart, and every group of 4 levels must be a point of ggml's codebook (256 points for IQ3_XXS,
512 for IQ3_S); a group that rounds off the codebook takes the best of its precomputed neighbours
(ggml's `iq3xs_init_impl` tables, built by rioquant.kernels.iq_lattice from gguf-py's grids).

Block layouts
  IQ3_XXS (98 bytes):  d: fp16 | qs: u8[64] | scales_and_signs: u32[8]
    qs[8·ib + k]: codebook index of group k of sub-block ib;
    scales_and_signs[ib] = signs(group pair 0) | signs(1) << 7 | signs(2) << 14 | signs(3) << 21 | s << 28
    with 7 sign bits per 8 weights: the 8th is implied by even parity (ggml flips the least important
    weight of an odd group), and weight = d·(0.5 + s)·0.5 · grid value · sign.
  IQ3_S (110 bytes):  d: fp16 | qs: u8[64] | qh: u8[8] | signs: u8[32] | scales: u8[4]
    codebook index of group k of sub-block ib = qs[8·ib + k] | bit k of qh[ib] << 8; one sign bit per
    weight; scales[j] = s(2j) | s(2j + 1) << 4, weight = d·(1 + 2s) · grid value · sign.

Both quantizers are ggml's quantize_row_iq3_{xxs,s}_impl, with and without importance (without it the
weights are x²). They differ in a few constants and in two quirks mirrored here on purpose:
  - IQ3_S skips an all-zero sub-block without advancing its qs and signs pointers, so the sub-blocks
    after it are written one slot early (the decoder then reads them under the wrong scale);
  - IQ3_XXS's second pass revisits only the groups that were off the codebook, IQ3_S's all of them.
"""

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from rioquant.kernels.common import F32, frame_array, load_fp16, nearest_int, store_fp16
from rioquant.kernels.iq3_search import (
    GROUPS,
    MAX_LIST,
    QK_K,
    SUB,
    block_sigma2,
    candidate_lists,
    prepare_subblock,
    search_subblock,
)

NSUB = QK_K // SUB
WORK, FWORK = SUB + 2 * GROUPS, SUB + MAX_LIST  # the searches' int64 and float32 work (_new_scratch)
XXS_BLOCK_BYTES = 2 + 3 * QK_K // 8
XXS_SIGNS_AT = 2 + QK_K // 4  # scales_and_signs inside an IQ3_XXS block
XXS_GROUP_MAX_EPS = F32(1e-8)  # ggml's GROUP_MAX_EPS_IQ3_XXS: smaller sub-blocks are stored as zero
S_BLOCK_BYTES = 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64
S_QH_AT = 2 + QK_K // 4
S_SIGNS_AT = S_QH_AT + QK_K // 32
S_SCALES_AT = S_SIGNS_AT + QK_K // 8

# Numba freezes these module-level arrays into the compiled kernels as constants.
XXS_LEVELS, XXS_VALUES, XXS_KMAP, XXS_AT, XXS_LEN, XXS_CAND, XXS_POS = candidate_lists(GGMLQuantizationType.IQ3_XXS)
S_LEVELS, S_VALUES, S_KMAP, S_AT, S_LEN, S_CAND, S_POS = candidate_lists(GGMLQuantizationType.IQ3_S)


@njit(cache=True, error_model="numpy", inline="always")
def _xxs_signs(xb: np.ndarray, weight: np.ndarray, xval: np.ndarray, k: int) -> int:
    """7 sign bits of weights 8k..8k+7; an odd count of negatives flips the least important weight
    (least w·x², first wins) so that the 8th sign is implied by parity."""
    s = 0
    nflip = 0
    for i in range(8):
        if xb[8 * k + i] < F32(0.0):
            nflip += 1
            s |= 1 << i
    if nflip % 2:
        imin = 0
        vmin = F32(F32(weight[8 * k] * xb[8 * k]) * xb[8 * k])
        for i in range(1, 8):
            ax = F32(F32(weight[8 * k + i] * xb[8 * k + i]) * xb[8 * k + i])
            if ax < vmin:
                vmin = ax
                imin = i
        xval[8 * k + imin] = -xval[8 * k + imin]
        s ^= 1 << imin
    return s & 127


@njit(cache=True, inline="always")
def _new_scratch() -> tuple[np.ndarray, ...]:
    """weight, waux, xval float32[32]; L int64[32]; search work int64[48] and float32[32 + 64] (w·x and
    the candidates' errors); sub-block scales float32[8]. In the row kernel's frame (inlined there):
    no reference counts in the searches (common.frame_array)."""
    return (frame_array(SUB, np.float32), frame_array(SUB, np.float32), frame_array(SUB, np.float32),
            frame_array(SUB, np.int64), frame_array(WORK, np.int64),
            frame_array(FWORK, np.float32), frame_array(NSUB, np.float32))


@njit(cache=True, error_model="numpy")
def quantize_row_iq3_xxs(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    weight, waux, xval, L, work, fwork, scales = _new_scratch()
    for ibl in range(x.size // QK_K):
        xbl = x[ibl * QK_K : (ibl + 1) * QK_K]
        block = out[ibl * XXS_BLOCK_BYTES : (ibl + 1) * XXS_BLOCK_BYTES]
        block[:] = 0
        sigma2 = block_sigma2(xbl)
        max_scale = F32(0.0)
        for ib in range(NSUB):
            xb = xbl[ib * SUB : (ib + 1) * SUB]
            qw = importance[ibl * QK_K + ib * SUB : ibl * QK_K + (ib + 1) * SUB] if importance.size else importance
            prepare_subblock(xb, qw, sigma2, weight, waux, xval)
            signs = 0
            for k in range(4):
                signs |= _xxs_signs(xb, weight, xval, k) << (7 * k)
            vmax = xval[0]  # after the parity flips, as ggml takes it
            for i in range(1, SUB):
                vmax = vmax if vmax > xval[i] else xval[i]
            if vmax < XXS_GROUP_MAX_EPS:
                scales[ib] = F32(0.0)
                continue
            scale = search_subblock(xval, weight, waux, vmax, 15, True, XXS_KMAP, XXS_AT, XXS_LEN, XXS_CAND,
                                    XXS_POS, XXS_LEVELS, L, work, fwork)
            if scale < F32(0.0):  # only with negative importance: store |scale| and flip every sign
                scale = -scale
                signs ^= (1 << 28) - 1
            for k in range(GROUPS):
                u = 0
                for i in range(4):
                    u |= L[4 * k + i] << (3 * i)
                block[2 + 8 * ib + k] = XXS_KMAP[u]
            for b in range(4):
                block[XXS_SIGNS_AT + 4 * ib + b] = (signs >> (8 * b)) & 0xFF
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0.0):
            block[:] = 0
            continue
        d = F32(max_scale / F32(31.0))
        store_fp16(block, 0, F32(d * F32(1.0125)))
        inv_d = F32(F32(1.0) / d)
        for ib in range(NSUB):
            lvl = max(0, min(15, nearest_int(F32(F32(0.5) * F32(F32(inv_d * scales[ib]) - F32(1.0))))))
            block[XXS_SIGNS_AT + 4 * ib + 3] |= lvl << 4


@njit(cache=True, error_model="numpy")
def quantize_row_iq3_s(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    weight, waux, xval, L, work, fwork, scales = _new_scratch()
    for ibl in range(x.size // QK_K):
        xbl = x[ibl * QK_K : (ibl + 1) * QK_K]
        block = out[ibl * S_BLOCK_BYTES : (ibl + 1) * S_BLOCK_BYTES]
        block[:] = 0
        sigma2 = block_sigma2(xbl)
        max_scale = F32(0.0)
        slot = 0  # where the next sub-block's qs and signs go: ggml does not advance past zero sub-blocks
        for ib in range(NSUB):
            xb = xbl[ib * SUB : (ib + 1) * SUB]
            qw = importance[ibl * QK_K + ib * SUB : ibl * QK_K + (ib + 1) * SUB] if importance.size else importance
            vmax = prepare_subblock(xb, qw, sigma2, weight, waux, xval)
            if vmax == F32(0.0):
                scales[ib] = F32(0.0)
                continue
            scale = search_subblock(xval, weight, waux, vmax, 9, False, S_KMAP, S_AT, S_LEN, S_CAND,
                                    S_POS, S_LEVELS, L, work, fwork)
            flip = 0
            if scale < F32(0.0):  # only with negative importance: store |scale| and flip every sign
                scale = -scale
                flip = 0xFF
            for k in range(GROUPS):
                u = 0
                for i in range(4):
                    u |= L[4 * k + i] << (3 * i)
                index = np.int64(S_KMAP[u])
                block[2 + 8 * slot + k] = index & 0xFF
                block[S_QH_AT + ib] |= (index >> 8) << k
            for k in range(4):
                s = 0
                for i in range(8):
                    if not xb[8 * k + i] >= F32(0.0):
                        s |= 1 << i
                block[S_SIGNS_AT + 4 * slot + k] = s ^ flip
            slot += 1
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F32(0.0):
            continue
        d = F32(max_scale / F32(31.0))
        store_fp16(block, 0, F32(d * F32(1.033)))
        inv_d = F32(F32(1.0) / d)
        for ib in range(NSUB):
            lvl = max(0, min(15, nearest_int(F32(F32(0.5) * F32(F32(inv_d * scales[ib]) - F32(1.0))))))
            block[S_SCALES_AT + ib // 2] |= lvl << (4 * (ib % 2))


@njit(cache=True, inline="always")
def _parity(v: int) -> int:
    """The implied 8th sign bit of 7 stored ones (ggml's ksigns_iq2xs table): their parity."""
    p = 0
    while v:
        p ^= v & 1
        v >>= 1
    return p


@njit(cache=True)
def dequantize_row_iq3_xxs(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        block = data[ibl * XXS_BLOCK_BYTES : (ibl + 1) * XXS_BLOCK_BYTES]
        d = load_fp16(block, 0)
        for ib in range(NSUB):
            at = XXS_SIGNS_AT + 4 * ib
            aux = (np.int64(block[at]) | np.int64(block[at + 1]) << 8 | np.int64(block[at + 2]) << 16
                   | np.int64(block[at + 3]) << 24)
            db = F32(F32(d * F32(F32(0.5) + F32(aux >> 28))) * F32(0.5))
            for k in range(4):
                s7 = (aux >> (7 * k)) & 127
                signs = s7 | ((_parity(s7)) << 7)
                for i in range(8):
                    g = np.int64(block[2 + 8 * ib + 2 * k + i // 4])
                    v = F32(db * XXS_VALUES[g, i % 4])
                    out[ibl * QK_K + SUB * ib + 8 * k + i] = -v if (signs >> i) & 1 else v


@njit(cache=True)
def dequantize_row_iq3_s(data: np.ndarray, out: np.ndarray) -> None:
    for ibl in range(out.size // QK_K):
        block = data[ibl * S_BLOCK_BYTES : (ibl + 1) * S_BLOCK_BYTES]
        d = load_fp16(block, 0)
        for ib in range(NSUB):
            s = (np.int64(block[S_SCALES_AT + ib // 2]) >> (4 * (ib % 2))) & 0xF
            db = F32(d * F32(1 + 2 * s))
            for i in range(SUB):
                g = np.int64(block[2 + 8 * ib + i // 4]) | ((np.int64(block[S_QH_AT + ib]) >> (i // 4)) & 1) << 8
                v = F32(db * S_VALUES[g, i % 4])
                out[ibl * QK_K + SUB * ib + i] = -v if (np.int64(block[S_SIGNS_AT + 4 * ib + i // 8]) >> (i % 8)) & 1 else v
