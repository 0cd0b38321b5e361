"""Quantizer throughput against ggml's own C code, in the same run (`make bench`).

For each type and path (no imatrix / imatrix): Mweights/s of rioquant and of ggml_quantize_chunk on a
4096×4096 float32 tensor, single thread and all threads, and the rioquant/ggml ratio. Absolute numbers
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
from rioquant.quant.types import BLOCK_KERNELS
from rioquant.testing.oracles import GgmlOracle

T = GGMLQuantizationType
ORDER = [T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K]


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
    parser.add_argument("--types", default=",".join(t.name for t in ORDER))
    args = parser.parse_args()
    oracle = GgmlOracle()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    qw = (rng.gamma(0.5, 2.0, args.cols) * 1e-2).astype(np.float32)
    n = x.size / 1e6
    all_threads = numba.config.NUMBA_NUM_THREADS
    print(f"{args.rows}x{args.cols} float32, {all_threads} cores; Mweights/s (higher is better)\n")
    header = f"{'type':<6} {'path':<8} {'first call s':>12} | {'1 thread: rq':>13} {'ggml':>8} {'ratio':>6} | {f'{all_threads} threads: rq':>15} {'ggml':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name in args.types.split(","):
        qtype = T[name]
        if qtype not in BLOCK_KERNELS:
            print(f"{name:<6} not implemented")
            continue
        for path, importance in (("plain", None), ("imatrix", qw)):
            start = time.perf_counter()
            quantize(x[:8], qtype, importance)
            first_call = time.perf_counter() - start
            ours = quantize(x, qtype, importance)
            ref = oracle.quantize(x, qtype, importance)
            if not np.array_equal(ours, ref):
                raise SystemExit(f"{name}/{path}: bytes differ from ggml; benchmark void")
            q, w = qtype, importance
            rq1 = n / best_of(lambda q=q, w=w: quantize(x, q, w, threads=1), args.repeats)
            gg1 = n / best_of(lambda q=q, w=w: oracle.quantize(x, q, w), args.repeats)
            rqn = n / best_of(lambda q=q, w=w: quantize(x, q, w), args.repeats)
            ggn = n / best_of(lambda q=q, w=w: ggml_threaded(oracle, x, q, w, all_threads), args.repeats)
            print(f"{name:<6} {path:<8} {first_call:>12.2f} | {rq1:>13.1f} {gg1:>8.1f} {rq1 / gg1:>5.2f}x |"
                  f" {rqn:>15.1f} {ggn:>8.1f} {rqn / ggn:>5.2f}x", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
