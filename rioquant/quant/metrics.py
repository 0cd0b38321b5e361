"""Quantization error of every tensor and every expert slice, measured inside the conversion pass.

`TensorErrorTracker` collects each slab's sums (rioquant.quant.error_sums) as the converter streams
it, and turns them into the report record of the tensor.

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

from rioquant.files.gguf_file import tensor_kind
from rioquant.quant.api import quantize_measured
from rioquant.quant.error_sums import DENSE_CHUNK_WEIGHTS, MAXE, N_SUMS, SX2, slice_sums
from rioquant.quant.types import parse_qtype

OUTLIER_FACTOR = 2.0  # an expert this many times its tensor's median relative error is flagged


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


class Slice(NamedTuple):
    """The measured error of one slab: all a tracker keeps of it, so it can be measured elsewhere."""

    sums: np.ndarray  # (7,) float64, see slice_sums
    rows: int
    n_weights: int
    weighted: bool  # imatrix figures computed (the slice had real importance data)
    no_imatrix_data: bool


def measure_slice(x: np.ndarray, data: np.ndarray, qtype: str, weights: np.ndarray | None = None,
                  no_imatrix_data: bool = False, chunk_weights: int = DENSE_CHUNK_WEIGHTS) -> Slice:
    """One slab: float32 rows x (rows, n), its quantized bytes, the importance it was quantized with
    (None if none; pass no_imatrix_data for an expert the imatrix never saw)."""
    use = None if no_imatrix_data else weights
    return Slice(slice_sums(x, data, qtype, use, chunk_weights), x.shape[0], x.size, use is not None, no_imatrix_data)


def quantize_slice(x: np.ndarray, qtype: str, weights: np.ndarray | None = None, no_imatrix_data: bool = False,
                   threads: int | None = None) -> tuple[np.ndarray, Slice]:
    """Quantize one slab with the importance `weights` and measure it in the same pass (the conversion's
    way, api.quantize_measured): its bytes and the Slice measure_slice would give for them."""
    use = None if no_imatrix_data else weights
    data, sums = quantize_measured(x, qtype, imatrix=weights, threads=threads, weights=use)
    return data, Slice(sums, x.shape[0], x.size, use is not None, no_imatrix_data)


@dataclass
class TensorErrorTracker:
    """Collects one tensor's slices as they stream past; `result()` gives its report record."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    layer: int | None = None
    chunk_weights: int = DENSE_CHUNK_WEIGHTS  # see slice_sums
    _slices: list[Slice] = field(default_factory=list)

    def add(self, x: np.ndarray, data: np.ndarray, weights: np.ndarray | None = None,
            no_imatrix_data: bool = False) -> None:
        """Measure one slab (see measure_slice) and keep it."""
        self._slices.append(measure_slice(x, data, self.qtype, weights, no_imatrix_data, self.chunk_weights))

    def add_slice(self, measured: Slice) -> None:
        """Keep a slab measured elsewhere (quantize_slice, in the conversion's quantize stage)."""
        self._slices.append(measured)

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
