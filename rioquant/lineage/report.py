"""The lineage report for people: the summary that names the recipe, the outliers, the null, and PNGs of
the first parent's weight and the residual per layer × tensor kind. The JSON is `pipeline.analyse`'s
dict as it is; docs/lineage.md explains every field.
"""

import json
import math
import os
from pathlib import Path

import numpy as np

from rioquant.errors import LineageError
from rioquant.lineage.verdict import EXACT, NO_EVIDENCE, UPDATE, VERDICTS


def write_json(report: dict, path: Path) -> None:
    """Write to a temporary name, then rename: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LineageError(f"{path}: not a readable lineage report ({err.__class__.__name__})") from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("rioquant-lineage/"):
        raise LineageError(f"{path}: not a lineage report (write one with `rioquant lineage … -o {path}`)")
    return data


def _weights(weights: dict | None, intervals: dict | None) -> str:
    if not weights:
        return "—"
    parts = []
    for letter, w in weights.items():
        low, high = (intervals or {}).get(letter) or (None, None)
        ci = f" [{low:.5f}, {high:.5f}]" if low is not None and high is not None else ""
        parts.append(f"{letter} {w:.5f}{ci}" if w is not None else f"{letter} —")
    return "  ".join(parts)


def _tensor_line(t: dict, expert: int | None = None) -> str:
    name = t["name"] + (f" expert {expert}" if expert is not None else "")
    if t["verdict"] == NO_EVIDENCE:
        return f"  {name}: no evidence ({t.get('reason')})"
    weights = " ".join(f"{k} {v:.4f}" for k, v in (t.get("weights") or {}).items() if v is not None)
    rate = f", best recipe {t['best_recipe']} {100 * t['best_rate']:.2f} %" if t.get("best_recipe") else ""
    return (f"  {name}: {t['verdict']} (residual {t['residual']:.4f} of the task vector, "
            f"{t['floor_ratio']:.2f}× the rounding floor; {weights}{rate})")


def outliers(report: dict) -> list[tuple[dict, int | None]]:
    """Tensors whose verdict or exact recipe differs from the model's, then expert slabs whose verdict
    differs from their tensor's: (record, expert or None), largest residual first."""
    main = (report.get("recipe") or {}).get("label")
    found = []
    for t in report["tensors"]:
        if t["verdict"] == NO_EVIDENCE:
            continue
        differs = t["verdict"] != report["verdict"] or (main and t["verdict"] == EXACT and main not in t.get("reproduced_by", []))
        if differs:
            found.append((t, None))
        for x in t.get("experts", []):
            if x["verdict"] not in (t["verdict"], NO_EVIDENCE):
                found.append(({"name": t["name"], **x}, x["expert"]))
    return sorted(found, key=lambda pair: -(pair[0].get("residual") or 0.0))


