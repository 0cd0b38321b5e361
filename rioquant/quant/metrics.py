"""Quantization error of every tensor and every expert slice, measured inside the conversion pass.

The converter holds each float32 slab next to its quantized bytes, so the error costs one more read
of both: a Numba kernel dequantizes each row into a scratch row (never a second copy of the slab)
and accumulates, in float64, the sums every metric is a function of. Per-row sums are reduced by
numpy afterwards, so the figures do not depend on the thread count.

Per slice (an expert slab, or a whole 2-D tensor), with x the float32 weights, y = dequant(quant(x)),
e = y − x and w the importance the slice was quantized with:
    rel_rmse          √(Σe² / Σx²)            relative RMS error
    imatrix_se        Σ_r Σ_j w_j e_rj² / rows the expected squared error of one output per token,
                                              taking w_j = E[a_j²] of the calibration activations
    imatrix_rel_rmse  √(Σ w e² / Σ w x²)      the same, relative to the output's own energy
    max_abs_err       max |e|
    cosine            Σxy / √(Σx² Σy²)
Flags: `dead` (an expert whose weights are all zero), `outlier` (rel_rmse above OUTLIER_FACTOR × the
median of the live experts of the same tensor, i.e. of that layer and kind), `no_imatrix_data` (the
imatrix saw no token for the expert; quantized with neutral weights, imatrix figures left out).
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

from rioquant.kernels import floats
from rioquant.quant.types import BLOCK_KERNELS, FLOAT_TYPES, parse_qtype

OUTLIER_FACTOR = 2.0  # an expert this many times its tensor's median relative error is flagged
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


def _block_row_sums_impl(dequantize_row, x: np.ndarray, data: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """Per-row sums of x (rows, n) against the ggml blocks data (rows, row_bytes) → out (rows, 7)."""
    rows, n = x.shape
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        y = np.empty(n, dtype=np.float32)  # (n,) scratch: one dequantized row at a time
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            dequantize_row(data[r], y)
            _accumulate(x[r], y, w, out[r])


def _dense_row_sums_impl(x: np.ndarray, y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        _accumulate(x[r], y[r], w, out[r])


# Parallel for big slabs; serial below PARALLEL_MIN_WEIGHTS, where a parallel launch costs more than the
# work (and, on a busy machine, waits a scheduler slice for every worker). Block drivers are not
# cached: a dispatcher argument breaks Numba's cache index (see kernels/driver.py).
PARALLEL_MIN_WEIGHTS = 1 << 20
DENSE_CHUNK_WEIGHTS = 1 << 24  # F16/BF16 are decoded to float32 in pieces of this many weights
_block_row_sums = njit(parallel=True)(_block_row_sums_impl)
_block_row_sums_serial = njit(_block_row_sums_impl)
_dense_row_sums = njit(parallel=True, cache=True)(_dense_row_sums_impl)
_dense_row_sums_serial = njit(cache=True)(_dense_row_sums_impl)


def slice_sums(x: np.ndarray, data: np.ndarray, qtype: "str | GGMLQuantizationType",
               weights: np.ndarray | None = None) -> np.ndarray:
    """The 7 float64 sums (see module docstring) of float32 rows x (rows, n) and their quantized bytes."""
    qtype = parse_qtype(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = _NO_WEIGHTS if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    per_row = np.empty((x.shape[0], N_SUMS), dtype=np.float64)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(x.shape[0], -1)
    parallel = x.size >= PARALLEL_MIN_WEIGHTS
    if qtype in FLOAT_TYPES:
        dense = _dense_row_sums if parallel else _dense_row_sums_serial
        step = max(1, DENSE_CHUNK_WEIGHTS // x.shape[1])  # rows decoded at a time: no full float32 copy
        for r in range(0, x.shape[0], step):
            rows = slice(r, r + step)
            dense(x[rows], floats.from_element_bytes(raw[rows], qtype.name, x[rows].shape), w, per_row[rows])
    else:
        block = _block_row_sums if parallel else _block_row_sums_serial
        block(BLOCK_KERNELS[qtype].dequantize_row, x, raw, w, per_row)
    sums = per_row[:, :MAXE].sum(axis=0)
    return np.append(sums, per_row[:, MAXE].max(initial=0.0))


def _ratio_sqrt(num: float, den: float) -> float | None:
    if den > 0:
        return math.sqrt(num / den)
    return 0.0 if num == 0 else None


def figures(sums: np.ndarray, rows: int, n_weights: int, weighted: bool) -> dict:
    """Metrics of one slice (or a whole tensor) from its sums; None where a figure is undefined."""
    sx2, sy2, sxy, se2, swe2, swx2, maxe = (float(v) for v in sums)
    if sx2 > 0 and sy2 > 0:
        cosine = sxy / math.sqrt(sx2 * sy2)
    else:
        cosine = 1.0 if sx2 == sy2 == 0 else 0.0
    return {
        "n_weights": n_weights,
        "rel_rmse": _ratio_sqrt(se2, sx2),
        "imatrix_se": swe2 / rows if weighted else None,
        "imatrix_rel_rmse": _ratio_sqrt(swe2, swx2) if weighted else None,
        "max_abs_err": maxe,
        "cosine": cosine,
    }


def bits_per_weight(qtype: "str | GGMLQuantizationType") -> float:
    block, type_bytes = GGML_QUANT_SIZES[parse_qtype(qtype)]
    return 8 * type_bytes / block


class _Slice(NamedTuple):
    sums: np.ndarray  # (7,) float64, see slice_sums
    rows: int
    n_weights: int
    weighted: bool  # imatrix figures computed (the slice had real importance data)
    no_imatrix_data: bool


@dataclass
class TensorErrorTracker:
    """Collects one tensor's slices as they stream past; `result()` gives its report record."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    layer: int | None = None
    _slices: list[_Slice] = field(default_factory=list)

    def add(self, x: np.ndarray, data: np.ndarray, weights: np.ndarray | None = None,
            no_imatrix_data: bool = False) -> None:
        """One slab: float32 rows x (rows, n), its quantized bytes, the importance it was quantized with
        (None if none; pass no_imatrix_data for an expert the imatrix never saw)."""
        use = None if no_imatrix_data else weights
        self._slices.append(_Slice(slice_sums(x, data, self.qtype, use), x.shape[0], x.size, use is not None, no_imatrix_data))

    def result(self) -> dict:
        slices = self._slices
        total = np.sum([s.sums[:MAXE] for s in slices], axis=0)
        total = np.append(total, max(s.sums[MAXE] for s in slices))
        weighted = [s for s in slices if s.weighted]
        record = {
            "name": self.name,
            "layer": self.layer,
            "kind": tensor_kind(self.name),
            "qtype": self.qtype,
            "bpw": bits_per_weight(self.qtype),
            "shape": list(self.shape),
            **figures(total, sum(s.rows for s in slices), sum(s.n_weights for s in slices), False),
            "flags": ["dead"] if total[SX2] == 0 else [],
        }
        if weighted:
            w_sums = np.zeros(N_SUMS)
            for s in weighted:
                w_sums[:MAXE] += s.sums[:MAXE]
            w = figures(w_sums, sum(s.rows for s in weighted), 0, True)
            record["imatrix_se"], record["imatrix_rel_rmse"] = w["imatrix_se"], w["imatrix_rel_rmse"]
        if len(self.shape) == 3:
            experts = []
            for e, (sums, rows, size, has_w, no_data) in enumerate(slices):
                flags = (["dead"] if sums[SX2] == 0 else []) + (["no_imatrix_data"] if no_data else [])
                experts.append({"expert": e, **figures(sums, rows, size, has_w), "flags": flags})
            flag_outliers(experts)
            record["experts"] = experts
        return record


def flag_outliers(experts: list[dict], factor: float = OUTLIER_FACTOR) -> None:
    """Add `outlier` to experts whose rel_rmse exceeds factor × the median of the live experts."""
    live = [x["rel_rmse"] for x in experts if "dead" not in x["flags"] and x["rel_rmse"] is not None]
    if not live:
        return
    median = float(np.median(live))
    for x in experts:
        err = x["rel_rmse"]
        if "dead" not in x["flags"] and (err is None or (median > 0 and err > factor * median)):
            x["flags"].append("outlier")


def tensor_kind(name: str) -> str:
    """`blk.3.ffn_down_exps.weight` → `ffn_down_exps`; `output.weight` → `output`."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        parts = parts[2:]
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(parts)
