"""Perplexity throughput and peak memory of rioquant's engine against llama.cpp, same GGUF and text, same run.

Each side runs in its own process (so each peak RSS is its own) over the same token chunks:
llama.cpp through llama-cpp-python in llama-perplexity's loop (one sequence per chunk, memory cleared,
logits requested from position ctx/2 on, the NLL taken from them in torch as our engine does), and
`rioquant.evaluate.pipelines.perplexity`. Reported: tokens/s (all chunk tokens / evaluation time, model
load excluded and shown apart; best of --repeats), peak RSS, both perplexities, and the rioquant/llama.cpp ratio; then
rioquant's per-layer time and weight bytes, which docs/evaluation.md extrapolates to the 397B model.

    python -m bench.eval_bench                       # builds the bench model once under .cache/
    python -m bench.eval_bench --gguf model.gguf --ctx 512 --chunks 8 --threads 2
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench-eval"


def bench_model(qtype: str) -> Path:
    """A Qwen3.5-MoE shaped like the real one at small scale: hidden 256, 8 layers (6 linear + 2 full),
    16 experts top-4, real 248K vocabulary; converted once and cached."""
    from rioquant.convert import ConvertOptions, RunOptions, convert
    from rioquant.testing.checkpoints import KQUANT, build_checkpoint

    out = CACHE / f"bench-{qtype}.gguf"
    if out.is_file():
        return out
    spec = replace(KQUANT, num_hidden_layers=8, num_experts=16, num_experts_per_tok=4)
    src = build_checkpoint(spec, CACHE / "hf")
    convert(src, out, ConvertOptions(qtype=qtype), RunOptions(progress=False, force=True))
    return out


def bench_text() -> Path:
    from pydoc_data.topics import topics

    path = CACHE / "topics.txt"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return path


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_llama(gguf: Path, text: Path, ctx: int, chunks: int, threads: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from rioquant.evaluate.head import scores_from_logits
    from rioquant.evaluate.source import open_source
    from rioquant.evaluate.stats import perplexity_summary
    from rioquant.evaluate.text import tokenize_text
    from rioquant.testing.oracles import LlamaChunks

    tokens = tokenize_text(open_source(gguf), text, ctx, chunks)
    first = ctx // 2
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    runner = LlamaChunks(gguf, ctx, threads)
    load_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        nll = []
        for chunk in tokens:
            z = torch.from_numpy(runner.logits(chunk, first)[:-1])
            nll.append(scores_from_logits(z, torch.from_numpy(chunk[first + 1 :].astype(np.int64))).nll.numpy())
        times.append(time.perf_counter() - t1)
    runner.close()
    return {"engine": "llama.cpp", **perplexity_summary(np.concatenate(nll)), "tokens": int(tokens.size),
            "load_s": load_s, "eval_s": min(times), "tokens_per_s": tokens.size / min(times), "peak_rss": _peak_rss()}


def worker_rioquant(gguf: Path, text: Path, ctx: int, chunks: int, threads: int, repeats: int) -> dict:
    from rioquant.evaluate.engine import EngineOptions
    from rioquant.evaluate.pipelines import perplexity

    CACHE.mkdir(parents=True, exist_ok=True)
    profile_path = CACHE / "rioquant-profile.json"
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = perplexity(gguf, text, ctx, chunks, EngineOptions(threads=threads, progress=False),
                            profile_out=profile_path)
        total_s = time.perf_counter() - t0
        profile = json.loads(profile_path.read_text())["model"]
        if best is None or profile["wall_s"] < best[1]["wall_s"]:
            best = (total_s, profile)
    total_s, profile = best
    return {"engine": "rioquant", **result, "tokens": profile["tokens"], "load_s": total_s - profile["wall_s"],
            "eval_s": profile["wall_s"], "tokens_per_s": profile["tokens_per_s"], "peak_rss": _peak_rss(),
            "layers": profile["layers"]}


def run_worker(name: str, args: argparse.Namespace, gguf: Path, text: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.eval_bench", "--worker", name, "--gguf", str(gguf), "--text", str(text),
           "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    # idle OpenMP threads must sleep, not spin: llama.cpp's and torch's thread pools share the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="Model (default: the bench model, built once).")
    parser.add_argument("--qtype", default="Q4_K", help="Type of the bench model when it is built.")
    parser.add_argument("--text", type=Path, default=None)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="Best of N evaluations per engine (one load).")
    parser.add_argument("--worker", choices=["llama", "rioquant"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = worker_llama if args.worker == "llama" else worker_rioquant
        print(json.dumps(fn(args.gguf, args.text, args.ctx, args.chunks, args.threads, args.repeats)))
        return
    gguf = args.gguf or bench_model(args.qtype)
    text = args.text or bench_text()
    print(f"model {gguf.name}, ctx {args.ctx}, {args.chunks} chunks, {args.threads} threads")
    results = [run_worker(name, args, gguf, text) for name in ("llama", "rioquant")]
    print(f"{'engine':<10} {'PPL':>14} {'tokens/s':>10} {'eval s':>8} {'load s':>7} {'peak RSS MB':>12}")
    for r in results:
        print(f"{r['engine']:<10} {r['ppl']:>14.6g} {r['tokens_per_s']:>10.1f} {r['eval_s']:>8.2f} {r['load_s']:>7.2f} "
              f"{r['peak_rss'] / 1e6:>12.0f}")
    llama, ours = results
    print(f"rioquant / llama.cpp: {ours['tokens_per_s'] / llama['tokens_per_s']:.2f}× tokens/s, "
          f"PPL ratio {ours['ppl'] / llama['ppl']:.5f}, peak RSS {ours['peak_rss'] / llama['peak_rss']:.2f}×")
    print("\nrioquant per layer (load = read + dequantize non-expert tensors; compute = all chunks):")
    print(f"{'layer':>5} {'kind':<7} {'weights MB':>10} {'load s':>7} {'compute s':>9} {'ms/token':>8}")
    for layer in ours["layers"]:
        print(f"{layer['layer']:>5} {layer['kind']:<7} {layer['weight_bytes'] / 1e6:>10.2f} {layer['load_s']:>7.3f} "
              f"{layer['compute_s']:>9.3f} {1e3 * layer['compute_s'] / ours['tokens']:>8.3f}")


if __name__ == "__main__":
    main()
