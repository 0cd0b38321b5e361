"""Parallel drivers: one `prange` over rows around any serial row kernel.

Row kernels have the signatures
    quantize_row(x: float32[n], importance: float32[n or 0], out: uint8[row_bytes])
    dequantize_row(data: uint8[row_bytes], out: float32[n])
and are handed in as Numba dispatchers, so Numba compiles one specialised driver per kernel.
Rows are independent in every ggml format, so the bytes do not depend on the thread count.

The drivers are deliberately not cached (`cache=True`): Numba pickles a dispatcher argument's type
into the cache index by weak reference, and rewriting an index that holds a dispatcher from an earlier
process fails with "underlying object has vanished". The row kernels they call are cached, so a driver
costs about a second of compilation per type per process.
"""

import numpy as np
from numba import njit, prange

from rioquant.kernels.common import f32_as_i32


@njit(parallel=True)
def quantize_rows(row_kernel, x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> int:
    """Quantize each row of x (rows, n) into out (rows, row_bytes); importance is (n,) or (0,).

    Returns the index of the first row holding NaN or ±Inf, or -1. Such rows are not handed to the
    kernel (their bytes are left unwritten). Checking each row just before its kernel runs reads it
    into the cache for the kernel and saves a separate parallel pass over the matrix, whose thread
    start-up costs the fastest quantizers (Q3_K, the legacy types) a tenth of their time.
    """
    rows = x.shape[0]
    bad = np.zeros(rows, dtype=np.bool_)
    for r in prange(rows):
        if row_is_finite(x[r]):
            row_kernel(x[r], importance, out[r])
        else:
            bad[r] = True
    return _first_true(bad)


@njit(parallel=True)
def dequantize_rows(row_kernel, data: np.ndarray, out: np.ndarray) -> None:
    """Dequantize each row of data (rows, row_bytes) into out (rows, n)."""
    for r in prange(data.shape[0]):
        row_kernel(data[r], out[r])


@njit(cache=True, inline="always")
def row_is_finite(row: np.ndarray) -> bool:
    """No NaN or ±Inf in the row.

    NaN and Inf are exactly the floats whose exponent field is all ones, so the row reduces to the
    max of its exponent fields: a branch-free loop the compiler vectorises (an early `break` would
    not), which keeps this check a small fraction of the fastest quantizers' time.
    """
    top = 0
    for v in row:
        top = max(top, f32_as_i32(v) & 0x7F800000)
    return top != 0x7F800000


@njit(cache=True)
def _first_true(flags: np.ndarray) -> int:
    for r in range(flags.size):
        if flags[r]:
            return r
    return -1


@njit(parallel=True, cache=True)
def first_nonfinite_row(x: np.ndarray) -> int:
    """Index of the first row holding NaN or ±Inf, or -1 (for the element types, which have no kernel)."""
    rows = x.shape[0]
    bad = np.zeros(rows, dtype=np.bool_)
    for r in prange(rows):
        bad[r] = not row_is_finite(x[r])
    return _first_true(bad)
