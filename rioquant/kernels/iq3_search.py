"""The sub-block search IQ3_XXS and IQ3_S share (ggml's quantize_row_iq3_{xxs,s}_impl inner loop).

A sub-block of 32 |x| is fitted as scale·(2l + 1), l ∈ 0..7, trying 2·steps + 1 scales; each group of 4
levels must be a codebook point, and a group that rounds off the codebook takes the neighbour of least
weighted error from ggml's `iq3xs_init_impl` lists (rioquant.kernels.iq_lattice), laid out here so that
LANES candidates are evaluated side by side. Every float operation keeps ggml's order.
"""

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from rioquant.kernels.common import F32, nearest_int
from rioquant.kernels.iq_lattice import lattice

QK_K = 256  # weights per super-block (one fp16 scale)
SUB = 32  # weights per sub-block (one scale)
GROUPS = SUB // 4  # codebook points per sub-block
K_MAX_Q = 8  # levels per coordinate
FLT_MAX = F32(3.4028234663852886e38)
LANES = 8  # neighbour candidates whose errors are computed side by side
MAX_LIST = 64  # room for the longest padded neighbour list (ggml's longest: 38)


def candidate_lists(qtype: GGMLQuantizationType) -> tuple[np.ndarray, ...]:
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

