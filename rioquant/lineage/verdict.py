"""From sums to verdicts: each unit's figures, its verdict, and the tensor- and model-level aggregates.

The verdict rests on the residual, never on the coefficient. When both parents are fine-tunes of one
base, ANY other fine-tune of that base regresses onto them at about 0.5/0.5 — the parents share the
base — but its residual stays as large as the task vectors (about 0.7–0.9 of the child's), far above
the rounding floor. So:

    no evidence        the parents are equal (or collinear) in this tensor: nothing to fit
    exact blend        some candidate recipe reproduces ≥ EXACT_RATE of the elements bit for bit
    no blend           residual > MAX_RESIDUAL of the child's task vector, or weights summing far
                       from 1, or the fit no better than block-shifted parents (z < MIN_Z)
    exact blend        the residual is within FLOOR_RATIO of the expected rounding error of the blend
    blend plus update  otherwise: the blend explains the task vector, plus an update whose relative
                       size (residual / task vector) is reported
"""

import math
import re
from collections import Counter

import numpy as np

from rioquant.lineage.stats import Fit, Moments, bootstrap_interval, explained, fit, task_share

EXACT_RATE = 0.99
FLOOR_RATIO = 1.5  # RMS residual over RMS rounding floor; a bfloat16-arithmetic merge sits near 1.2
MAX_RESIDUAL = 0.5  # the blend must explain ≥ 75 % of the child's task vector (squared)
MAX_SUM_ERROR = 0.05  # |Σ weights − 1|: a blend's weights add up to one
MIN_Z = 5.0
MIN_NULL_ELEMENTS = 1024  # below this the null has too few blocks to say anything: it is not asked
MIN_FIT_ELEMENTS = 256  # below this only a bit-exact reproduction is evidence (a dt bias has 64 values)
FITTED = "(fitted)"  # label mark of the candidate with the fitted weights: reported, never decisive
STORAGE_WRAP = re.compile(r"^(bf16|f32)\(")  # how a recipe label names the child's dtype
EXACT, UPDATE, NO_BLEND, NO_EVIDENCE = "exact blend", "blend plus update", "no blend", "no evidence"
VERDICTS = (EXACT, UPDATE, NO_BLEND)


def _num(x: float) -> float | None:
    """JSON-safe float."""
    return None if x is None or not math.isfinite(x) else float(x)


def best_exact(exact: dict[str, list[int]], n: int) -> tuple[str | None, float | None, list[str]]:
    """(best recipe, its rate, every recipe reproducing all n elements) among the simple recipes tested on
    every element. The fitted weights are left out: with two free weights they can match a handful of
    elements by construction."""
    full = {label: m / s for label, (m, s) in exact.items() if s == n and n > 0 and FITTED not in label}
    if not full:
        return None, None, []
    label = max(full, key=full.get)
    return label, full[label], sorted(lab for lab in full if exact[lab][0] == n)


def judge(moments: Moments, exact: dict[str, list[int]], letters: list[str], seed: int) -> dict:
    """Every figure of one unit (or aggregate) and its verdict, as a JSON-ready dict."""
    gram_blocks, cross_blocks, yy_blocks = moments.blocks()
    gram, cross, yy = gram_blocks.sum(0), cross_blocks.sum(0), float(yy_blocks.sum())
    result: Fit = fit(gram, cross, yy)
    record: dict = {"elements": moments.n}
    if not result.evidence:
        return record | {"verdict": NO_EVIDENCE, "reason": "parents equal"}
    low, high = bootstrap_interval(gram_blocks, cross_blocks, seed)
    floor = moments.floor_child + float(np.sum(result.weights**2 * moments.floor_parents))
    share = explained(result.beta, cross, yy)
    task, null = task_share(gram, np.vstack([cross[None, :-1], moments.null_cross]), yy)
    spread = max(float(null.std(ddof=1)), 1e-12)
    z = (task - float(null.mean())) / spread if np.any(moments.null_cross) else math.nan  # nan: too few blocks
    residual = math.sqrt(result.rss / yy) if yy > 0 else 0.0
    floor_ratio = math.sqrt(result.rss / floor) if floor > 0 else (0.0 if result.rss == 0 else math.inf)
    label, rate, reproduced = best_exact(exact, moments.n)
    cosines = [cross[i] / math.sqrt(gram[i, i] * yy) if yy > 0 else 1.0 for i in range(len(letters) - 1)]
    verdict = classify(result, residual, floor_ratio, z, rate, moments.n)
    if verdict != EXACT and moments.n < MIN_FIT_ELEMENTS:
        verdict = NO_EVIDENCE
    return record | {
        "verdict": verdict,
        "weights": dict(zip(letters, map(_num, result.weights), strict=True)),
        "interval": {letter: [_num(lo), _num(hi)] for letter, lo, hi in zip(letters, low, high, strict=True)},
        "weight_sum": _num(float(result.weights.sum())),
        "cosine": dict(zip(letters[:-1], map(_num, cosines), strict=True)),
        "residual": _num(residual),  # ‖W − blend‖ / ‖W − R‖
        "floor_ratio": _num(floor_ratio),  # RMS residual / RMS expected rounding error of the blend
        "explained": _num(share),
        "null": {"task_share": _num(task), "mean": _num(float(null.mean())), "sd": _num(spread), "z": _num(z)},
        "exact": {lab: _num(m / s) for lab, (m, s) in exact.items() if s},
        "exact_tested": {lab: s for lab, (m, s) in exact.items()},
        "best_recipe": label,
        "best_rate": _num(rate) if rate is not None else None,
        "reproduced_by": reproduced,
        "update": _num(residual) if verdict == UPDATE else None,
    } | ({"reason": "too few elements"} if verdict == NO_EVIDENCE else {})


