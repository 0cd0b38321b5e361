"""How closely `rioquant ppl` (`--numerics ggml`) follows llama.cpp on a trained model, type by type, and
how far float32 summation order alone moves the same model: the floor no choice of rounding can beat.

For each GGUF type of the nano model (bench/nano: trained once, cached under .cache/nano), converted by
rioquant, with the output head optionally scaled (`--head-scale 40`: logits far from uniform, where one
per cent of PPL is 0.01 nats): the perplexity from llama.cpp's logits (llama-cpp-python, llama-perplexity's
loop), then rioquant's relative difference to it with `ggml` and with `exact` numerics, and "self":
rioquant `ggml` with every product of the layers summed in float64 instead of float32 against rioquant `ggml`
— the same roundings, only another summation order, as two GEMM implementations differ.

    python -m bench.numerics_agreement [--nano a|b] [--head-scale 40] [--types F32,F16,BF16,Q8_0,Q4_K_M,Q2_K]
                                       [--ctx 256] [--chunks 8]
"""

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file, save_file

from bench.nano.corpus import load_corpus
from bench.nano.train import VARIANTS, ensure_nano
from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.evaluate import forward
from rioquant.evaluate.engine import EngineOptions
from rioquant.evaluate.head import scores_from_logits
from rioquant.evaluate.pipelines import perplexity
from rioquant.evaluate.source import open_source
from rioquant.evaluate.text import tokenize_text
from rioquant.testing.oracles import LlamaChunks

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "numerics-agreement"
TEXT_CHARS = 400_000


def scaled_head(nano: Path, scale: float, out: Path) -> Path:
    """A copy of the nano checkpoint with lm_head × scale (the trained layers untouched)."""
    if (out / "model.safetensors").is_file():
        return out
    shutil.copytree(nano, out, dirs_exist_ok=True)
    tensors = load_file(nano / "model.safetensors")
    stored = tensors["lm_head.weight"]
    tensors["lm_head.weight"] = (stored.float() * scale).to(stored.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def llama_cpp_ppl(gguf: Path, text: Path, ctx: int, chunks: int) -> float:
    tokens = tokenize_text(open_source(gguf), text, ctx, chunks)
    first = ctx // 2
    runner = LlamaChunks(gguf, ctx)
    try:
        nll = [scores_from_logits(torch.from_numpy(runner.logits(chunk, first)[:-1]),
                                  torch.from_numpy(chunk[first + 1 :].astype(np.int64))).nll.numpy() for chunk in tokens]
    finally:
        runner.close()
    return float(np.exp(np.concatenate(nll).astype(np.float64).mean()))


@contextlib.contextmanager
def float64_products() -> Iterator[None]:
    """Every weight product of the layers summed in float64, rounded back to float32.

    The forward pass calls `nnf.linear`; this swaps its module's `nnf` for a namespace whose `linear` does
    that, so the roundings (`Numerics.input`) are unchanged and only the summation differs. The head's
    products stay float32: their last bits reach the logits directly, never a rounding boundary."""
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return nnf.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()

    wide = SimpleNamespace(**{name: getattr(nnf, name) for name in dir(nnf) if not name.startswith("__")})
    wide.linear = linear
    forward.nnf = wide
    try:
        yield
    finally:
        forward.nnf = nnf


def measure(gguf: Path, text: Path, ctx: int, chunks: int) -> dict[str, float]:
    def ppl(numerics: str) -> float:
        return perplexity(gguf, text, ctx, chunks, EngineOptions(progress=False, numerics=numerics))["ppl"]

    reference = llama_cpp_ppl(gguf, text, ctx, chunks)
    ggml = ppl("ggml")
    with float64_products():
        ggml_f64 = ppl("ggml")
    return {"llama.cpp": reference, "ggml": ggml / reference - 1, "exact": ppl("exact") / reference - 1,
            "self": ggml_f64 / ggml - 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nano", choices=VARIANTS, default="a")
    parser.add_argument("--head-scale", type=float, default=1.0)
    parser.add_argument("--types", default="F32,F16,BF16,Q8_0,Q4_K_M,Q2_K")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args(argv)

    nano = ensure_nano(args.nano)
    work = CACHE / f"{nano.name}-head{args.head_scale:g}"
    model = nano if args.head_scale == 1.0 else scaled_head(nano, args.head_scale, work / "hf")
    text = work / "evaluation.txt"
    if not text.is_file():
        work.mkdir(parents=True, exist_ok=True)
        text.write_text(load_corpus().evaluation[:TEXT_CHARS])
    print(f"nano {args.nano}, output head ×{args.head_scale:g}, ctx {args.ctx}, {args.chunks} chunks")
    print("| GGUF | llama.cpp PPL | rioquant ggml vs llama.cpp | rioquant exact vs llama.cpp | self (float64 sums vs float32) |")
    print("|---|---|---|---|---|")
    for qtype in args.types.split(","):
        gguf = work / f"nano-{qtype}.gguf"
        if not gguf.is_file():
            convert(model, gguf, ConvertOptions(qtype=qtype), RunOptions(progress=False, report=False))
        r = measure(gguf, text, args.ctx, args.chunks)
        print(f"| {qtype} | {r['llama.cpp']:.6g} | {r['ggml']:+.1e} | {r['exact']:+.1e} | {r['self']:+.1e} |", flush=True)


if __name__ == "__main__":
    main()
