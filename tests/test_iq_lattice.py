"""ggml's lattice tables (iq2xs_init_impl, iq3xs_init_impl), rebuilt by rioquant.kernels.iq_lattice.

Here the tables are checked against a literal numpy transcription of ggml's construction (a stable
sort of (d2, j) pairs per key). That they equal ggml's own tables is checked through ggml's bytes in
the kernel tests (tests/test_iq2.py: rows that force the quantizers through every off-codebook key).
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from rioquant.kernels.iq_lattice import NOT_BUILT, SPECS, LatticeSpec, ggml_tables, grid_levels, lattice

T = GGMLQuantizationType
LATTICE_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ3_XXS, T.IQ3_S]


def key_levels(keys: np.ndarray, spec: LatticeSpec, dim: int) -> np.ndarray:
    """The levels packed in each key: (K, dim)."""
    return (keys[:, None] >> (spec.bits * np.arange(dim))) & ((1 << spec.bits) - 1)


def reference_lists(levels: np.ndarray, spec: LatticeSpec, keys: np.ndarray) -> np.ndarray:
    """ggml's neighbour lists of `keys`, concatenated: per key the (d2, j) pairs sorted, cut after the
    nwant-th distinct distance."""
    pos = 2 * levels.astype(np.int32) + 1  # (G, dim)
    key_pos = 2 * key_levels(keys, spec, levels.shape[1]) + 1  # (K, dim)
    d2 = ((key_pos[:, None, :] - pos[None, :, :]) ** 2).sum(axis=-1)  # (K, G)
    order = np.argsort(d2, axis=1, kind="stable")  # ties keep ascending j: the (d2, j) order
    sorted_d2 = np.take_along_axis(d2, order, axis=1)
    rank = np.cumsum(np.diff(sorted_d2, axis=1, prepend=sorted_d2[:, :1]) > 0, axis=1)  # distinct d2 before
    return order[rank < spec.nwant]  # row-major: the lists one after another


def gathered_lists(kmap: np.ndarray, neighbours: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The neighbour lists of `keys` in a table, concatenated."""
    offsets = -kmap[keys].astype(np.int64) - 1
    counts = neighbours[offsets].astype(np.int64)
    starts = np.repeat(offsets + 1 - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return neighbours[starts + np.arange(counts.sum())]


@pytest.mark.parametrize("qtype", LATTICE_TYPES, ids=[t.name for t in LATTICE_TYPES])
def test_tables_equal_ggml_construction(qtype):
    """ggml's layout: kmap of the codebook; slices in key order; and, for every key the quantizer can
    form and a sample of the others, the list ggml's sort gives. The kernels' tables hold the same
    lists for every key the quantizer can form."""
    spec = SPECS[qtype]
    levels, _ = grid_levels(qtype)
    kmap, neighbours = ggml_tables(qtype)
    codebook_keys = (levels.astype(np.int64) << (spec.bits * np.arange(levels.shape[1]))).sum(axis=1)
    np.testing.assert_array_equal(kmap[codebook_keys], np.arange(len(levels)))
    off = np.flatnonzero(kmap < 0)
    assert len(off) == spec.kmap_size - len(levels)
    offsets = -kmap[off] - 1
    counts = neighbours[offsets].astype(np.int64)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts + 1)[:-1]]))
    assert offsets[-1] + counts[-1] + 1 == neighbours.size
    reachable = (key_levels(off, spec, levels.shape[1]) <= spec.max_level).all(axis=1)
    sample = off[reachable | (np.random.default_rng(0).random(len(off)) < 0.01)]
    for chunk in np.array_split(sample, max(1, len(sample) * len(levels) // 2**21)):
        np.testing.assert_array_equal(gathered_lists(kmap, neighbours, chunk), reference_lists(levels, spec, chunk))
    table = lattice(qtype)
    np.testing.assert_array_equal(table.grid, 2 * levels + 1)
    np.testing.assert_array_equal(table.kmap[codebook_keys], np.arange(len(levels)))
    assert (table.kmap[off[~reachable]] == NOT_BUILT).all()
    np.testing.assert_array_equal(
        gathered_lists(table.kmap, table.neighbours, off[reachable]), gathered_lists(kmap, neighbours, off[reachable])
    )


def test_codebook_sizes_and_sharing():
    assert [lattice(t).grid.shape for t in LATTICE_TYPES] == [(256, 8), (512, 8), (1024, 8), (2048, 8), (256, 4), (512, 4)]
    assert lattice(T.IQ1_M) is lattice(T.IQ1_S)