def render_text(report: dict, top: int = 10) -> str:
    """The summary a reader needs to settle a dispute: recipe, weights with intervals, null, outliers."""
    parents = report["parents"]
    lines = [f"lineage of {report['child']}",
             "  " + "   ".join(f"{p['letter']} = {p['given']}" for p in parents),
             f"verdict: {report['verdict']}"]
    recipe = report.get("recipe") or {}
    counts = report.get("tensor_counts", {})
    if recipe.get("label"):
        lines.append(f"recipe: W = {recipe['label']} exactly in {recipe['exact_tensors']:,} of "
                     f"{recipe['evidence_tensors']:,} tensors")
        for label, n in list(recipe.get("others", {}).items())[1:4]:
            lines.append(f"        W = {label} exactly in {n:,}")
    fitted = report.get("fit") or {}
    lines.append(f"weights: {_weights(fitted.get('weights'), fitted.get('interval'))}"
                 + (f"  (sum {fitted['weight_sum']:.5f})" if fitted.get("weight_sum") is not None else ""))
    if report["verdict"] == UPDATE and report.get("update") is not None:
        lines.append(f"update: {100 * report['update']:.1f} % of the child's task vector (RMS over the updated tensors)")
    null = report.get("null") or {}
    if null.get("z") is not None:
        lines.append(f"null: the parents' task vectors explain {null['task_share']:.4f} of the child's; "
                     f"block-shifted, {null['mean']:.4f} ± {null['sd']:.2g} (z = {null['z']:,.0f})")
    lines.append("tensors: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in (*VERDICTS, NO_EVIDENCE)))
    for reason in ("parents equal", "too few elements"):
        names = [t["name"] for t in report["tensors"] if t.get("reason") == reason]
        if names:
            shown = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
            lines.append(f"no evidence ({reason}; left out of the verdict): {shown}")
    odd = outliers(report)
    if odd:
        lines.append(f"outliers ({len(odd)}, largest residual first):")
        lines += [_tensor_line(t, expert) for t, expert in odd[:top]]
    gb = report["bytes_read"] / 1e9
    lines.append(f"read {gb:.2f} GB in {report['seconds']:.1f} s ({gb / max(report['seconds'], 1e-9):.2f} GB/s)")
    return "\n".join(lines) + "\n"


def _grid(report: dict, value) -> tuple[np.ndarray, list[str], list[int]]:
    """(kinds × layers) array of value(tensor record), NaN where there is none."""
    layered = [t for t in report["tensors"] if t.get("layer") is not None]
    kinds = sorted({t["kind"] for t in layered})
    layers = sorted({t["layer"] for t in layered})
    grid = np.full((len(kinds), len(layers)), np.nan)
    for t in layered:
        v = value(t)
        if v is not None and math.isfinite(v):
            grid[kinds.index(t["kind"]), layers.index(t["layer"])] = v
    return grid, kinds, layers


def draw_figures(report: dict, out_dir: Path, stem: str) -> list[Path]:
    """`STEM.weights.png` (the first parent's weight) and `STEM.residual.png` (log10 residual over the
    child's task vector), per layer × tensor kind; blank cells carry no evidence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = report["parents"][0]["letter"]
    panels = [
        ("weights", f"weight of {first} = {report['parents'][0]['given']}",
         lambda t: (t.get("weights") or {}).get(first), "viridis"),
        ("residual", "log10 residual / child's task vector",
         lambda t: math.log10(max(t["residual"], 1e-12)) if t.get("residual") is not None else None, "magma"),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, title, value, cmap in panels:
        grid, kinds, layers = _grid(report, value)
        if not kinds:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 3), max(3.0, 0.3 * len(kinds) + 1.5)))
        image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"{title} — {report['verdict']}", fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"{stem}.{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def card_lineage(report: dict, path: Path) -> tuple[list[str], list[str]]:
    """What `publish --lineage REPORT.json` puts on the card: the parents' Hub ids for `base_model` (with
    `base_model_relation: merge`; none when the verdict is no blend) and a Markdown section."""
    parents = report["parents"]
    named = {p["letter"]: f"[{p['repo']}](https://huggingface.co/{p['repo']})" if p.get("repo") else f"`{p['given']}`"
             for p in parents}
    legend = ", ".join(f"{letter} = {link}" for letter, link in named.items())
    recipe = report.get("recipe") or {}
    fitted = report.get("fit") or {}
    lines = ["## Lineage", "", f"Measured on the weights with `rioquant lineage` ({legend}): "
             f"**{report['verdict']}**."]
    if report["verdict"] == NO_EVIDENCE or report["verdict"] not in (EXACT, UPDATE):
        return [], lines + [""]
    missing = [p["given"] for p in parents if not p.get("repo")]
    if missing:
        raise LineageError(f"{path}: parent {missing[0]} has no Hub id for base_model; "
                           "re-run `rioquant lineage` with --parent-repo ORG/NAME for each parent")
    if recipe.get("label"):
        lines.append(f"W = {recipe['label']} exactly in {recipe['exact_tensors']:,} of "
                     f"{recipe['evidence_tensors']:,} tensors.")
    lines.append(f"Fitted weights (95 % block-bootstrap interval): {_weights(fitted.get('weights'), fitted.get('interval'))}.")
    if report["verdict"] == UPDATE and report.get("update") is not None:
        lines.append(f"Beyond the blend, an update of {100 * report['update']:.1f} % of the task vector.")
    return [p["repo"] for p in parents], lines + [""]

