"""The float64 sums every error figure is a function of, for float32 rows and their quantized bytes.

y = dequant(quant(x)), e = y − x, w the importance: per row Σx², Σy², Σxy, Σe², Σwe², Σwx² and
max|e|, in float64. Per-row sums are reduced by numpy afterwards, so the figures do not depend on
the thread count. rioquant.quant.metrics turns them into figures.

The conversion measures in the quantize pass itself (`quantize_rows_with_sums`): each row is
dequantized into a scratch row and summed right after its bytes are written, while the row and its
bytes are still in cache, in the same parallel loop (no second pass over the slab, no second
thread start-up per slab). `slice_sums` measures bytes quantized earlier the same way (the same
row kernels, so the same sums), and decodes F16/BF16 in pieces.
"""

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType
from numba import get_num_threads, njit, prange
from numba.core.registry import CPUDispatcher

from rioquant.kernels import floats
from rioquant.kernels.common import frame_array
from rioquant.kernels.driver import first_true, row_is_finite, specialise
from rioquant.quant.types import BLOCK_KERNELS, FLOAT_TYPES, KernelPair, parse_qtype

ROWS_PER_TASK = 16  # rows per parallel task of slice_sums: amortises the scratch row
TASKS_PER_THREAD = 8  # quantize_rows_with_sums: tasks (each with one scratch row) per thread, for balance
N_SUMS = 7
SX2, SY2, SXY, SE2, SWE2, SWX2, MAXE = range(N_SUMS)
LANES = 16  # partial sums per figure, see _accumulate
_NO_WEIGHTS = np.zeros(0, dtype=np.float32)


@njit(cache=True, inline="always")
def _add_plain(xs, ys, count, sx2, sy2, sxy, se2, maxe) -> None:
    """Weights 0..count-1 of one group (count = LANES but in a row's last group) into lanes 0..count-1."""
    for k in range(count):
        xv = np.float64(xs[k])
        yv = np.float64(ys[k])
        ev = yv - xv
        sx2[k] += xv * xv
        sy2[k] += yv * yv
        sxy[k] += xv * yv
        se2[k] += ev * ev
        a = abs(ev)
        maxe[k] = a if a > maxe[k] else maxe[k]


@njit(cache=True, inline="always")
def _add_weighted(xs, ys, ws, count, swe2, swx2) -> None:
    """_add_plain's group for the importance-weighted sums."""
    for k in range(count):
        xv = np.float64(xs[k])
        ev = np.float64(ys[k]) - xv
        wv = np.float64(ws[k])
        swe2[k] += wv * (ev * ev)
        swx2[k] += wv * (xv * xv)


@njit(cache=True, inline="always")  # no fastmath: figures must not depend on the machine (resume, tests)
def _accumulate(x: np.ndarray, y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[:] = the 7 sums of one row (float64); w is (n,) or (0,) for no weighting.

    Weight j goes into partial sum j % LANES of each figure, and the lanes are added in order at the
    end: the order is written out, so the figures are the same on every machine, and LLVM keeps the
    lanes in vector registers. One chain of float64 additions per figure (a scalar loop) took four
    times as long and was most of the report's cost. The weighted sums take a second loop over the
    row (in cache): in the same loop their lanes no longer fit in the registers. Slices at constant
    offsets (not x[j0 + k]) spare each load a negative-index test, which kept LLVM from vectorising.
    """
    sx2 = frame_array(LANES, np.float64)
    sy2 = frame_array(LANES, np.float64)
    sxy = frame_array(LANES, np.float64)
    se2 = frame_array(LANES, np.float64)
    maxe = frame_array(LANES, np.float64)
    swe2 = frame_array(LANES, np.float64)
    swx2 = frame_array(LANES, np.float64)
    for k in range(LANES):
        sx2[k] = sy2[k] = sxy[k] = se2[k] = maxe[k] = swe2[k] = swx2[k] = 0.0
    n = x.size
    full = n - n % LANES
    for j0 in range(0, full, LANES):
        _add_plain(x[j0 : j0 + LANES], y[j0 : j0 + LANES], LANES, sx2, sy2, sxy, se2, maxe)
    _add_plain(x[full:], y[full:], n - full, sx2, sy2, sxy, se2, maxe)
    if w.size == n:
        for j0 in range(0, full, LANES):
            _add_weighted(x[j0 : j0 + LANES], y[j0 : j0 + LANES], w[j0 : j0 + LANES], LANES, swe2, swx2)
        _add_weighted(x[full:], y[full:], w[full:], n - full, swe2, swx2)
    for s in range(N_SUMS):
        out[s] = 0.0
    for k in range(LANES):
        out[SX2] += sx2[k]
        out[SY2] += sy2[k]
        out[SXY] += sxy[k]
        out[SE2] += se2[k]
        out[SWE2] += swe2[k]
        out[SWX2] += swx2[k]
        out[MAXE] = max(out[MAXE], maxe[k])


def _reduce(per_row: np.ndarray) -> np.ndarray:
    """(rows, 7) per-row sums → the slab's 7 sums."""
    return np.append(per_row[:, :MAXE].sum(axis=0), per_row[:, MAXE].max(initial=0.0))


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


def _quantize_sum_rows_over(quantize_row: CPUDispatcher, dequantize_row: CPUDispatcher) -> Callable:
    def quantize_sum_rows(x: np.ndarray, importance: np.ndarray, w: np.ndarray, data: np.ndarray,
                          out: np.ndarray, tasks: int) -> int:
        """kernels.driver's quantize_rows (x → data, the first non-finite row or -1), and each
        quantized row's sums (weighted by w, (n,) or (0,)) into out (rows, 7) while it is in cache;
        the rows in `tasks` runs, one scratch row each."""
        rows, n = x.shape
        bad = np.zeros(rows, dtype=np.bool_)
        for task in prange(tasks):
            y = np.empty(n, dtype=np.float32)  # (n,) scratch: one dequantized row at a time
            for r in range(task * rows // tasks, (task + 1) * rows // tasks):
                if row_is_finite(x[r]):
                    quantize_row(x[r], importance, data[r])
                    dequantize_row(data[r], y)
                    _accumulate(x[r], y, w, out[r])
                else:
                    bad[r] = True
        return first_true(bad)

    return quantize_sum_rows


def quantize_rows_with_sums(kernels: KernelPair, x: np.ndarray, importance: np.ndarray, w: np.ndarray,
                            data: np.ndarray) -> tuple[int, np.ndarray]:
    """Quantize float32 rows x (rows, n) into data (rows, row_bytes) and sum their error in the same pass:
    (the first non-finite row or -1, the slab's 7 sums). x, importance and w as api.quantize has checked
    them; w (n,) or (0,) weights the sums."""
    per_row = np.zeros((x.shape[0], N_SUMS), dtype=np.float64)
    driver = specialise(_quantize_sum_rows_over, kernels.quantize_row, kernels.dequantize_row)
    tasks = min(x.shape[0], TASKS_PER_THREAD * get_num_threads())  # here: Numba cannot cache a driver that asks
    bad_row = driver(x, importance, w, data, per_row, tasks)
    return bad_row, _reduce(per_row)


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
        specialise(_block_row_sums_over, BLOCK_KERNELS[qtype].dequantize_row, parallel=parallel)(x, raw, w, per_row)
    return _reduce(per_row)
