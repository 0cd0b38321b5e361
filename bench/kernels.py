"""Quantizer throughput against ggml's own C code, in the same run (`make bench`).

For each type and path (no imatrix / imatrix): Mweights/s of rioquant and of ggml_quantize_chunk on the
first rows of a 4096×4096 float32 tensor, single thread and all threads, and the rioquant/ggml ratio.
The slow types (the i-quants run at ~1 Mweights/s in ggml) take fewer rows, as many as ggml quantizes
in about --seconds on one thread; the types that need an imatrix run only with one. Absolute numbers
move ±40 % with machine load; the ratio measured side by side is what counts. Bytes are checked equal
on every run, so a fast wrong kernel cannot pass. The first-call (compile or cache-load) time is shown.
"""

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from gguf import GGMLQuantizationType

from rioquant.quant import quantize
from rioquant.quant.types import BLOCK_KERNELS, REQUIRES_IMATRIX
from rioquant.testing.oracles import GgmlOracle

T = GGMLQuantizationType
ORDER = [
    T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K, T.Q4_1,
    T.IQ4_XS, T.IQ4_NL, T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S,
]
PROBE_ROWS = 64


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ggml_threaded(oracle: GgmlOracle, x: np.ndarray, qtype, qw, threads: int) -> np.ndarray:
    """ggml with rows split across Python threads (ctypes drops the GIL), like llama-quantize's workers."""
    chunks = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(lambda c: oracle.quantize(c, qtype, qw), chunks)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="ggml's single-thread time to size slow types")
    parser.add_argument("--types", default=",".join(t.name for t in ORDER))
    args = parser.parse_args()
    oracle = GgmlOracle()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    qw = (rng.gamma(0.5, 2.0, args.cols) * 1e-2).astype(np.float32)
    all_threads = numba.config.NUMBA_NUM_THREADS
    print(f"{args.rows}x{args.cols} float32, {all_threads} cores; Mweights/s (higher is better)\n")
    header = f"{'type':<7} {'path':<8} {'rows':>5} {'first call s':>12} | {'1 thread: rq':>13} {'ggml':>8} {'ratio':>6} | {f'{all_threads} threads: rq':>15} {'ggml':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name in args.types.split(","):
        qtype = T[name]
        if qtype not in BLOCK_KERNELS:
            print(f"{name:<7} not implemented")
            continue
        paths = [("imatrix", qw)] if qtype in REQUIRES_IMATRIX else [("plain", None), ("imatrix", qw)]
        for path, importance in paths:
            start = time.perf_counter()
            quantize(x[:8], qtype, importance)
            first_call = time.perf_counter() - start
            oracle.quantize(x[:1], qtype, importance)  # ggml builds a lattice type's grid on first use: not in the probe
            probe = best_of(lambda q=qtype, w=importance: oracle.quantize(x[:PROBE_ROWS], q, w), 1)
            rows = int(min(args.rows, max(PROBE_ROWS, args.seconds / probe * PROBE_ROWS)))
            rows -= rows % all_threads
            xs = x[:rows]
            n = xs.size / 1e6
            ours = quantize(xs, qtype, importance)
            ref = oracle.quantize(xs, qtype, importance)
            if not np.array_equal(ours, ref):
                raise SystemExit(f"{name}/{path}: bytes differ from ggml; benchmark void")
            q, w = qtype, importance
            rq1 = n / best_of(lambda q=q, w=w, xs=xs: quantize(xs, q, w, threads=1), args.repeats)
            gg1 = n / best_of(lambda q=q, w=w, xs=xs: oracle.quantize(xs, q, w), args.repeats)
            rqn = n / best_of(lambda q=q, w=w, xs=xs: quantize(xs, q, w), args.repeats)
            ggn = n / best_of(lambda q=q, w=w, xs=xs: ggml_threaded(oracle, xs, q, w, all_threads), args.repeats)
            print(f"{name:<7} {path:<8} {rows:>5} {first_call:>12.2f} | {rq1:>13.1f} {gg1:>8.1f} {rq1 / gg1:>5.2f}x |"
                  f" {rqn:>15.1f} {ggn:>8.1f} {rqn / ggn:>5.2f}x", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
