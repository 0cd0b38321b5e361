"""Parallel drivers: one `prange` over rows around any serial row kernel, compiled once per kernel and cached.

Row kernels have the signatures
    quantize_row(x: float32[n], importance: float32[n or 0], out: uint8[row_bytes])
    dequantize_row(data: uint8[row_bytes], out: float32[n])
Rows are independent in every ggml format, so the bytes do not depend on the thread count.

Each driver is specialised to its kernel by a closure (`specialise`), so Numba inlines the kernel and
the driver's signature holds only arrays. Numba cannot cache it as it stands: a dispatcher passed as an
argument puts a weak reference into the cache index ("underlying object has vanished" when a later
process rewrites it), and a closure's cache key hashes a pickle of the captured dispatcher, which
differs in every process. `DriverCache` keys the index on the driver's bytecode plus a stamp of the
kernel sources instead, so a process loads what an earlier one compiled, and an edit to any file of
rioquant/kernels recompiles the drivers (Numba itself tracks only the driver's own file). The cache
lives where Numba puts every `cache=True` function: `__pycache__` beside the source, or the user cache
(`NUMBA_CACHE_DIR`, else ~/.cache) when the package directory is read-only.
"""

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numba import njit, prange
from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher

from rioquant.kernels.common import f32_as_i32

KERNELS_DIR = Path(__file__).parent


@functools.cache
def kernel_sources_stamp() -> str:
    """sha256 of every kernel source's name, size and mtime: what a cached driver was compiled from."""
    digest = hashlib.sha256()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


class DriverCache(FunctionCache):
    """Numba's function cache with a key that is the same in every process (see the module docstring)."""

    def _index_key(self, sig, codegen):
        code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
        return sig, codegen.magic_tuple(), (code, kernel_sources_stamp())


@functools.cache
def specialise(factory: Callable[..., Callable], *kernels: CPUDispatcher, parallel: bool = True) -> CPUDispatcher:
    """`factory(*kernels)` (a function closing over the kernels) compiled with nogil, cached across processes.

    The name gets the first kernel's, so each driver has its own index file in the cache.
    """
    func = factory(*kernels)
    func.__qualname__ = f"{func.__name__}_{kernels[0].__name__}{'' if parallel else '_serial'}"
    driver = njit(parallel=parallel, nogil=True)(func)
    driver._cache = DriverCache(driver.py_func)  # what `cache=True` sets, with the stable key
    return driver


def _quantize_rows_over(row_kernel: CPUDispatcher) -> Callable:
    def quantize_rows(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> int:
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
        return first_true(bad)

    return quantize_rows


def _dequantize_rows_over(row_kernel: CPUDispatcher) -> Callable:
    def dequantize_rows(data: np.ndarray, out: np.ndarray) -> None:
        """Dequantize each row of data (rows, row_bytes) into out (rows, n)."""
        for r in prange(data.shape[0]):
            row_kernel(data[r], out[r])

    return dequantize_rows


def quantize_driver(row_kernel: CPUDispatcher) -> CPUDispatcher:
    """quantize_rows(x, importance, out) -> first non-finite row or -1, for this row kernel."""
    return specialise(_quantize_rows_over, row_kernel)


def dequantize_driver(row_kernel: CPUDispatcher) -> CPUDispatcher:
    """dequantize_rows(data, out) for this row kernel."""
    return specialise(_dequantize_rows_over, row_kernel)


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
def first_true(flags: np.ndarray) -> int:
    """Index of the first True flag (a driver's first bad row), or -1."""
    for r in range(flags.size):
        if flags[r]:
            return r
    return -1


@njit(parallel=True, nogil=True, cache=True)
def first_nonfinite_row(x: np.ndarray) -> int:
    """Index of the first row holding NaN or ±Inf, or -1 (for the element types, which have no kernel)."""
    rows = x.shape[0]
    bad = np.zeros(rows, dtype=np.bool_)
    for r in prange(rows):
        bad[r] = not row_is_finite(x[r])
    return first_true(bad)
