"""The error report's figures (`rioquant report`): a layer × expert heatmap per expert tensor kind, and
the error and chosen type of every tensor kind per layer. matplotlib is imported when drawing.
"""

from pathlib import Path

import numpy as np

from rioquant.quant.report import primary_metric


def _layer_label(layer: int | None, n_main: int, name: str) -> str:
    if layer is None:
        return name.removesuffix(".weight")
    return f"MTP {layer}" if layer >= n_main else str(layer)


def draw_figures(report: dict, out_dir: Path, stem: str) -> list[Path]:
    """PNG files: one layer × expert heatmap per expert tensor kind, and error / bits per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = primary_metric(report)
    tensors = report["tensors"]
    if not tensors:
        return []  # an all-F32 conversion: nothing was rounded
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    n_main = _main_layers(tensors)
    for kind in sorted({t["kind"] for t in tensors if t.get("experts")}):
        files.append(_heatmap(plt, [t for t in tensors if t["kind"] == kind], kind, key, label, n_main,
                              out_dir / f"{stem}.{kind}.png", report))
    files.append(_per_layer(plt, tensors, key, label, n_main, out_dir / f"{stem}.layers.png", report))
    return files


def _main_layers(tensors: list[dict]) -> int:
    """Decoder blocks before the MTP layer: MTP blocks carry `nextn` tensors."""
    mtp = {t["layer"] for t in tensors if t["layer"] is not None and "nextn" in t["name"]}
    layers = {t["layer"] for t in tensors if t["layer"] is not None}
    return min(mtp) if mtp else (max(layers) + 1 if layers else 0)


def _heatmap(plt, tensors: list[dict], kind: str, key: str, label: str, n_main: int, path: Path, report: dict) -> Path:
    """Layer × expert: colour = the expert's error over its tensor's median (types differ by layer, so
    absolute errors would only show the type mix; the per-layer figure shows those)."""
    from matplotlib.colors import LogNorm

    tensors = sorted(tensors, key=lambda t: t["layer"])
    n_experts = max(len(t["experts"]) for t in tensors)
    ratios = np.full((len(tensors), n_experts), np.nan)  # (layers, experts)
    unweighted = []  # rows without imatrix figures (the MTP layer, say): shown by rel_rmse instead
    for i, t in enumerate(tensors):
        row_key = key if any(x.get(key) is not None for x in t["experts"]) else "rel_rmse"
        if row_key != key:
            unweighted.append(i)
        live = [x[row_key] for x in t["experts"] if x.get(row_key) is not None and "dead" not in x["flags"]]
        median = float(np.median(live)) if live else 0.0
        for x in t["experts"]:
            v = x.get(row_key)
            if v is not None and median > 0:
                ratios[i, x["expert"]] = v / median
    factor = report["outlier_factor"]
    logs = np.abs(np.log(ratios[np.isfinite(ratios) & (ratios > 0)]))
    span = float(np.exp(np.clip(np.percentile(logs, 99) if logs.size else 0.0, np.log(1.1), np.log(factor))))
    width = min(22.0, max(8.0, 5.0 + (0.3 * n_experts if n_experts <= 32 else 0.028 * n_experts)))
    height = min(24.0, 2.6 + 0.26 * len(tensors))
    fig, ax = plt.subplots(figsize=(width, height), dpi=110, layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#bdbdbd", under="#08306b", over="#67000d")
    shown = np.where(ratios == 0, 1e-30, ratios)  # dead experts (0) take the "under" colour; NaN stays grey
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap=cmap,
                      norm=LogNorm(vmin=1 / span, vmax=span))
    bar = fig.colorbar(image, ax=ax, extend="both", pad=0.01)
    bar.ax.minorticks_off()
    ticks: list[float] = []
    for t in sorted((0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0), key=lambda t: abs(np.log(t))):
        if 1 / span <= t <= span and all(abs(np.log(t / u)) >= np.log(span) / 5 for u in ticks):
            ticks.append(t)  # from 1× outwards, no two closer than a tenth of the bar
    ticks.sort()
    bar.set_ticks(ticks, labels=[f"{t:g}×" for t in ticks])
    bar.set_label("÷ the layer's median")
    marks = {"dead": ("x", "dead (all zero)"), "outlier": ("o", f"outlier (> {factor:g}× median)")}
    handles = []
    for flag, (marker, text) in marks.items():
        pts = [(x["expert"], i) for i, t in enumerate(tensors) for x in t["experts"] if flag in x["flags"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            paint = {"facecolors": "none", "edgecolors": "black"} if marker == "o" else {"color": "black"}
            handles.append(ax.scatter(xs, ys, marker=marker, s=70 if n_experts <= 64 else 22, linewidths=1.4,
                                      label=f"{text}: {len(pts)}", **paint))
    if np.isnan(ratios).any():
        from matplotlib.patches import Patch

        handles.append(Patch(color="#bdbdbd", label="no figure (expert the imatrix never saw)"))
    if unweighted and key != "rel_rmse":
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], linestyle="none", marker="$*$", color="black",
                              label="* layer without imatrix data: relative RMSE"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_yticks(range(len(tensors)), [f"{'* ' if i in unweighted and key != 'rel_rmse' else ''}"
                                        f"{_layer_label(t['layer'], n_main, t['name'])}  {t['qtype']}"
                                        for i, t in enumerate(tensors)], fontsize=8 if len(tensors) <= 40 else 6)
    step = max(1, n_experts // 32)
    ax.set_xticks(range(0, n_experts, step))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer and type")
    ax.set_title(f"{kind}: each expert's {label}\nrelative to the median of its layer", fontsize=11)
    fig.savefig(path)
    plt.close(fig)
    return path


def _per_layer(plt, tensors: list[dict], key: str, label: str, n_main: int, path: Path, report: dict) -> Path:
    """Tensor kind × layer: colour = error (log scale), text = the type chosen for that tensor. One panel
    for the relative RMSE (every tensor has it) and, with an imatrix, one for the weighted error."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter

    layers = sorted({t["layer"] for t in tensors if t["layer"] is not None})
    has_top = any(t["layer"] is None for t in tensors)
    columns = ([None] if has_top else []) + layers  # None: the top-level tensors (token_embd, output)
    col_of = {layer: i for i, layer in enumerate(columns)}
    kinds = list(dict.fromkeys(t["kind"] for t in tensors))  # plan order: llama.cpp's tensor order
    row_of = {k: i for i, k in enumerate(kinds)}
    types = np.full((len(kinds), len(columns)), "", dtype=object)
    for t in tensors:
        types[row_of[t["kind"]], col_of[t["layer"]]] = t["qtype"]
    panels = [("rel_rmse", "relative RMSE")] + ([(key, label)] if key != "rel_rmse" else [])
    wide = len(columns) <= 24
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, dpi=110, layout="constrained", sharex=True,
                             figsize=(min(24.0, max(8.0, 4.0 + (0.62 if wide else 0.3) * len(columns))),
                                      len(panels) * (0.9 + 0.36 * len(kinds)) + 0.8))
    formatter = FuncFormatter(lambda v, _: f"{v:.3g}")
    for ax, (metric, metric_label) in zip(axes[:, 0], panels, strict=True):
        values = np.full((len(kinds), len(columns)), np.nan)  # (kinds, layers)
        for t in tensors:
            v = t.get(metric)
            values[row_of[t["kind"]], col_of[t["layer"]]] = np.nan if v is None or v <= 0 else v
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (1e-3, 1.0)
        hi = max(hi, lo * 1.01)
        cmap = plt.get_cmap("magma_r").with_extremes(bad="white")  # white: no such tensor
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=cmap,
                          norm=LogNorm(vmin=lo, vmax=hi))
        no_figure = np.where((types != "") & ~np.isfinite(values), 1.0, np.nan)  # grey: a tensor without the figure
        ax.imshow(np.ma.masked_invalid(no_figure), aspect="auto", interpolation="nearest",
                  cmap=plt.get_cmap("Greys"), vmin=0, vmax=4)
        bar = fig.colorbar(image, ax=ax, pad=0.01)
        bar.ax.yaxis.set_major_formatter(formatter)
        bar.ax.yaxis.set_minor_formatter(formatter)
        bar.ax.tick_params(which="both", labelsize=7)
        bar.set_label(f"{metric_label} (log)", fontsize=8)
        for r in range(len(kinds)):
            for c in range(len(columns)):
                if types[r, c]:
                    dark = np.isfinite(values[r, c]) and image.norm(values[r, c]) > 0.55
                    ax.text(c, r, types[r, c], ha="center", va="center", fontsize=7 if wide else 4.8,
                            color="white" if dark else "black")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
        ax.set_title(metric_label + (" (grey: a tensor the imatrix has no data for)" if metric != "rel_rmse" else ""),
                     fontsize=10)
    ax = axes[-1, 0]
    ax.set_xticks(range(len(columns)), ["top" if layer is None else _layer_label(layer, n_main, "") for layer in columns],
                  fontsize=8, rotation=0 if wide else 90)
    ax.set_xlabel("layer (top: token_embd / output)" if has_top else "layer")
    bits = ", ".join(f"{q} {b:g}" for q, b in sorted({(t["qtype"], t["bpw"]) for t in tensors}, key=lambda qb: qb[1]))
    fig.suptitle(f"Error per tensor and layer, with the type chosen\n(bits per weight: {bits})", fontsize=11)
    fig.savefig(path)
    plt.close(fig)
    return path
