"""The float64 sums every error figure is a function of, for float32 rows and their quantized bytes.

The converter holds each float32 slab next to its quantized bytes, so the error costs one more read
of both: a Numba kernel dequantizes each row into a scratch row (never a second copy of the slab)
and accumulates, in float64, Σx², Σy², Σxy, Σe², Σwe², Σwx² and max|e| (y = dequant(quant(x)),
e = y − x, w the importance). Per-row sums are reduced by numpy afterwards, so the figures do not
depend on the thread count. rioquant.quant.metrics turns them into figures.
"""

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange
from numba.core.registry import CPUDispatcher

from rioquant.kernels import floats
from rioquant.kernels.driver import specialise
from rioquant.quant.types import BLOCK_KERNELS, FLOAT_TYPES, parse_qtype

ROWS_PER_TASK = 16  # rows per parallel task: amortises the scratch row
N_SUMS = 7
SX2, SY2, SXY, SE2, SWE2, SWX2, MAXE = range(N_SUMS)
_NO_WEIGHTS = np.zeros(0, dtype=np.float32)


@njit(cache=True)  # no fastmath: figures must not depend on the machine's vector width (resume, tests)
def _accumulate(x: np.ndarray, y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[:] = the 7 sums of one row (float64); w is (n,) or (0,) for no weighting."""
    sx2 = sy2 = sxy = se2 = swe2 = swx2 = 0.0
    maxe = 0.0
    weighted = w.size == x.size
    for j in range(x.size):
        xv = np.float64(x[j])
        yv = np.float64(y[j])
        ev = yv - xv
        sx2 += xv * xv
        sy2 += yv * yv
        sxy += xv * yv
        se2 += ev * ev
        maxe = max(maxe, abs(ev))
        if weighted:
            wv = np.float64(w[j])
            swe2 += wv * ev * ev
            swx2 += wv * xv * xv
    out[SX2], out[SY2], out[SXY], out[SE2] = sx2, sy2, sxy, se2
    out[SWE2], out[SWX2], out[MAXE] = swe2, swx2, maxe


def _block_row_sums_over(dequantize_row: CPUDispatcher) -> Callable:
    def block_row_sums(x: np.ndarray, data: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
        """Per-row sums of x (rows, n) against the ggml blocks data (rows, row_bytes) → out (rows, 7)."""
        rows, n = x.shape
        for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            y = np.empty(n, dtype=np.float32)  # (n,) scratch: one dequantized row at a time
            for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
                dequantize_row(data[r], y)
                _accumulate(x[r], y, w, out[r])

    return block_row_sums


def _dense_row_sums_impl(x: np.ndarray, y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        _accumulate(x[r], y[r], w, out[r])


# Parallel for big slabs; serial below PARALLEL_MIN_WEIGHTS, where a parallel launch costs more than the
# work (and, on a busy machine, waits a scheduler slice for every worker). Block drivers are specialised
# to each type's dequantizer and cached across processes (kernels.driver.specialise).
PARALLEL_MIN_WEIGHTS = 1 << 20
DENSE_CHUNK_WEIGHTS = 1 << 24  # F16/BF16 are decoded to float32 in pieces of this many weights
_dense_row_sums = njit(parallel=True, cache=True)(_dense_row_sums_impl)
_dense_row_sums_serial = njit(cache=True)(_dense_row_sums_impl)


def slice_sums(x: np.ndarray, data: np.ndarray, qtype: "str | GGMLQuantizationType",
               weights: np.ndarray | None = None, chunk_weights: int = DENSE_CHUNK_WEIGHTS) -> np.ndarray:
    """The 7 float64 sums (see module docstring) of float32 rows x (rows, n) and their quantized bytes;
    F16/BF16 bytes are decoded `chunk_weights` weights at a time."""
    qtype = parse_qtype(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = _NO_WEIGHTS if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    per_row = np.empty((x.shape[0], N_SUMS), dtype=np.float64)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(x.shape[0], -1)
    parallel = x.size >= PARALLEL_MIN_WEIGHTS
    if qtype in FLOAT_TYPES:
        dense = _dense_row_sums if parallel else _dense_row_sums_serial
        step = max(1, chunk_weights // x.shape[1])  # rows decoded at a time: no full float32 copy
        for r in range(0, x.shape[0], step):
            rows = slice(r, r + step)
            dense(x[rows], floats.from_element_bytes(raw[rows], qtype.name, x[rows].shape), w, per_row[rows])
    else:
        specialise(_block_row_sums_over, BLOCK_KERNELS[qtype].dequantize_row, parallel)(x, raw, w, per_row)
    sums = per_row[:, :MAXE].sum(axis=0)
    return np.append(sums, per_row[:, MAXE].max(initial=0.0))
