"""`make fidelity`: size against KL divergence for every mix, on a trained nano Qwen3.5-MoE.

    python -m bench.fidelity [--nano a|b] [--out DIR] [--fresh]

1. A nano model (bench/nano: trained once, then cached; `--nano b` is the second shape), its BF16 GGUF (`rioquant convert`), and an
   importance matrix collected by `rioquant imatrix` on the calibration split.
2. llama.cpp's whole menu (K, legacy and i-quant mixes) quantized by llama.cpp itself
   (`llama_model_quantize`), without and with that imatrix (passed as llama.cpp's own
   `llama_model_imatrix_data`; the i-quant mixes that need one only with it); rioquant's file of each
   of them is checked byte for byte against llama.cpp's.
3. rioquant's dynamic mixes (K-quant and i-quant XL), without and with the imatrix where allowed.
4. Every file scored against the BF16 GGUF on the evaluation split (a split no training or calibration
   text came from) by `rioquant kld`, twice: chunks starting at the text's start, then chunks starting
   half a chunk later, so that every token is scored once with at least half a chunk of context
   (~2× the tokens of one pass: the 99.9 % KLD is a tail statistic and needs them). Mean KLD and
   99.9 % KLD over all scored tokens, the 99.9 % of each half of the text (its spread), same-top-p,
   PPL; sizes as bits per weight.
5. The frontier: the lower envelope of llama.cpp's menu at the same imatrix setting (each statistic
   separately: the mixes no smaller mix beats), log-KLD linearly interpolated in bits per weight and
   extended along its last segment beyond its ends; each rioquant mix is compared with it at its own
   bpw. A table (markdown + JSON) and a PNG of both statistics.

Results are kept per file (keyed by the file's sha256), so a re-run after changing one recipe measures
only what changed. The 397B's sizes for each mix come from `rioquant plan` on its config alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.nano.corpus import load_corpus
from bench.nano.train import VARIANTS, ensure_nano
from rioquant.convert import ConvertOptions, RunOptions, build_plan, convert, describe_plan
from rioquant.evaluate.engine import EngineOptions
from rioquant.evaluate.pipelines import collect_imatrix, kl_divergence
from rioquant.evaluate.stats import mean_and_uncertainty, percentile
from rioquant.files.gguf_file import read_header
from rioquant.quant.plan import recipe_needs_imatrix
from rioquant.quant.recipes import LLAMA_MIXES, XL_MIXES
from rioquant.quant.rules import Recipe
from rioquant.testing.gguf_scan import scan
from rioquant.testing.imatrix_files import RawEntry, gguf_importance
from rioquant.testing.llama_quantize import llama_quantize
from rioquant.testing.llama_src import CACHE_DIR
from rioquant.testing.tokenizer import tokenizer_files

RIO_397B_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "rio-3.5-open-397b"
CTX = 512


@dataclass(frozen=True)
class Quant:
    mix: str
    producer: str  # "llama.cpp" (llama_model_quantize) or "rioquant"
    imatrix: bool
    path: Path

    @property
    def label(self) -> str:
        return f"{self.mix}{' +imatrix' if self.imatrix else ''} ({self.producer})"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def llama_importance(imatrix: Path) -> dict[str, np.ndarray]:
    """The importance llama-quantize derives from an imatrix GGUF (in_sum2 / count per expert), read
    with gguf-py and computed by the test oracle's own code, not rioquant's."""
    from gguf import GGUFReader

    tensors = {t.name: np.array(t.data) for t in GGUFReader(imatrix).tensors}
    out = {}
    for key, sums in tensors.items():
        if key.endswith(".in_sum2"):
            name = key.removesuffix(".in_sum2")
            counts = tensors[f"{name}.counts"].reshape(-1)
            out[name] = gguf_importance(RawEntry(sums.reshape(len(counts), -1).astype(np.float32), counts)).reshape(-1)
    return out


def assert_same_tensors(ours: Path, llama: Path) -> None:
    a, b = scan(ours).tensors, scan(llama).tensors
    differ = [n for n in b if n not in a or (a[n].qtype, a[n].data) != (b[n].qtype, b[n].data)]
    if a.keys() != b.keys() or differ:
        raise AssertionError(f"{ours.name}: {len(differ)} tensors differ from llama_model_quantize's {llama.name}: {differ[:5]}")


def imatrix_settings(recipe: Recipe, imatrix_only: bool) -> tuple[bool, ...]:
    """With and without the imatrix, or only with it where the mix needs one or `imatrix_only` asks."""
    return (True,) if imatrix_only or recipe_needs_imatrix(recipe) else (False, True)


def build_quants(work: Path, nano: Path, bf16: Path, imatrix: Path, imatrix_only: bool) -> list[Quant]:
    importance = llama_importance(imatrix)
    quants = []
    for mix, recipe in LLAMA_MIXES.items():
        for with_imatrix in imatrix_settings(recipe, imatrix_only):
            path = work / f"nano-{mix}{'-imat' if with_imatrix else ''}-llama.gguf"
            if not path.is_file():
                _log(f"llama_model_quantize {mix}{' with imatrix' if with_imatrix else ''}")
                llama_quantize(bf16, path, recipe.file_type, importance=importance if with_imatrix else None)
            ours = work / "rioquant-check.gguf"  # rioquant's file of the mix is llama.cpp's, byte for byte
            convert(nano, ours, ConvertOptions(qtype=mix, imatrix=imatrix if with_imatrix else None), RunOptions(force=True, progress=False, report=False))
            assert_same_tensors(ours, path)
            ours.unlink()
            quants.append(Quant(mix, "llama.cpp", with_imatrix, path))
    for mix, recipe in XL_MIXES.items():
        for with_imatrix in imatrix_settings(recipe, imatrix_only):
            path = work / f"nano-{mix}{'-imat' if with_imatrix else ''}.gguf"
            _log(f"rioquant convert {mix}{' with imatrix' if with_imatrix else ''}")
            convert(nano, path, ConvertOptions(qtype=mix, imatrix=imatrix if with_imatrix else None), RunOptions(force=True, progress=False, report=False))
            quants.append(Quant(mix, "rioquant", with_imatrix, path))
    return quants


def bits_per_weight(path: Path) -> float:
    """llama.cpp's BPW: tensor data bits over all tensor elements."""
    header = read_header(path)
    return sum(t.nbytes for t in header.tensors) * 8 / sum(t.n_elements for t in header.tensors)


