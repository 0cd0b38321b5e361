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

from rioquant.kernels.common import F32, load_fp16, nearest_int, store_fp16
from rioquant.kernels.iq_lattice import lattice

QK_K = 256
SUB = 32  # weights per sub-block (one scale)
NSUB = QK_K // SUB
GROUPS = SUB // 4  # codebook points per sub-block
K_MAX_Q = 8  # levels per coordinate
FLT_MAX = F32(3.4028234663852886e38)
LANES = 8  # neighbour candidates whose errors are computed side by side
MAX_LIST = 64  # room for the longest padded neighbour list (ggml's longest: 38)
XXS_BLOCK_BYTES = 2 + 3 * QK_K // 8
XXS_SIGNS_AT = 2 + QK_K // 4  # scales_and_signs inside an IQ3_XXS block
XXS_GROUP_MAX_EPS = F32(1e-8)  # ggml's GROUP_MAX_EPS_IQ3_XXS: smaller sub-blocks are stored as zero
S_BLOCK_BYTES = 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64
S_QH_AT = 2 + QK_K // 4
S_SIGNS_AT = S_QH_AT + QK_K // 32
S_SCALES_AT = S_SIGNS_AT + QK_K // 8


def _tables(qtype: GGMLQuantizationType) -> tuple[np.ndarray, ...]:
    """ggml's iq3xs_init_impl tables for `qtype` (rioquant.kernels.iq_lattice), in the layout the
    kernels read: (levels int64 (G, 4), dequantization values float32 (G, 4), kmap int32[4096],
    list_at int32[4096], list_len int32[4096], cand_index int32[M], cand_pos float32[4·M]).

    The neighbour list of an off-codebook key u is cand_index[list_at[u] : list_at[u] + list_len[u]]
    in ggml's order, with each candidate's positions 2l+1 at cand_pos[i·M + j] (coordinate i), so that
    the search computes LANES candidates' errors side by side. Lists are padded to whole LANES with
    NaN positions, whose error is NaN and never wins.
    """
    tables = lattice(qtype)
    kmap, neighbours, values = tables.kmap, tables.neighbours, tables.values
    levels = (tables.grid.astype(np.int64) - 1) // 2
    list_at = np.zeros(kmap.size, dtype=np.int32)
    list_len = np.zeros(kmap.size, dtype=np.int32)
    chunks = []
    used = 0
    for u in np.flatnonzero(kmap < 0):
        count = int(neighbours[-kmap[u] - 1])
        members = neighbours[-kmap[u] : -kmap[u] + count].astype(np.int32)
        padded = np.full(-(-count // LANES) * LANES, members[0], dtype=np.int32)
        padded[:count] = members
        list_at[u], list_len[u] = used, count
        chunks.append(padded)
        used += padded.size
    cand_index = np.concatenate(chunks)
    assert max(c.size for c in chunks) <= MAX_LIST, f"{qtype.name}: a neighbour list outgrew MAX_LIST"
    cand_pos = (2 * levels[cand_index].T + 1).astype(np.float32)  # (4, M)
    for at, count, padded in zip(list_at[kmap < 0], list_len[kmap < 0], chunks, strict=True):
        cand_pos[:, at + count : at + padded.size] = np.nan
    derived = (levels, list_at, list_len, cand_index, np.ascontiguousarray(cand_pos).reshape(-1))
    for table in derived:
        table.setflags(write=False)
    return levels, values, kmap, *derived[1:]


# Numba freezes these module-level arrays into the compiled kernels as constants.
XXS_LEVELS, XXS_VALUES, XXS_KMAP, XXS_AT, XXS_LEN, XXS_CAND, XXS_POS = _tables(GGMLQuantizationType.IQ3_XXS)
S_LEVELS, S_VALUES, S_KMAP, S_AT, S_LEN, S_CAND, S_POS = _tables(GGMLQuantizationType.IQ3_S)


@njit(cache=True, error_model="numpy", inline="always")
def _best_neighbour(
    u: int, list_at: np.ndarray, list_len: np.ndarray, cand_index: np.ndarray, cand_pos: np.ndarray,
    levels: np.ndarray, xval: np.ndarray, waux: np.ndarray, k4: int, scale: np.float32, L: np.ndarray,
    d2: np.ndarray,
) -> None:
    """iq3_find_best_neighbour: the neighbour of off-codebook key u with the least weighted error
    Σ w·(scale·q − x)² at `scale` (the first one wins ties); writes its levels to L[k4:k4+4].

    The errors of LANES candidates are computed side by side (each in ggml's order of operations),
    then scanned in list order. When no error is below FLT_MAX (they overflowed) ggml aborts the
    process; rioquant.quant.api refuses rows that large, and the first neighbour stands in here only
    to keep the kernel safe (it cannot raise through the parallel driver).
    """
    at = list_at[u]
    count = list_len[u]
    x0, x1, x2, x3 = xval[k4], xval[k4 + 1], xval[k4 + 2], xval[k4 + 3]
    w0, w1, w2, w3 = waux[k4], waux[k4 + 1], waux[k4 + 2], waux[k4 + 3]
    n = (count + LANES - 1) // LANES * LANES  # a run-time trip count: vectorized, not unrolled
    m = cand_pos.size // 4
    p0 = cand_pos[at : at + n]
    p1 = cand_pos[m + at : m + at + n]
    p2 = cand_pos[2 * m + at : 2 * m + at + n]
    p3 = cand_pos[3 * m + at : 3 * m + at + n]
    for j in range(n):
        diff = F32(F32(scale * p0[j]) - x0)
        e = F32(F32(0.0) + F32(F32(w0 * diff) * diff))
        diff = F32(F32(scale * p1[j]) - x1)
        e = F32(e + F32(F32(w1 * diff) * diff))
        diff = F32(F32(scale * p2[j]) - x2)
        e = F32(e + F32(F32(w2 * diff) * diff))
        diff = F32(F32(scale * p3[j]) - x3)
        d2[j] = F32(e + F32(F32(w3 * diff) * diff))
    best_d2 = FLT_MAX
    best = 0
    for j in range(count):  # selects, not branches: which candidate wins is unpredictable
        better = d2[j] < best_d2
        best_d2 = d2[j] if better else best_d2
        best = j if better else best
    g = cand_index[at + best]
    for i in range(4):
        L[k4 + i] = levels[g, i]


@njit(cache=True, error_model="numpy", inline="always")
def _sums(L: np.ndarray, wx: np.ndarray, weight: np.ndarray) -> tuple[np.float32, np.float32]:
    """(Σ w·x·q, Σ w·q²) over the sub-block for q = 2l + 1, summed in ggml's order."""
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(SUB):
        q = F32(2 * L[i] + 1)
        sumqx = F32(sumqx + F32(wx[i] * q))
        sumq2 = F32(sumq2 + F32(F32(weight[i] * q) * q))
    return sumqx, sumq2


@njit(cache=True, error_model="numpy", inline="always")
def _round_group(xval: np.ndarray, k4: int, inv_scale: np.float32, L: np.ndarray) -> int:
    """Levels nearest_int((x/scale − 1)/2) clamped to 0..7 of the group at k4; returns its key."""
    u = 0
    for i in range(4):
        lvl = nearest_int(F32(F32(0.5) * F32(F32(inv_scale * xval[k4 + i]) - F32(1.0))))
        lvl = max(0, min(K_MAX_Q - 1, lvl))
        L[k4 + i] = lvl
        u |= lvl << (3 * i)
    return u


@njit(cache=True, error_model="numpy", inline="always")
def _round_levels(xval: np.ndarray, inv_scale: np.float32, L: np.ndarray) -> None:
    """_round_group's levels for the whole sub-block, in one loop that the compiler vectorizes."""
    for i in range(xval.size):  # a run-time trip count, so it is vectorized rather than unrolled
        lvl = nearest_int(F32(F32(0.5) * F32(F32(inv_scale * xval[i]) - F32(1.0))))
        L[i] = max(0, min(K_MAX_Q - 1, lvl))


@njit(cache=True, error_model="numpy", inline="always")
def search_subblock(
    xval: np.ndarray, weight: np.ndarray, waux: np.ndarray, vmax: np.float32, steps: int, is_xxs: bool,
    kmap: np.ndarray, list_at: np.ndarray, list_len: np.ndarray, cand_index: np.ndarray, cand_pos: np.ndarray,
    levels: np.ndarray, L: np.ndarray, work: np.ndarray, fwork: np.ndarray,
) -> np.float32:
    """The sub-block search shared by both types: returns the scale and leaves the levels in L.

    Tries the scales max/(15 + 0.2·is), is = −steps..steps, keeping the one of best Σwxq²/Σwq² (its
    groups snapped to the codebook), then re-rounds the off-codebook groups against the kept scale
    and refits it. IQ3_XXS (`is_xxs`) starts with every group marked on the codebook and revisits only
    the groups that were not; IQ3_S starts with none marked and revisits them all.
    """
    Laux = work[:SUB]
    on_grid = work[SUB : SUB + GROUPS]
    on_grid_aux = work[SUB + GROUPS : SUB + 2 * GROUPS]
    wx = fwork[:SUB]
    d2 = fwork[SUB:]
    for i in range(SUB):
        wx[i] = F32(weight[i] * xval[i])
    L[:] = 0
    best = F32(0.0)
    scale = F32(vmax / F32(2 * K_MAX_Q - 1))
    on_grid[:] = 1 if is_xxs else 0
    for step in range(-steps, steps + 1):
        inv = F32(F32(F32(2 * K_MAX_Q - 1) + F32(F32(step) * F32(0.2))) / vmax)
        this_scale = F32(F32(1.0) / inv)
        _round_levels(xval, inv, Laux)
        for k in range(GROUPS):
            u = Laux[4 * k] | Laux[4 * k + 1] << 3 | Laux[4 * k + 2] << 6 | Laux[4 * k + 3] << 9
            on_grid_aux[k] = 1
            if kmap[u] < 0:
                on_grid_aux[k] = 0
                _best_neighbour(u, list_at, list_len, cand_index, cand_pos, levels, xval, waux, 4 * k, this_scale, Laux, d2)
        sumqx, sumq2 = _sums(Laux, wx, weight)
        if sumq2 > F32(0.0) and F32(sumqx * sumqx) > F32(best * sumq2):
            scale = F32(sumqx / sumq2)
            best = F32(scale * sumqx)
            L[:] = Laux
            on_grid[:] = on_grid_aux
    n_off = 0
    for k in range(GROUPS):
        n_off += 1 - on_grid[k]
    if n_off > 0 and scale > F32(0.0):
        inv = F32(F32(1.0) / scale)
        for k in range(GROUPS):
            if is_xxs and on_grid[k]:
                continue
            u = _round_group(xval, 4 * k, inv, L)
            if kmap[u] < 0:
                _best_neighbour(u, list_at, list_len, cand_index, cand_pos, levels, xval, waux, 4 * k, scale, L, d2)
        sumqx, sumq2 = _sums(L, wx, weight)
        if sumq2 > F32(0.0):
            scale = F32(sumqx / sumq2)
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def prepare_subblock(
    xb: np.ndarray, qw: np.ndarray, sigma2: np.float32, weight: np.ndarray, waux: np.ndarray, xval: np.ndarray,
) -> np.float32:
    """Weights (qw·√(σ² + x²), or x² without importance), their square roots and |x|; returns max |x|."""
    for i in range(SUB):
        if qw.size:
            weight[i] = F32(qw[i] * np.sqrt(F32(sigma2 + F32(xb[i] * xb[i]))))
        else:
            weight[i] = F32(xb[i] * xb[i])
        waux[i] = np.sqrt(weight[i])
        xval[i] = xb[i] if xb[i] >= F32(0.0) else -xb[i]
    vmax = xval[0]
    for i in range(1, SUB):
        vmax = vmax if vmax > xval[i] else xval[i]
    return vmax


@njit(cache=True, error_model="numpy", inline="always")
def block_sigma2(xbl: np.ndarray) -> np.float32:
    """2·Σx²/256 over the super-block: the floor ggml adds to x² in the importance weights."""
    sumx2 = F32(0.0)
    for i in range(QK_K):
        sumx2 = F32(sumx2 + F32(xbl[i] * xbl[i]))
    return F32(F32(F32(2.0) * sumx2) / F32(QK_K))


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


@njit(cache=True)
def _new_scratch() -> tuple[np.ndarray, ...]:
    """weight, waux, xval float32[32]; L int64[32]; search work int64[48] and float32[32 + 64] (w·x and
    the candidates' errors); sub-block scales float32[8]."""
    return (np.empty(SUB, dtype=np.float32), np.empty(SUB, dtype=np.float32), np.empty(SUB, dtype=np.float32),
            np.empty(SUB, dtype=np.int64), np.empty(SUB + 2 * GROUPS, dtype=np.int64),
            np.empty(SUB + MAX_LIST, dtype=np.float32), np.empty(NSUB, dtype=np.float32))


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


@njit(cache=True, inline="always")
def _parity(v: int) -> int:
    p = 0
    while v:
        p ^= v & 1
        v >>= 1
    return p


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
