"""Text rendering of every command's result, one function per command, nothing else.

Each takes the data the packages return (dicts, as printed by `--json`) and returns the text the CLI
prints; none computes anything. Figures are drawn by rioquant.quant.figures.
"""

import math

from rioquant.quant.report import primary_metric


def plan_table(summary: dict) -> str:
    """`rioquant plan`: one line per tensor (type, bytes, rule), then totals by type and the file size."""
    width = max(len(t["name"]) for t in summary["tensors"])
    lines = [f"{'tensor':<{width}}  {'type':<7} {'bytes':>15}  rule"]
    lines += [f"{t['name']:<{width}}  {t['type']:<7} {t['bytes']:>15,}  {t['rule']}" for t in summary["tensors"]]
    lines.append("")
    for qtype, row in sorted(summary["types"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"{qtype:<7} {row['tensors']:>5} tensors {row['bytes']:>19,} bytes")
    p = summary["parameters"]
    lines += [
        "",
        f"recipe     {summary['recipe']} ({summary['recipe_source']}), general.file_type {summary['file_type']}",
        f"parameters {p['total']:,} (text {p['text']:,} + MTP {p['mtp']:,}; experts {p['experts']:,})",
        f"tensors    {summary['tensor_bytes']:,} bytes, {summary['bpw']:.3f} bits per weight",
        f"file size  {summary['file_bytes']:,} bytes ({summary['file_bytes'] / 1e9:.2f} GB)"
        + (f" in {len(summary['shard_bytes'])} shards: " + ", ".join(f"{s:,}" for s in summary["shard_bytes"])
           if len(summary["shard_bytes"]) > 1 else ""),
    ]
    if "mmproj" in summary:
        m = summary["mmproj"]
        types = ", ".join(f"{n} {t}" for t, n in m["types"].items())
        lines.append(f"mmproj     {m['file']}: {m['file_bytes']:,} bytes ({m['file_bytes'] / 1e9:.2f} GB), "
                     f"{m['parameters']:,} parameters, {len(m['tensors'])} tensors ({types})")
    if "memory" in summary:
        lines += ["", *memory_breakdown(summary["memory"])]
    return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


def _settings(s: dict) -> str:
    return (f"-c {s['ctx']}, {s['cache_type']} KV cache, {s['parallel']} sequence{'s' if s['parallel'] > 1 else ''}"
            + (", unified KV" if s["kv_unified"] else ""))


def memory_breakdown(m: dict) -> list[str]:
    """The memory llama.cpp needs for one mix (rioquant.quant.memory), one line per buffer."""
    rows = [
        ("weights", m["weights"], "tensors llama.cpp loads (the MTP block stays on disk)"),
        ("KV cache", m["kv_cache"], f"full-attention blocks, {m['kv_cells']:,} cells per sequence"),
        ("recurrent state", m["recurrent"], "Gated DeltaNet conv + delta state, F32"),
        ("compute buffer", m["compute"], "estimate: the LM head's peak for one batch"),
        ("output buffer", m["output"], "logits of one token per sequence"),
        ("total", m["total"], ""),
    ]
    lines = [f"memory llama.cpp needs at {_settings(m['settings'])}:"]
    lines += [f"  {label:<16} {n:>19,} bytes {_gb(n):>13}  {note}".rstrip() for label, n, note in rows]
    return lines


def fit_table(result: dict) -> str:
    """`rioquant fit`: the mixes that fit, best first, with headroom and the largest context; then the rest."""
    header = f"  {'mix':<10} {'file':>11} {'needs':>11} {'headroom':>11} {'max -c':>8}"

    def row(e: dict) -> str:
        return (f"  {e['mix']:<10} {_gb(e['file_bytes']):>11} {_gb(e['memory_bytes']):>11} "
                f"{_gb(e['headroom_bytes']):>11} {e['max_ctx']:>8}")

    lines = [f"{result['source']} in {_gb(result['memory'])} ({result['memory']:,} bytes) at {_settings(result['settings'])}"]
    if result["fits"]:
        best = result["fits"][0]
        lines += [f"best: {best['mix']}, {_gb(best['file_bytes'])} file, {_gb(best['memory_bytes'])} in use, "
                  f"context up to {best['max_ctx']:,}", "", "fits, best first:", header]
        lines += [row(e) for e in result["fits"]]
    else:
        lines.append("no mix fits at this context")
    if result["too_big"]:
        lines += ["", "too big, smallest first:", header] + [row(e) for e in result["too_big"]]
    if result.get("source_file"):
        lines += ["", "the GGUF itself:", header, row(result["source_file"])]
    lines += ["", "max -c: the largest context that fits (0: none); GB = 10^9 bytes; "
                  "`rioquant plan SRC --type MIX --ctx N` breaks one mix down."]
    return "\n".join(lines)


def _size_table(title: str, rows: dict[str, dict[str, int]], total: int) -> list[str]:
    lines = [f"{title:<28} {'tensors':>8} {'MB':>12} {'share':>7} {'bpw':>6}"]
    for key, v in rows.items():
        bpw = 8 * v["bytes"] / max(v["params"], 1)
        lines.append(f"{key:<28} {v['tensors']:>8} {v['bytes'] / 1e6:>12.2f} {100 * v['bytes'] / max(total, 1):>6.1f}% {bpw:>6.2f}")
    return lines


def gguf_summary(report: dict) -> str:
    """`rioquant inspect`: the metadata, then the size by type and by tensor kind."""
    lines = [f"{report['file']}: {report['tensors']} tensors, {report['bytes'] / 1e9:.3f} GB, "
             f"{report['params'] / 1e9:.3f} B params, {report['bits_per_weight']:.2f} bits/weight", ""]
    for key, value in report["metadata"].items():
        lines.append(f"  {key} = {value}")
    lines.append("")
    lines += _size_table("type", report["by_type"], report["bytes"])
    lines.append("")
    lines += _size_table("tensor kind", report["by_kind"], report["bytes"])
    return "\n".join(lines)


def perplexity(result: dict) -> str:
    """`rioquant ppl`: llama-perplexity's final estimate, with what it was measured on."""
    return (f"PPL = {result['ppl']:.4f} +/- {result['ppl_stderr']:.5f} "
            f"({result['tokens_scored']} tokens scored, {result['chunks']} chunks of {result['ctx']})")


def kl_divergence(r: dict) -> str:
    """`rioquant kld`: the summary as `llama-perplexity --kl-divergence` prints it."""
    lines = [
        f"====== Perplexity statistics ({r['tokens_scored']} tokens, {r['chunks']} chunks of {r['ctx']}) ======",
        f"Mean PPL(Q)                   : {r['ppl_q']:10.6f} ± {r['ppl_q_stderr']:10.6f}",
        f"Mean PPL(base)                : {r['ppl_base']:10.6f} ± {r['ppl_base_stderr']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * r['cor_ln_ppl']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {r['ln_ppl_ratio']:10.6f} ± {r['ln_ppl_ratio_stderr']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {r['ppl_ratio']:10.6f} ± {r['ppl_ratio_stderr']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {r['ppl_diff']:10.6f} ± {r['ppl_diff_stderr']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {r['kld']:10.6f} ± {r['kld_stderr']:10.6f}",
    ]
    lines += [f"{label:<8}KLD: {value:10.6f}" for label, value in r["kld_percentiles"].items()]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * r['delta_p']:6.3f} ± {100 * r['delta_p_stderr']:5.3f} %"]
    lines += [f"{label:<8}Δp: {100 * value:6.3f}%" for label, value in r["delta_p_percentiles"].items()]
    lines += [f"RMS Δp    : {100 * r['rms_delta_p']:6.3f} ± {100 * r['rms_delta_p_stderr']:5.3f} %",
              f"Same top p: {100 * r['same_top_p']:6.3f} ± {100 * r['same_top_p_stderr']:5.3f} %"]
    return "\n".join(lines)


