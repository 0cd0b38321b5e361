"""Which of the XL mixes' rules earn their bytes: each variant moves one tensor class of Q4_K_XL or
IQ2_XL (with the imatrix) to another type and measures the nano model's KLD; the cost is counted on
the 397B. For IQ2_XL each variant takes one rule back to what llama.cpp's IQ2_XXS mix gives that
tensor class, so the table says what each rule buys over llama.cpp.

    python -m bench.xl_ablation [--nano a|b]   (after `make fidelity`, whose files it reuses)

Block-wise variants (`down_exps Q4_K in block i`) tell which blocks' experts are least sensitive; on
the 397B each such step is one of 61 blocks. The evidence behind docs/recipes.md's Q4_K_XL.
"""

from __future__ import annotations

import argparse
import json

from bench.fidelity import CACHE_DIR, CTX, Quant, Scoring, _log, measure, size_397b
from bench.nano.corpus import load_corpus
from bench.nano.train import VARIANTS as NANO_VARIANTS
from bench.nano.train import ensure_nano
from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.export.qwen35moe import ATTENTION, DOWN_EXPS, SHARED_EXPERT, SSM_GATES, SSM_OUT
from rioquant.quant.llama_mixes import TOKEN_EMBD

# (base mix, --tensor-type overrides on top of it), with the recipes' own patterns for each tensor class
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {name: ("Q4_K_XL", overrides) for name, overrides in {
    "Q4_K_XL": (),
    "attention Q6_K": (f"{ATTENTION}=Q6_K", f"{SSM_GATES}=Q6_K"),
    "attention Q4_K": (f"{ATTENTION}=Q4_K", f"{SSM_GATES}=Q4_K"),
    "ssm_out Q6_K": (f"{SSM_OUT}=Q6_K",),
    "ssm_out Q4_K": (f"{SSM_OUT}=Q4_K",),
    "shared expert Q6_K": (f"{SHARED_EXPERT}=Q6_K",),
    "shared expert Q4_K": (f"{SHARED_EXPERT}=Q4_K",),
    "token_embd Q4_K": (f"{TOKEN_EMBD}=Q4_K",),
    "down_exps Q4_K": (f"{DOWN_EXPS}=Q4_K",),
    "down_exps Q6_K": (f"{DOWN_EXPS}=Q6_K",),
    "gate/up_exps Q5_K": ("ffn_(gate|up)_exps=Q5_K",),
    **{f"down_exps Q4_K in block {i}": (rf"blk\.{i}\.ffn_down_exps=Q4_K",) for i in range(8)},
}.items()} | {name: ("IQ2_XL", overrides) for name, overrides in {
    "IQ2_XL": (),
    "IQ2_XL: attention Q4_K": (f"{ATTENTION}=Q4_K", f"{SSM_GATES}=Q4_K"),
    "IQ2_XL: ssm_out IQ2_XXS": (f"{SSM_OUT}=IQ2_XXS",),
    "IQ2_XL: shared expert IQ2_XXS": (f"{SHARED_EXPERT}=IQ2_XXS",),
    "IQ2_XL: token_embd Q2_K": (f"{TOKEN_EMBD}=Q2_K",),
    "IQ2_XL: output Q5_K": (r"^output\.weight$=Q5_K",),
    "IQ2_XL: down_exps IQ2_S everywhere": (f"{DOWN_EXPS}=IQ2_S",),
    "IQ2_XL: down_exps IQ2_XXS": (f"{DOWN_EXPS}=IQ2_XXS",),
    "IQ2_XL: gate/up_exps IQ2_XS": ("ffn_(gate|up)_exps=IQ2_XS",),
}.items()}
# Whole alternatives to an XL mix's expert rules: (base mix, [(tensor pattern, type, layers or None)]),
# written as recipe files on top of the base (layer conditions need a recipe file).
Layered = tuple[str, str, str | None]
DOWN, GATE_UP = "ffn_down_exps", "ffn_(gate|up)_exps"
CANDIDATES: dict[str, tuple[str, list[Layered]]] = {
    "Q4_K_XL: down Q6_K first n/8, Q4_K after": ("Q4_K_XL", [(DOWN, "Q6_K", "i < n/8"), (DOWN, "Q4_K", None)]),
    "Q4_K_XL: down Q6_K first n/8, Q5_K use_more_bits, Q4_K after": (
        "Q4_K_XL", [(DOWN, "Q6_K", "i < n/8"), (DOWN, "Q5_K", "use_more_bits"), (DOWN, "Q4_K", None)]),
    "Q4_K_XL: down Q6_K first n/8, Q4_K after; gate/up Q5_K first n/8": (
        "Q4_K_XL", [(DOWN, "Q6_K", "i < n/8"), (DOWN, "Q4_K", None), (GATE_UP, "Q5_K", "i < n/8")]),
    "Q3_K_XL (as built in)": ("Q3_K_XL", []),
    "Q3_K_XL: down Q5_K first n/8, Q4_K use_more_bits, Q3_K after": (
        "Q3_K_XL", [(DOWN, "Q5_K", "i < n/8"), (DOWN, "Q4_K", "use_more_bits"), (DOWN, "Q3_K", None)]),
    "Q3_K_XL: down Q6_K first n/8, Q4_K use_more_bits, Q3_K after": (
        "Q3_K_XL", [(DOWN, "Q6_K", "i < n/8"), (DOWN, "Q4_K", "use_more_bits"), (DOWN, "Q3_K", None)]),
    "Q2_K_XL (as built in)": ("Q2_K_XL", []),
    "Q2_K_XL: down Q4_K first n/8, Q3_K use_more_bits, Q2_K after": (
        "Q2_K_XL", [(DOWN, "Q4_K", "i < n/8"), (DOWN, "Q3_K", "use_more_bits"), (DOWN, "Q2_K", None)]),
}


