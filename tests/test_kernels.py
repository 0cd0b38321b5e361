"""Every block quantizer, byte for byte against ggml's ggml_quantize_chunk, both code paths.

Dequantization is checked against gguf-py's independent numpy implementation. The types that need an
importance matrix (REQUIRES_IMATRIX) are compared only with one (ggml aborts the process without one
for some of them) and are checked to refuse without one.
"""

import zlib

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rioquant.errors import BadRowError, QuantInputError
from rioquant.quant import dequantize, quantize
from rioquant.quant.types import (
    BLOCK_KERNELS,
    FLOAT_TYPES,
    GGML_REQUIRES_IMATRIX,
    LATTICE_MAGNITUDE_LIMIT,
    LATTICE_TYPES,
    REQUIRES_IMATRIX,
    block_geometry,
)
from rioquant.testing.inputs import IMPORTANCE_KINDS, INPUTS, random_importance

ALL_TYPES = [*FLOAT_TYPES, *BLOCK_KERNELS]
TYPE_IDS = [t.name for t in ALL_TYPES]
PLAIN_TYPES = [t for t in ALL_TYPES if t not in REQUIRES_IMATRIX]  # those quantized without an imatrix too
IMATRIX_ONLY = [t for t in BLOCK_KERNELS if t in REQUIRES_IMATRIX]


def ggml_aborts_on(qtype: gguf.GGMLQuantizationType, x: np.ndarray) -> bool:
    """Rows ggml's lattice searches abort the process on (every candidate's error overflows): rioquant
    refuses them, which test_lattice_types_refuse_rows_ggml_aborts_on checks, so they never reach ggml."""
    return qtype in LATTICE_TYPES and bool(np.abs(x).max() > LATTICE_MAGNITUDE_LIMIT)


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, qtype: gguf.GGMLQuantizationType, case: str) -> None:
    """Fail with the first differing row/block/byte offsets, not a wall of numbers."""
    assert ours.shape == ref.shape, f"{case}: shape {ours.shape} != ggml {ref.shape}"
    diff = np.argwhere(ours != ref)
    if diff.size == 0:
        return
    _, type_bytes = block_geometry(qtype)
    row, col = (int(v) for v in diff[0])
    block = col // type_bytes
    lo = block * type_bytes
    raise AssertionError(
        f"{case}: {len(diff)} bytes differ; first at row {row}, block {block}, byte {col - lo} of the block\n"
        f"  rioquant: {ours[row, lo:lo + type_bytes].tobytes().hex()}\n"
        f"  ggml:     {ref[row, lo:lo + type_bytes].tobytes().hex()}"
    )


def named_rows(qtype: gguf.GGMLQuantizationType, rows: int, n: int, salt: str) -> tuple[np.ndarray, list[str]]:
    """Every named input's rows stacked into one matrix (rows are independent in every format, so each
    row's bytes are those of its input alone), and the input each row came from, to name a failure.
    Each input keeps its own seed; inputs ggml aborts on are left out for the lattice types."""
    blocks, names = [], []
    for case, make in INPUTS.items():
        x = make(np.random.default_rng(zlib.crc32(f"{case}{salt}{qtype.name}".encode())), rows, n)
        if not ggml_aborts_on(qtype, x):
            blocks.append(x)
            names += [case] * rows
    return np.concatenate(blocks), names


def assert_rows_equal(ours: np.ndarray, ref: np.ndarray, qtype: gguf.GGMLQuantizationType, names: list[str], case: str) -> None:
    """assert_same_bytes over stacked named rows, naming the input of the first differing row."""
    bad = np.flatnonzero((ours != ref).any(axis=1)) if ours.shape == ref.shape else [0]
    if len(bad):
        row = int(bad[0])
        assert_same_bytes(ours[row:row + 1], ref[row:row + 1], qtype, f"{case}/{names[row]} (row {row})")


