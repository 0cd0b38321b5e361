"""The quantization-error report: `NAME.report.json` / `NAME.report.csv` beside the GGUF.

The JSON holds one record per measured tensor (every tensor not stored as F32), with one record per
expert for the 3-D expert tensors; `rioquant.quant.metrics` defines the figures and flags. The CSV is
the same data flattened, one row per tensor and one per expert slice (`expert` empty for a tensor).
Its text summary is `rioquant.render.error_report`, its figures `rioquant.quant.figures`.
"""

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from rioquant.errors import ReportError
from rioquant.files.disk import write_atomic
from rioquant.files.gguf_set import set_stem
from rioquant.quant.metrics import OUTLIER_FACTOR

REPORT_FORMAT = "rioquant-report/1"
CSV_COLUMNS = ("tensor", "layer", "kind", "expert", "qtype", "bpw", "n_weights", "rel_rmse", "imatrix_se",
               "imatrix_rel_rmse", "max_abs_err", "cosine", "flags")


def report_paths(out: Path) -> tuple[Path, Path]:
    """`dir/NAME.gguf` (or a shard `dir/NAME-00001-of-00003.gguf`) → its report's JSON and CSV paths."""
    stem = set_stem(out)
    return out.parent / f"{stem}.report.json", out.parent / f"{stem}.report.csv"


def build_report(
    records: Sequence[dict],
    gguf_files: Sequence[Path],
    source: Path,
    qtype: str,
    imatrix: dict | None,
    not_measured: Sequence[str] = (),
) -> dict:
    """The report document; `imatrix` is {file, dataset, entries_count, chunks_count} or None."""
    experts = [x for r in records for x in r.get("experts", ())]
    flag_counts = {f: sum(f in x["flags"] for x in experts) for f in ("dead", "outlier", "no_imatrix_data")}
    return {
        "format": REPORT_FORMAT,
        "gguf": [p.name for p in gguf_files],
        "source": str(source),
        "type": qtype,
        "imatrix": imatrix,
        "outlier_factor": OUTLIER_FACTOR,
        "summary": {"tensors": len(records), "expert_slices": len(experts), **{f"{k}_experts": v for k, v in flag_counts.items()}},
        "not_measured": list(not_measured),
        "tensors": list(records),
    }


def csv_text(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def cell(v):
        return "" if v is None else v

    for t in report["tensors"]:
        rows = [(t, None)] + [(x, x["expert"]) for x in t.get("experts", ())]
        for rec, expert in rows:
            writer.writerow([
                t["name"], cell(t["layer"]), t["kind"], cell(expert), t["qtype"], t["bpw"], rec["n_weights"],
                *(cell(rec[k]) for k in ("rel_rmse", "imatrix_se", "imatrix_rel_rmse", "max_abs_err", "cosine")),
                ";".join(rec["flags"]),
            ])
    return buf.getvalue()


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write NAME.report.json and NAME.report.csv beside `out`, each under a temporary name first."""
    json_path, csv_path = report_paths(out)
    write_atomic(json_path, json.dumps(report, indent=1) + "\n")
    write_atomic(csv_path, csv_text(report))
    return json_path, csv_path


def load_report(path: Path) -> tuple[dict, Path]:
    """Read a report from its JSON, or from the GGUF (or any shard of it) it was written beside."""
    path = Path(path)
    json_path = path if path.name.endswith(".report.json") else report_paths(path)[0]
    try:
        report = json.loads(json_path.read_text())
    except FileNotFoundError:
        hint = "" if json_path == path else f" (looked for it beside {path.name}; convert without --no-report writes it)"
        raise ReportError(f"{json_path}: no report found{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{json_path}: not a rioquant report ({err})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ReportError(f"{json_path}: not a rioquant report (format {report.get('format') if isinstance(report, dict) else None!r})")
    return report, json_path


def primary_metric(report: dict) -> tuple[str, str]:
    """The figure to rank by: the imatrix-weighted relative error when an imatrix was used."""
    if report.get("imatrix"):
        return "imatrix_rel_rmse", "imatrix-weighted relative RMSE"
    return "rel_rmse", "relative RMSE"