def imatrix_collected(result: dict) -> str:
    """`rioquant imatrix`: the file written, and a warning per tensor with experts no token reached."""
    lines = [f"{result['output']}: {result['entries']} entries from {result['chunks']} chunks of {result['ctx']}"]
    lines += [f"warning: {name}: no token routed to expert(s) {experts}"
              for name, experts in result["experts_without_data"].items()]
    return "\n".join(lines)


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _rank(items: list[tuple[dict, dict]], key: str) -> list[tuple[dict, dict]]:
    def value(item):
        v = item[1].get(key)
        return -math.inf if v is None else v

    return sorted(items, key=value, reverse=True)


def error_report(report: dict, top: int = 15) -> str:
    """`rioquant report`: the worst tensors and experts by the report's primary metric, and flagged experts."""
    key, label = primary_metric(report)
    imatrix = report.get("imatrix")
    s = report["summary"]
    lines = [
        f"report for {', '.join(report['gguf'])} (type {report['type']}, from {report['source']})",
        f"imatrix: {imatrix['file']} (dataset {imatrix['dataset'] or '-'}, {imatrix['entries_count']} entries, "
        f"{imatrix['chunks_count']} chunks)" if imatrix else "imatrix: none",
        f"{s['tensors']} tensors measured (F32 tensors are stored exactly), {s['expert_slices']} expert slices; "
        f"experts flagged: {s['dead_experts']} dead, {s['outlier_experts']} outlier (> {report['outlier_factor']:g}× "
        f"their layer's median), {s['no_imatrix_data_experts']} without imatrix data",
    ]
    if report.get("not_measured"):
        lines.append(f"not measured (resumed from a run without tracking): {len(report['not_measured'])} tensors")
    header = f"  {'tensor':<34} {'expert':>6} {'type':<5} {'bpw':>5} {'rel RMSE':>9} {'imat rel':>9} {'max|err|':>9} {'cosine':>8}  flags"

    def row(t: dict, rec: dict, expert) -> str:
        return (f"  {t['name']:<34} {'' if expert is None else expert:>6} {t['qtype']:<5} {t['bpw']:>5.2f} "
                f"{_fmt(rec['rel_rmse']):>9} {_fmt(rec['imatrix_rel_rmse']):>9} {_fmt(rec['max_abs_err']):>9} "
                f"{_fmt(rec['cosine'], '.6f'):>8}  {','.join(rec['flags'])}")

    tensors = [(t, t) for t in report["tensors"]]
    lines += ["", f"worst tensors by {label}:", header]
    lines += [row(t, rec, None) for t, rec in _rank(tensors, key)[:top]]
    experts = [(t, x) for t in report["tensors"] for x in t.get("experts", ())]
    if experts:
        lines += ["", f"worst experts by {label}:", header]
        lines += [row(t, x, x["expert"]) for t, x in _rank(experts, key)[:top]]
        for flag in ("dead", "outlier", "no_imatrix_data"):
            flagged: dict[str, list[int]] = {}
            for t, x in experts:
                if flag in x["flags"]:
                    flagged.setdefault(t["name"], []).append(x["expert"])
            if flagged:
                total = sum(map(len, flagged.values()))
                lines += ["", f"{flag} experts: {total} in {len(flagged)} tensors" + (", most first:" if len(flagged) > top else ":")]
                ranked = sorted(flagged.items(), key=lambda item: -len(item[1]))[:top] if len(flagged) > top else flagged.items()
                lines += [f"  {name}: {_short_list(ids)}" for name, ids in ranked]
                if len(flagged) > top:
                    lines.append(f"  … {len(flagged) - top} more tensors (see the CSV)")
    return "\n".join(lines)


def _short_list(ids: list[int], limit: int = 24) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