@dataclass(frozen=True)
class Scoring:
    """The two passes over the evaluation text (see the module docstring): (text, base states) each."""

    passes: tuple[tuple[Path, Path], ...]

    @classmethod
    def prepare(cls, work: Path, text: str, bf16: Path) -> Scoring:
        from rioquant.evaluate.source import open_source
        from rioquant.evaluate.text import load_tokenizer

        offsets = load_tokenizer(open_source(bf16)).encode(text, add_special_tokens=False).offsets
        shifted = text[offsets[CTX // 2][0]:]
        passes = []
        for name, body in (("evaluation", text), ("evaluation-shifted", shifted)):
            path = work / f"{name}.txt"
            path.write_text(body, encoding="utf-8")
            passes.append((path, work / f"base-states-{name}.npy"))
        return cls(tuple(passes))


def measure(quant: Quant, bf16: Path, scoring: Scoring, cache: dict) -> dict:
    key = f"{_sha256(quant.path)} two-pass ctx {CTX}"
    if key not in cache:
        _log(f"kld {quant.label}")
        options = EngineOptions(threads=None, progress=False)
        results, tokens = [], []
        for text, states in scoring.passes:
            per_token = quant.path.with_suffix(".kld.npy")
            results.append(kl_divergence(bf16, quant.path, text, CTX, None, options, base_states=states,
                                         tokens_out=per_token))
            tokens.append(np.load(per_token))
            per_token.unlink()
        everything = np.concatenate(tokens)
        halves = [np.concatenate([t[: len(t) // 2] for t in tokens]), np.concatenate([t[len(t) // 2:] for t in tokens])]
        kld, kld_stderr = mean_and_uncertainty(everything)
        n = [r["tokens_scored"] for r in results]
        cache[key] = {"kld": kld, "kld_stderr": kld_stderr, "kld_99_9": _p999(everything),
                      "kld_99_9_halves": [_p999(h) for h in halves],
                      "same_top_p": sum(r["same_top_p"] * k for r, k in zip(results, n, strict=True)) / sum(n),
                      "ppl": results[0]["ppl_q"], "ppl_base": results[0]["ppl_base"], "tokens": sum(n)}
    return {**asdict(quant), "path": quant.path.name, "label": quant.label, "bytes": quant.path.stat().st_size,
            "bpw": bits_per_weight(quant.path), **cache[key], "size_397b_gb": size_397b(quant.mix, imatrix=quant.imatrix)}


def _p999(kld: np.ndarray) -> float:
    """llama-perplexity's 99.9 % KLD (its percentile of the float32-sorted values)."""
    return percentile(np.sort(kld.astype(np.float32)), 0.999)


_SIZES_397B: dict[str, float] = {}


def _rio_397b_folder() -> Path:
    """config.json of the 397B with the real Qwen3.5 tokenizer files: all `rioquant plan` needs."""
    folder = CACHE_DIR / "fidelity" / "Rio-3.5-Open-397B"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RIO_397B_CONFIG / "config.json", folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tokenizer_files() / name, folder / name)
    return folder


def size_397b(mix: str, tensor_types: tuple[str, ...] = (), recipe: Path | None = None, imatrix: bool = False) -> float:
    """GB (10⁹ bytes) of the 397B file for `mix` (or a recipe file, with --tensor-type overrides), from
    `rioquant plan` on its config alone (MTP included), with or without an imatrix (plan looks only at
    whether one is given)."""
    key = f"{mix} {tensor_types} {recipe and recipe.read_text()} {imatrix}"
    if key not in _SIZES_397B:
        options = ConvertOptions(qtype=mix, tensor_types=tensor_types, recipe=recipe,
                                 imatrix=Path("imatrix.gguf") if imatrix else None)
        plan = build_plan(_rio_397b_folder(), options, weights_optional=True)
        _SIZES_397B[key] = describe_plan(plan)["file_bytes"] / 1e9
    return _SIZES_397B[key]


def frontier_points(rows: list[dict], imatrix: bool, key: str) -> list[tuple[float, float]]:
    """llama.cpp's frontier for one statistic: its mixes (of this imatrix setting) that no smaller mix
    beats, as (bpw, log KLD), smallest first."""
    points = sorted((r["bpw"], math.log(r[key])) for r in rows if r["producer"] == "llama.cpp" and r["imatrix"] == imatrix)
    envelope: list[tuple[float, float]] = []
    for bpw, log_kld in points:
        if not envelope or log_kld < envelope[-1][1]:
            envelope.append((bpw, log_kld))
    return envelope


def frontier_log_kld(rows: list[dict], imatrix: bool, key: str, bpw: float) -> float:
    """The frontier at `bpw`: log KLD linear in bpw between its points, extended beyond its ends."""
    points = frontier_points(rows, imatrix, key)
    xs = [x for x, _ in points]
    i = min(max(int(np.searchsorted(xs, bpw)), 1), len(xs) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (bpw - x0) / (x1 - x0)


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["producer"] != "rioquant":
            continue
        entry = {"label": r["label"], "bpw": r["bpw"]}
        for key in ("kld", "kld_99_9"):
            frontier = math.exp(frontier_log_kld(rows, r["imatrix"], key, r["bpw"]))
            entry[f"{key}_frontier"] = frontier
            entry[f"{key}_ratio"] = r[key] / frontier
        entry["kld_99_9_halves_ratio"] = [h / entry["kld_99_9_frontier"] for h in r["kld_99_9_halves"]]
        entry["below"] = entry["kld_ratio"] < 1 and entry["kld_99_9_ratio"] < 1
        out.append(entry)
    return out


def markdown(rows: list[dict], checks: list[dict], nano: dict) -> str:
    lines = [
        f"Nano Qwen3.5-MoE ({nano['parameters'] / 1e6:.1f} M parameters, {nano['settings']['steps']} steps; "
        f"BF16 PPL on the evaluation split {rows[0]['ppl_base']:.2f}, uniform {nano['token_ids']}); "
        f"KLD against the BF16 GGUF over {rows[0]['tokens']} scored tokens (ctx {CTX}).",
        "",
        "| mix | imatrix | by | nano MB | bpw | mean KLD | 99.9 % KLD (halves) | same top p | PPL | 397B GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["imatrix"], r["bpw"])):
        lines.append(f"| {r['mix']} | {'yes' if r['imatrix'] else 'no'} | {r['producer']} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['bpw']:.3f} | {r['kld']:.5f} ± {r['kld_stderr']:.5f} | {r['kld_99_9']:.4f} "
                     f"({' / '.join(f'{h:.4f}' for h in r['kld_99_9_halves'])}) | {100 * r['same_top_p']:.2f} % | "
                     f"{r['ppl']:.3f} | {r['size_397b_gb']:.1f} |")
    lines += ["", "Against llama.cpp's frontier (the lower envelope of its whole menu at the same imatrix setting, "
              "log-KLD interpolated at the mix's bpw; ratio < 1 is below the frontier; in brackets the 99.9 % "
              "ratio of each half of the text):", "",
              "| mix | bpw | mean KLD / frontier | 99.9 % KLD / frontier (halves) | below |", "|---|---|---|---|---|"]
    for c in checks:
        halves = " / ".join(f"{h:.3f}" for h in c["kld_99_9_halves_ratio"])
        lines.append(f"| {c['label']} | {c['bpw']:.3f} | {c['kld_ratio']:.3f} | {c['kld_99_9_ratio']:.3f} ({halves}) | "
                     f"{'yes' if c['below'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    styles = {("llama.cpp", False): ("#9e9e9e", "o", "llama.cpp mixes"),
              ("llama.cpp", True): ("#1f77b4", "o", "llama.cpp mixes + imatrix"),
              ("rioquant", False): ("#ff9f43", "D", "rioquant dynamic"),
              ("rioquant", True): ("#d62728", "D", "rioquant dynamic + imatrix")}
    for ax, key, title in ((axes[0], "kld", "mean KLD"), (axes[1], "kld_99_9", "99.9 % KLD")):
        for (producer, imatrix), (colour, marker, name) in styles.items():
            group = sorted((r for r in rows if r["producer"] == producer and r["imatrix"] == imatrix), key=lambda r: r["bpw"])
            if not group:  # an --imatrix-only run: no legend entry for what was not measured
                continue
            ax.scatter([r["bpw"] for r in group], [r[key] for r in group], color=colour, marker=marker, label=name, zorder=3)
            for r in group:
                ax.annotate(r["mix"], (r["bpw"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
            if producer == "llama.cpp":
                front = frontier_points(rows, imatrix, key)
                ax.plot([x for x, _ in front], [math.exp(y) for _, y in front], color=colour, lw=1, zorder=2)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (nano model)")
        ax.set_ylabel(f"{title} vs BF16 (nats)")
        ax.set_title(f"{title}: lower left is better")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Size vs KL divergence, nano Qwen3.5-MoE (lines: llama.cpp's frontier, the lower envelope of its mixes)")
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run(out: Path, variant: str = "a", fresh: bool = False, imatrix_only: bool = False) -> dict:
    nano = ensure_nano(variant, log=_log)
    work = out / nano.name  # a retrained nano model gets its own folder
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    provenance = json.loads((nano / "nano.json").read_text())
    corpus = load_corpus()
    calibration = work / "calibration.txt"
    calibration.write_text(corpus.calibration, encoding="utf-8")
    bf16 = work / "nano-BF16.gguf"
    if not bf16.is_file():
        convert(nano, bf16, ConvertOptions(qtype="BF16"), RunOptions(force=True, progress=False, report=False))
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        _log("rioquant imatrix on the calibration split")
        collect_imatrix(nano, calibration, imatrix, CTX, None, EngineOptions(progress=False))
    scoring = Scoring.prepare(work, corpus.evaluation, bf16)
    quants = build_quants(work, nano, bf16, imatrix, imatrix_only)
    cache_path = work / "measurements.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows = []
    for quant in quants:
        rows.append(measure(quant, bf16, scoring, cache))
        cache_path.write_text(json.dumps(cache, indent=1))
    checks = verdicts(rows)
    table = markdown(rows, checks, provenance)
    (work / "fidelity.md").write_text(table)
    (work / "fidelity.json").write_text(json.dumps({"nano": provenance, "rows": rows, "frontier": checks}, indent=1))
    plot(rows, work / "fidelity.png")
    print(table)
    print(f"files: {work}/fidelity.md, fidelity.json, fidelity.png")
    return {"rows": rows, "frontier": checks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nano", choices=VARIANTS, default="a", help="Which trained nano model (bench/nano/train.py).")
    parser.add_argument("--out", type=Path, default=CACHE_DIR / "fidelity", help="Work and result folder.")
    parser.add_argument("--fresh", action="store_true", help="Start over: the BF16 GGUF, the imatrix, every file and measurement.")
    parser.add_argument("--imatrix-only", action="store_true",
                        help="Only the files made with the imatrix (half the time; the published way to make them).")
    args = parser.parse_args(argv)
    run(args.out, args.nano, args.fresh, args.imatrix_only)


if __name__ == "__main__":
    main()
