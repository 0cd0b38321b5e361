"""ggml's lattice tables for IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M (`iq2xs_init_impl`) and IQ3 (`iq3xs_init_impl`).

These types store each group of 8 weights as the index of one point of a codebook ("grid") whose
coordinates take 3 levels l ∈ {0, 1, 2}. The quantizers round a group to levels, look the levels up
and, when that point is not in the codebook, pick the best of its precomputed nearest codebook points.
This module rebuilds ggml's three tables for each codebook, with the same layout and order:

  grid[G, 8]      int8   2·l + 1 per coordinate (ggml's `kgrid_q2xs` bytes: odd positions 1, 3, 5)
  kmap[43692]     int32  for the key u = Σ_k l_k·4^k of any 8 levels in 0..3: the codebook index
                         of u when u is a codebook point, else -(offset + 1) into `neighbours`
  neighbours[...] uint16 at each offset, a count n and then n codebook indices: every codebook point
                         whose squared distance to u (in positions 2l+1) is among the `nwant`
                         smallest distinct distances, sorted by (distance, index), as ggml's qsort
                         over (d2, j) pairs leaves them. Off-grid keys own their slices in key order.

The order matters: the quantizers take the first of equally good neighbours. `nwant` is 2 for IQ2_XXS
and IQ2_XS, 1 for IQ2_S and 3 for IQ1_S/IQ1_M, as in ggml. The key space is 43692 = 2·(4^8 − 1)/3 + 2
entries (the largest key with levels ≤ 2 is 43690); ggml builds lists for the keys holding a level 3
as well, which no quantizer forms: `ggml_tables` reproduces that exact layout, `lattice` (what the
kernels read) leaves those keys out, which keeps its tables small enough for Numba's cache.

`neighbour_maps` is the construction itself, for any codebook: IQ3's `iq3xs_init_impl` is the same
algorithm over 4-wide points of 8 levels (3 bits each, 4096 keys); SPECS holds each type's sizes.

The codebooks themselves come from gguf-py at run time (its dequantizers carry them), never retyped:
gguf-py holds each point as 8 values of its `grid_map`, whose position in that map is the level l.
"""

from dataclasses import dataclass
from functools import cache

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

T = GGMLQuantizationType
KMAP_SIZE = 43692  # iq2xs_init_impl's key space
NOT_BUILT = np.int32(-(2**31))  # kmap entry of a key whose neighbour list was not built


@dataclass(frozen=True)
class LatticeSpec:
    """How ggml builds a type's tables, and which keys its quantizer can form."""

    nwant: int  # distinct neighbour distances kept per off-codebook key
    bits: int  # bits per level in a key
    kmap_size: int
    max_level: int  # the quantizer clamps levels to 0..max_level


# iq2xs_init_impl serves the 8-wide codebooks, iq3xs_init_impl the 4-wide IQ3 ones.
SPECS: dict[GGMLQuantizationType, LatticeSpec] = {
    T.IQ2_XXS: LatticeSpec(nwant=2, bits=2, kmap_size=KMAP_SIZE, max_level=2),
    T.IQ2_XS: LatticeSpec(nwant=2, bits=2, kmap_size=KMAP_SIZE, max_level=2),
    T.IQ2_S: LatticeSpec(nwant=1, bits=2, kmap_size=KMAP_SIZE, max_level=2),
    T.IQ1_S: LatticeSpec(nwant=3, bits=2, kmap_size=KMAP_SIZE, max_level=2),
    T.IQ1_M: LatticeSpec(nwant=3, bits=2, kmap_size=KMAP_SIZE, max_level=2),
    T.IQ3_XXS: LatticeSpec(nwant=2, bits=3, kmap_size=4096, max_level=7),
    T.IQ3_S: LatticeSpec(nwant=3, bits=3, kmap_size=4096, max_level=7),
}


@dataclass(frozen=True)
class Lattice:
    """One codebook and ggml's lookup tables over it (see the module docstring for the layout)."""

    grid: np.ndarray  # int8 (G, dim): 2l+1 per coordinate
    values: np.ndarray  # float32 (G, dim): gguf-py's dequantization values of each point
    kmap: np.ndarray  # int32 (kmap_size,): index, -(offset+1), or NOT_BUILT for a key no quantizer forms
    neighbours: np.ndarray  # uint16 (total,): the lists of the keys the quantizer can form
    neighbour_keys: np.ndarray  # uint16 (total,): the key (packed levels) of each listed point; 0 at counts


