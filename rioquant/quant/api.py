"""`quantize` / `dequantize`: the validated public entry points over the Numba kernels.

Validation lives here, once, so the kernels can assume well-formed float32 rows: they never see a
NaN, a ragged row or a mismatched importance vector, and so never produce garbage silently.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
from gguf import GGMLQuantizationType

from rioquant.errors import BadRowError, NonFiniteRowError, QuantInputError
from rioquant.files.gguf_file import nbytes
from rioquant.kernels import floats
from rioquant.kernels.driver import dequantize_driver, first_nonfinite_row, quantize_driver
from rioquant.quant.error_sums import quantize_rows_with_sums, slice_sums
from rioquant.quant.types import (
    BLOCK_KERNELS,
    FLOAT_TYPES,
    LATTICE_MAGNITUDE_LIMIT,
    LATTICE_TYPES,
    REQUIRES_IMATRIX,
    block_geometry,
    parse_qtype,
)

_NO_IMPORTANCE = np.zeros(0, dtype=np.float32)


@contextmanager
def numba_threads(threads: int | None) -> Iterator[None]:
    """Run the enclosed kernels on `threads` threads (None: all), restoring the previous count."""
    if threads is None:
        yield
        return
    if threads < 1 or threads > numba.config.NUMBA_NUM_THREADS:
        raise QuantInputError(f"threads={threads}: choose 1..{numba.config.NUMBA_NUM_THREADS}")
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _check_rows(x: np.ndarray, qtype: GGMLQuantizationType) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        got = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise QuantInputError(f"quantize expects a float32 array (rows, n_per_row), got {got}")
    block, _ = block_geometry(qtype)
    if x.shape[1] == 0 or x.shape[1] % block:
        raise QuantInputError(
            f"row length {x.shape[1]} is not a multiple of {qtype.name}'s block size {block}"
        )
    if qtype in FLOAT_TYPES:  # the block types' driver finds NaN/Inf rows itself
        bad_row = first_nonfinite_row(x)
        if bad_row >= 0:
            raise NonFiniteRowError(bad_row)
    if qtype in LATTICE_TYPES and x.size:
        peaks = np.max(np.abs(x), axis=1)
        beyond = np.isfinite(peaks) & (peaks > LATTICE_MAGNITUDE_LIMIT)  # NaN/Inf rows: the driver names them
        row = int(np.argmax(beyond))
        if beyond[row]:
            raise BadRowError(
                row, f"holds |x| up to {peaks[row]:.3g}, beyond the {LATTICE_MAGNITUDE_LIMIT:.0e} that {qtype.name}'s "
                "float32 lattice search handles (ggml aborts on such rows): choose another type for this tensor",
            )


def _check_importance(imatrix: np.ndarray, n_per_row: int) -> np.ndarray:
    if not isinstance(imatrix, np.ndarray) or imatrix.dtype != np.float32 or imatrix.shape != (n_per_row,):
        got = f"{imatrix.dtype} {imatrix.shape}" if isinstance(imatrix, np.ndarray) else type(imatrix).__name__
        raise QuantInputError(f"imatrix must be float32 of shape ({n_per_row},), got {got}")
    if not np.all(np.isfinite(imatrix)):
        raise QuantInputError(f"imatrix entry {int(np.argmin(np.isfinite(imatrix)))} is NaN or Inf")
    return np.ascontiguousarray(imatrix)


def quantize(
    x: np.ndarray,
    qtype: "str | GGMLQuantizationType",
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Quantize float32 rows to ggml blocks: uint8 (rows, row_bytes), byte-identical to ggml_quantize_chunk.

    With `imatrix` (importance per column) the K types take ggml's importance-weighted `*_impl`
    search; element types and Q8_0 ignore it, as ggml does. The REQUIRES_IMATRIX types refuse to
    run without one, as llama-quantize does.
    """
    return _quantize(x, qtype, imatrix, threads)[0]


def quantize_measured(
    x: np.ndarray,
    qtype: "str | GGMLQuantizationType",
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`quantize`, and the error sums of its bytes against x (rioquant.quant.error_sums, weighted by
    `weights`, None for none) from the same pass: each row is measured while it is still in cache."""
    return _quantize(x, qtype, imatrix, threads, True, weights)


def _quantize(
    x: np.ndarray, qtype: "str | GGMLQuantizationType", imatrix: np.ndarray | None, threads: int | None,
    measure: bool = False, weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(quantize's bytes, their error sums weighted by `weights` if `measure`, else None)."""
    qtype = parse_qtype(qtype)
    if imatrix is None and qtype in REQUIRES_IMATRIX:
        raise QuantInputError(
            f"{qtype.name} needs an importance matrix, as in llama.cpp: pass imatrix= (convert: --imatrix FILE)"
        )
    _check_rows(x, qtype)
    x = np.ascontiguousarray(x)
    w = _NO_IMPORTANCE if weights is None else _check_importance(weights, x.shape[1])
    if qtype in FLOAT_TYPES:
        data = floats.to_element_bytes(x, qtype.name)
        if not measure:
            return data, None
        with numba_threads(threads):
            return data, slice_sums(x, data, qtype, w)
    importance = _NO_IMPORTANCE if imatrix is None else _check_importance(imatrix, x.shape[1])
    out = np.empty((x.shape[0], nbytes(qtype, (x.shape[1],))), dtype=np.uint8)
    sums = None
    with numba_threads(threads):
        if measure:
            bad_row, sums = quantize_rows_with_sums(BLOCK_KERNELS[qtype], x, importance, w, out)
        else:
            bad_row = quantize_driver(BLOCK_KERNELS[qtype].quantize_row)(x, importance, out)
    if bad_row >= 0:
        raise NonFiniteRowError(bad_row)
    return out, sums


def dequantize(data: np.ndarray, qtype: "str | GGMLQuantizationType", shape: tuple[int, ...]) -> np.ndarray:
    """ggml blocks → float32 array of `shape` (the last axis is the row), equal to gguf.quants.dequantize."""
    qtype = parse_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    n_per_row = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    try:
        expected = nbytes(qtype, shape)
    except ValueError as err:
        raise QuantInputError(f"dequantize {qtype.name} of shape {shape}: {err}") from None
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != expected:
        raise QuantInputError(f"{qtype.name} data of {raw.size} bytes does not hold shape {shape} ({expected} bytes)")
    if qtype in FLOAT_TYPES:
        return floats.from_element_bytes(raw, qtype.name, shape)
    out = np.empty((rows, n_per_row), dtype=np.float32)
    dequantize_driver(BLOCK_KERNELS[qtype].dequantize_row)(raw.reshape(rows, -1), out)
    return out.reshape(shape)