def classify(result: Fit, residual: float, floor_ratio: float, z: float, exact_rate: float | None,
             elements: int) -> str:
    """The verdict of one unit (module docstring). Bit-exact reproduction decides alone: no fine-tune
    reproduces a blend's bits by chance, however few the elements."""
    if result.yy == 0 or (exact_rate is not None and exact_rate >= EXACT_RATE):
        return EXACT  # (yy = 0: W = R exactly, a copy of the reference parent)
    null_fails = elements >= MIN_NULL_ELEMENTS and not z >= MIN_Z  # (a missing null, nan, fails too)
    if residual > MAX_RESIDUAL or abs(float(result.weights.sum()) - 1.0) > MAX_SUM_ERROR or null_fails:
        return NO_BLEND
    return EXACT if floor_ratio <= FLOOR_RATIO else UPDATE


def merge_exact(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for part in parts:
        for label, (m, s) in part.items():
            total = out.setdefault(label, [0, 0])
            total[0] += m
            total[1] += s
    return out


def overall(tensors: list[dict], moments: dict[str, Moments], letters: list[str]) -> dict:
    """The model's verdict, coefficients, recipe and null, from the tensors' records and sums."""
    evidence = [t for t in tensors if t["verdict"] != NO_EVIDENCE]
    elements = {v: sum(t["elements"] for t in evidence if t["verdict"] == v) for v in VERDICTS}
    blend = elements[EXACT] + elements[UPDATE]
    if not evidence or blend < elements[NO_BLEND]:
        verdict = NO_BLEND
    elif elements[UPDATE] <= 0.01 * blend:
        verdict = EXACT
    else:
        verdict = UPDATE
    chosen = [t for t in evidence if t["verdict"] != NO_BLEND] or evidence
    summary: dict = {"verdict": verdict, "tensor_counts": {v: sum(t["verdict"] == v for t in tensors)
                                                          for v in (*VERDICTS, NO_EVIDENCE)}}
    if chosen:
        fitted = judge(Moments.join([moments[t["name"]] for t in chosen]), {}, letters, seed=0)
        summary["fit"] = {k: fitted.get(k) for k in ("weights", "interval", "weight_sum", "residual", "explained")}
        everything = judge(Moments.join([moments[t["name"]] for t in evidence]), {}, letters, seed=1)
        summary["null"] = everything.get("null", {})
    recipes: dict[str, int] = {}  # the recipe, whatever dtype a tensor is stored in → tensors it reproduces
    shown: dict[str, Counter] = {}  # … and its labels as the tensors spell them (bf16(…), f32(…))
    for t in evidence:
        labels = {STORAGE_WRAP.sub("(", label, count=1): label for label in t.get("reproduced_by", [])}
        for key, label in labels.items():
            recipes[key] = recipes.get(key, 0) + 1
            shown.setdefault(key, Counter())[label] += 1
    main = max(recipes, key=lambda key: (recipes[key], "in float32" in key), default=None)
    summary["recipe"] = {"label": shown[main].most_common(1)[0][0] if main else None,
                         "exact_tensors": recipes.get(main, 0), "evidence_tensors": len(evidence),
                         "others": {shown[key].most_common(1)[0][0]: n
                                    for key, n in sorted(recipes.items(), key=lambda kv: -kv[1])}}
    summary["update"] = _num(math.sqrt(sum((t.get("update") or 0.0) ** 2 * t["elements"] for t in evidence)
                                       / max(elements[UPDATE], 1))) if elements[UPDATE] else None
    return summary
