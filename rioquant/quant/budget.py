"""`--target-size` / `--target-bpw`: raise the tensors whose quantization hurts most until the budget is met.

Two steps, kept apart so a better error measure (per-expert metrics, imatrix-weighted error) can
replace the first without touching the second:

1. `measure_errors`: each candidate tensor's relative RMSE, ‖W − deq(q(W))‖ / ‖W‖, at its planned
   type and at every upgrade type, on a deterministic sample of rows (`sample_rows`): up to
   ROWS_PER_TENSOR evenly spaced rows of a matrix; for an expert stack, ROWS_PER_EXPERT rows of up
   to EXPERTS_PER_STACK evenly spaced experts.
2. `raise_to_budget`: greedy. The objective is the sum over tensors of the relative MSE (each matrix
   adds its relative error to the signal it transforms, whatever its size, and independent noises add
   in power); the step taken is always the upgrade with the largest objective reduction per added
   byte that still fits, until nothing fits. A tensor may jump several types at once when that is
   the better ratio.

Tensors a user pinned (`--tensor-type`, `--output-tensor-type`, `--token-embedding-type`) and tensors
kept in F32/F16/BF16 are never raised.
"""

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np
from gguf import GGMLQuantizationType

from rioquant.errors import PlanError
from rioquant.files.gguf_file import nbytes
from rioquant.quant.api import dequantize, quantize
from rioquant.quant.plan import Origin, PlanEntry, fit_row_length

log = logging.getLogger(__name__)
T = GGMLQuantizationType

# The upgrade path, cheapest first; a type whose block does not fit a row is replaced by its fallback.
LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
RAISABLE = frozenset({*LADDER, "Q4_0", "Q5_0", "Q5_1"})

ROWS_PER_TENSOR = 256
EXPERTS_PER_STACK = 16
ROWS_PER_EXPERT = 64


def spaced(n: int, k: int) -> list[int]:
    """k indices evenly spread over range(n) (all of them when n <= k): deterministic, covers both ends."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def sample_rows(shape: tuple[int, ...]) -> list[tuple[int | None, list[int]]]:
    """Which rows to measure: [(expert or None, row indices)] for a (rows, cols) or (E, rows, cols) tensor."""
    if len(shape) == 3:
        rows = spaced(shape[1], ROWS_PER_EXPERT)
        return [(e, rows) for e in spaced(shape[0], EXPERTS_PER_STACK)]
    return [(None, spaced(shape[0], ROWS_PER_TENSOR))]


def can_raise(entry: PlanEntry) -> bool:
    """A raisable type the user did not pin with an option."""
    return entry.qtype in RAISABLE and entry.origin is not Origin.OPTION


def upgrade_types(entry: PlanEntry) -> list[str]:
    """The types an entry may be raised to: LADDER types above it, after the row-length fallback."""
    current = nbytes(T[entry.qtype], entry.shape)
    found: list[str] = []
    for name in LADDER:
        fitted, _ = fit_row_length(T[name], entry.shape[-1])
        if fitted.name in RAISABLE and nbytes(fitted, entry.shape) > current and fitted.name not in found:
            found.append(fitted.name)
    return found


def relative_rmse(rows: np.ndarray, qtype: str) -> float:
    """‖rows − deq(q(rows))‖ / ‖rows‖ for float32 (k, n_per_row) rows."""
    restored = dequantize(quantize(rows, qtype), qtype, rows.shape)
    diff = (restored.astype(np.float64) - rows.astype(np.float64))
    norm = float(np.sum(rows.astype(np.float64) ** 2))
    return float(np.sqrt(np.sum(diff * diff) / norm)) if norm > 0 else 0.0


def measure_errors(
    samples: Iterable[tuple[str, np.ndarray]], types: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, float]]:
    """Relative RMSE of each sampled tensor at each of its types: {name: {qtype: rel_rmse}}."""
    return {name: {t: relative_rmse(rows, t) for t in types[name]} for name, rows in samples}


def raise_to_budget(
    entries: Sequence[PlanEntry], errors: Mapping[str, Mapping[str, float]], budget: int, label: str,
    alignment: int = 1,
) -> list[PlanEntry]:
    """Greedy upgrades (see the module docstring) while Σ pad(nbytes, alignment) stays ≤ budget."""

    def cost(nbytes: int) -> int:
        return (nbytes + alignment - 1) // alignment * alignment

    plan = list(entries)
    used = sum(cost(e.nbytes) for e in plan)
    if used > budget:
        raise PlanError(f"--{label}: the mix alone needs {used:,} bytes of tensor data, {used - budget:,} over the "
                        "budget; choose a smaller --type")
    index = {e.name: i for i, e in enumerate(plan) if e.name in errors and can_raise(e)}
    original = {name: plan[i].qtype for name, i in index.items()}
    while True:
        best: tuple[float, str, str, int] | None = None
        for name, i in index.items():
            entry = plan[i]
            now = errors[name].get(entry.qtype)
            if now is None:
                continue
            for qtype in upgrade_types(entry):
                if qtype not in errors[name]:
                    continue
                added = cost(nbytes(T[qtype], entry.shape)) - cost(entry.nbytes)
                gain = now ** 2 - errors[name][qtype] ** 2
                if gain <= 0 or used + added > budget:
                    continue
                ratio = gain / added
                if best is None or ratio > best[0]:
                    best = (ratio, name, qtype, added)
        if best is None:
            break
        _, name, qtype, added = best
        i = index[name]
        was = original[name]
        plan[i] = replace(
            plan[i], qtype=qtype, nbytes=nbytes(T[qtype], plan[i].shape), origin=Origin.BUDGET,
            rule=f"{label}: raised from {was} (rel. RMSE {errors[name][was]:.4f} → {errors[name][qtype]:.4f})",
        )
        used += added
    log.info("%s: %d tensors raised, %s bytes of tensor data", label, sum(plan[i].qtype != original[n] for n, i in index.items()), f"{used:,}")
    return plan