def grid_levels(qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """(levels int8 (G, dim), values float32 (G, dim)) of the codebook gguf-py decodes `qtype` with."""
    quant_class = getattr(gguf.quants, qtype.name)
    quant_class.init_grid()
    values = np.asarray(quant_class.grid, dtype=np.float32).reshape(quant_class.grid_shape)
    grid_map = np.asarray(quant_class.grid_map, dtype=np.float32)
    levels = np.argmax(values[..., None] == grid_map, axis=-1).astype(np.int8)  # (G, dim)
    assert np.array_equal(grid_map[levels], values), f"{qtype.name}: grid value outside its grid_map"
    return levels, values


@njit(cache=True, inline="always")
def _levels_at_most(key: int, dim: int, bits: int, max_level: int) -> bool:
    mask = (1 << bits) - 1
    for k in range(dim):
        if (key >> (bits * k)) & mask > max_level:
            return False
    return True


@njit(cache=True)
def neighbour_maps(
    levels: np.ndarray, bits: int, kmap_size: int, nwant: int, max_level: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """(kmap, neighbours) over the codebook `levels` (G, dim) of small ints, laid out as ggml lays them.

    With max_level ≥ 0 only the keys whose levels are all ≤ max_level get a list (the others map to
    NOT_BUILT): the quantizers clamp levels, so these are all they can look up, and the tables shrink
    below the size Numba can cache as constants of a compiled kernel.

    The algorithm of both `iq2xs_init_impl` (dim 8, 2 bits per level, 43692 keys) and
    `iq3xs_init_impl` (dim 4, 3 bits, 4096 keys): a key packs dim levels, `bits` each, lowest first;
    distances are measured between positions 2l+1. ggml sorts (d2, j) pairs; the j are distinct, so
    that order is "ascending d2, then ascending j": a counting sort over the few possible distances
    gives it in two passes over the codebook per key.
    """
    size, dim = levels.shape
    mask = (1 << bits) - 1
    grid_t = np.empty((dim, size), dtype=np.int32)  # positions 2l+1, coordinate-major
    kmap = np.full(kmap_size, -1, dtype=np.int32)
    for j in range(size):
        key = 0
        for k in range(dim):
            grid_t[k, j] = 2 * np.int32(levels[j, k]) + 1
            key |= np.int64(levels[j, k]) << (bits * k)
        kmap[key] = j
    neighbours = np.empty(1 << 16, dtype=np.uint16)
    used = 0
    d2 = np.empty(size, dtype=np.int32)
    max_d2 = dim * (2 * mask) ** 2
    count_at = np.empty(max_d2 + 1, dtype=np.int64)  # codebook points at each distance, then slots
    for i in range(kmap_size):
        if kmap[i] >= 0:
            continue
        if max_level >= 0 and not _levels_at_most(i, dim, bits, max_level):
            kmap[i] = NOT_BUILT
            continue
        d2[:] = 0
        for k in range(dim):
            p = np.int32(2 * ((i >> (bits * k)) & mask) + 1)
            coordinate = grid_t[k]
            for j in range(size):
                diff = coordinate[j] - p
                d2[j] += diff * diff
        count_at[:] = 0
        for j in range(size):
            count_at[d2[j]] += 1
        count = 0  # points at the nwant smallest distances; count_at becomes each distance's first slot
        limit = -1
        kept = 0
        for dist in range(max_d2 + 1):
            here = count_at[dist]
            count_at[dist] = count
            if here and kept < nwant:
                kept += 1
                count += here
                limit = dist
        if used + 1 + count > neighbours.size:
            grown = np.empty(2 * (used + 1 + count), dtype=np.uint16)
            grown[:used] = neighbours[:used]
            neighbours = grown
        kmap[i] = -(used + 1)
        neighbours[used] = count
        used += 1
        for j in range(size):
            if d2[j] <= limit:
                neighbours[used + count_at[d2[j]]] = j
                count_at[d2[j]] += 1
        used += count
    return kmap, neighbours[:used].copy()


def _frozen(*tables: np.ndarray) -> None:
    for table in tables:
        table.setflags(write=False)


@cache
def _lattice_of_grid(name: str) -> Lattice:
    spec = SPECS[T[name]]
    levels, values = grid_levels(T[name])
    grid = (2 * levels + 1).astype(np.int8)
    kmap, neighbours = neighbour_maps(levels, spec.bits, spec.kmap_size, spec.nwant, spec.max_level)
    point_keys = (levels.astype(np.int64) << (spec.bits * np.arange(levels.shape[1]))).sum(axis=1)
    count_slots = -kmap[(kmap < 0) & (kmap != NOT_BUILT)].astype(np.int64) - 1
    is_count = np.zeros(neighbours.size, dtype=bool)
    is_count[count_slots] = True
    neighbour_keys = np.where(is_count, 0, point_keys[np.where(is_count, 0, neighbours)]).astype(np.uint16)
    _frozen(grid, values, kmap, neighbours, neighbour_keys)
    return Lattice(grid, values, kmap, neighbours, neighbour_keys)


def lattice(qtype: GGMLQuantizationType) -> Lattice:
    """The tables `qtype`'s quantizer reads, built once per process (IQ1_S and IQ1_M share one).

    ggml's neighbour lists of every key the quantizer can form, in key order; for the 8-wide codebooks
    that leaves out the slices ggml also builds for keys holding a level 3 (see `ggml_tables`).
    """
    return _lattice_of_grid((T.IQ1_S if qtype == T.IQ1_M else qtype).name)


def ggml_tables(qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """(kmap, neighbours) exactly as ggml lays them out, every key included (built on each call)."""
    spec = SPECS[qtype]
    levels, _ = grid_levels(qtype)
    return neighbour_maps(levels, spec.bits, spec.kmap_size, spec.nwant)