def candidate_toml(base: str, rules: list[Layered]) -> str:
    lines = [f'base = "{base}"']
    for pattern, qtype, layers in rules:
        lines += ["[[rules]]", f'pattern = "{pattern}"', f'type = "{qtype}"', *([f'layers = "{layers}"'] if layers else [])]
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nano", choices=NANO_VARIANTS, default="a", help="Which trained nano model.")
    parser.add_argument("--base", default=None, help="Only the variants of this mix (e.g. IQ2_XL); default: all.")
    args = parser.parse_args(argv)
    nano = ensure_nano(args.nano, log=_log)
    work = CACHE_DIR / "fidelity" / nano.name
    bf16, imatrix = work / "nano-BF16.gguf", work / "imatrix.gguf"
    if not imatrix.is_file():
        raise SystemExit(f"{imatrix}: run `make fidelity` first")
    scoring = Scoring.prepare(work, load_corpus().evaluation, bf16)
    cache_path = work / "measurements.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows = []
    variants = [(name, base, {"tensor_types": overrides}) for name, (base, overrides) in VARIANTS.items()]
    for name, (base, rules) in CANDIDATES.items():
        recipe = work / f"candidate-{_slug(name)}.toml"
        recipe.write_text(candidate_toml(base, rules))
        variants.append((name, base, {"recipe": recipe}))
    for name, base, fields in [v for v in variants if args.base in (None, v[1])]:
        path = work / f"ablation-{_slug(name)}.gguf"
        options = ConvertOptions(qtype=base, imatrix=imatrix, **fields)
        convert(nano, path, options, RunOptions(force=True, progress=False, report=False))
        row = measure(Quant(base, "rioquant", True, path), bf16, scoring, cache)
        cache_path.write_text(json.dumps(cache, indent=1))
        gb = size_397b(base, imatrix=True) if "block" in name else size_397b(base, imatrix=True, **fields)
        rows.append({"variant": name, "bpw": row["bpw"], "kld": row["kld"], "kld_stderr": row["kld_stderr"],
                     "kld_99_9": row["kld_99_9"], "same_top_p": row["same_top_p"], "gb_397b": gb})
        _log(f"{name}: KLD {row['kld']:.5f} 99.9% {row['kld_99_9']:.4f} 397B {gb:.1f} GB")
    (work / "xl_ablation.json").write_text(json.dumps(rows, indent=1))
    print(f"\nXL ablation ({nano.name}, imatrix, ctx {CTX}); 397B GB for the same overrides\n")
    print("| variant | nano bpw | mean KLD | 99.9 % KLD | same top p | 397B GB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['bpw']:.3f} | {r['kld']:.5f} ± {r['kld_stderr']:.5f} | {r['kld_99_9']:.4f} | "
              f"{100 * r['same_top_p']:.2f} % | {r['gb_397b']:.1f} |")


if __name__ == "__main__":
    main()