@pytest.mark.parametrize("qtype", PLAIN_TYPES, ids=[t.name for t in PLAIN_TYPES])
@pytest.mark.parametrize("rows,n", [(1, 256), (7, 1024)])
def test_bytes_equal_ggml_without_imatrix(ggml, qtype, rows, n):
    x, names = named_rows(qtype, rows, n, f"{rows}x{n}")
    assert_rows_equal(quantize(x, qtype), ggml.quantize(x, qtype), qtype, names, f"{qtype.name}/{rows}x{n}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("kind", IMPORTANCE_KINDS)
def test_bytes_equal_ggml_with_imatrix(ggml, qtype, kind):
    x, names = named_rows(qtype, 5, 512, kind)
    qw = random_importance(np.random.default_rng(zlib.crc32(f"{kind}{qtype.name}".encode())), 512, kind)
    assert_rows_equal(quantize(x, qtype, imatrix=qw), ggml.quantize(x, qtype, qw), qtype, names, f"{qtype.name}/{kind}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=TYPE_IDS)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-30, 10),
    blocks=st.integers(1, 3),
    use_imatrix=st.booleans(),
)
def test_property_random_scales(ggml, qtype, seed, log_scale, blocks, use_imatrix):
    rng = np.random.default_rng(seed)
    n = blocks * 256
    x = (rng.standard_normal((3, n)) * np.exp(log_scale)).astype(np.float32)
    qw = random_importance(rng, n, "typical") if use_imatrix or qtype in REQUIRES_IMATRIX else None
    assert_same_bytes(quantize(x, qtype, imatrix=qw), ggml.quantize(x, qtype, qw), qtype, f"seed={seed}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=TYPE_IDS)
def test_dequantize_equals_gguf_py(ggml, qtype):
    rng = np.random.default_rng(7)
    x = np.concatenate([INPUTS[c](rng, 2, 512) for c in INPUTS])
    x = x[[not ggml_aborts_on(qtype, row) for row in x]]
    data = ggml.quantize(x, qtype, random_importance(rng, 512, "typical") if qtype in REQUIRES_IMATRIX else None)
    ours = dequantize(data, qtype, x.shape)
    ref = gguf.quants.dequantize(data, qtype)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", list(BLOCK_KERNELS), ids=[t.name for t in BLOCK_KERNELS])
def test_thread_count_does_not_change_bytes(qtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 512)).astype(np.float32)
    qw = random_importance(rng, 512, "typical")
    one = quantize(x, qtype, imatrix=qw, threads=1)
    np.testing.assert_array_equal(one, quantize(x, qtype, imatrix=qw, threads=2))
    np.testing.assert_array_equal(one, quantize(x, qtype, imatrix=qw))


@pytest.mark.parametrize("qtype", IMATRIX_ONLY, ids=[t.name for t in IMATRIX_ONLY])
def test_refuses_without_imatrix(qtype):
    x = np.ones((1, 256), dtype=np.float32)
    with pytest.raises(QuantInputError, match="--imatrix"):
        quantize(x, qtype)


@pytest.mark.parametrize("qtype", sorted(LATTICE_TYPES), ids=[t.name for t in sorted(LATTICE_TYPES)])
def test_lattice_types_refuse_rows_ggml_aborts_on(qtype):
    """A row past the lattice searches' float32 range is named, not quantized (ggml aborts the process)."""
    rng = np.random.default_rng(11)
    x = INPUTS["gauss_1"](rng, 4, 256)
    x[2, 17] = np.float32(LATTICE_MAGNITUDE_LIMIT * 8)
    with pytest.raises(BadRowError, match=r"^row 2 holds \|x\| up to 8e\+06") as err:
        quantize(x, qtype, imatrix=random_importance(rng, 256, "typical"))
    assert err.value.row == 2
    x[2, 17] = np.float32(LATTICE_MAGNITUDE_LIMIT)
    quantize(x, qtype, imatrix=random_importance(rng, 256, "typical"))  # the limit itself is accepted


def test_imatrix_table_holds_ggmls(ggml):
    """Our table of the types ggml aborts on without an imatrix is ggml's own list."""
    assert {t for t in gguf.GGMLQuantizationType if ggml.requires_imatrix(t)} == GGML_REQUIRES_IMATRIX
    assert GGML_REQUIRES_IMATRIX <= REQUIRES_IMATRIX


BLOCK32_TYPES = [t for t in BLOCK_KERNELS if block_geometry(t)[0] == 32]


@pytest.mark.parametrize("qtype", BLOCK32_TYPES, ids=[t.name for t in BLOCK32_TYPES])
@pytest.mark.parametrize("n", [32, 96, 224, 1056])
def test_fallback_types_on_rows_that_k_quants_cannot_take(ggml, qtype, n):
    """The 32-block types are llama.cpp's fallbacks for rows that are not multiples of 256."""
    rng = np.random.default_rng(n)
    x = INPUTS["heavy_tails"](rng, 9, n)
    for qw in (None, random_importance(rng, n, "with_zeros")):
        assert_same_bytes(quantize(x, qtype, imatrix=qw), ggml.quantize(x, qtype, qw), qtype, f"{qtype.name}/n={n}")
