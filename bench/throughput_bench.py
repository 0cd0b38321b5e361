"""Throughput of a release: fixed costs, one read for many mixes, and read/quantize overlap.

1. First call: a fresh process imports rioquant and quantizes a small matrix into each type of the
   mixes, measuring its error in the same pass as a conversion does; every driver comes from Numba's
   cache, so this is the cost every `rioquant` process pays before its first tensor. Cache misses are counted.
2. Many mixes: `rioquant convert SRC --type A --type B ... -o DIR` (one read) against one
   `rioquant convert` per mix, and against llama.cpp's `convert_hf_to_gguf.py --outtype bf16` once
   plus `llama_model_quantize` per mix: wall time, peak RSS (wait4, per process; max over the steps)
   and bytes read (the processes' `rchar`; llama.cpp maps its inputs, so its reads are the files' sizes).
   Every one-pass output is checked byte for byte against its own run and against llama.cpp's.
3. Overlap: one mix converted with read-ahead off (stages timed: read, quantize) and on (wall).
   Overlapped, the wall time approaches max(read, quantize) rather than their sum.

    python -m bench.throughput_bench [--hidden 1024 --layers 4 --experts 16 --mixes Q4_K_M,Q3_K_M,Q5_K_M,Q6_K]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.convert_bench import bench_spec, run_measured_io
from rioquant.testing.checkpoints import KQUANT, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.llama_src import llama_cpp_source

FIRST_CALL = """
import json, time
start = time.perf_counter()
import numpy as np
from rioquant.kernels.driver import specialise
from rioquant.quant.error_sums import _quantize_sum_rows_over
from rioquant.quant.metrics import quantize_slice
from rioquant.quant.types import BLOCK_KERNELS, T
x = np.random.default_rng(0).standard_normal((64, 512), dtype=np.float32)
for name in {types!r}:
    quantize_slice(x, name)
elapsed = time.perf_counter() - start
drivers = [specialise(_quantize_sum_rows_over, BLOCK_KERNELS[T[name]].quantize_row, BLOCK_KERNELS[T[name]].dequantize_row)
           for name in {types!r}]
print(json.dumps({{"seconds": elapsed, "misses": sum(sum(d.stats.cache_misses.values()) for d in drivers)}}))
"""

QUANTIZE = """
import sys
from pathlib import Path
from gguf import LlamaFileType
from rioquant.testing.llama_quantize import llama_quantize
llama_quantize(Path(sys.argv[1]), Path(sys.argv[2]), LlamaFileType["MOSTLY_" + sys.argv[3]])
"""

OVERLAP = """
import json, sys, time
from pathlib import Path
from rioquant import fanout
from rioquant.convert import ConvertHooks, ConvertOptions, RunOptions, convert
spent = {"read": 0.0, "quantize": 0.0}
def timed(stage, call):
    def run(*args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            spent[stage] += time.perf_counter() - start
    return run
src, out, mix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
run = RunOptions(progress=False, force=True, report=False)
convert(src, out, ConvertOptions(qtype=mix), run)  # warm the page cache and Numba's
fanout.ReadStage.__call__ = timed("read", fanout.ReadStage.__call__)
fanout.QuantizeStage.__call__ = timed("quantize", fanout.QuantizeStage.__call__)
start = time.perf_counter()
convert(src, out, ConvertOptions(qtype=mix), run, ConvertHooks(prefetch_bytes=0))
serial = time.perf_counter() - start
stages = dict(spent)
start = time.perf_counter()
convert(src, out, ConvertOptions(qtype=mix), run)
print(json.dumps({**stages, "serial": serial, "overlapped": time.perf_counter() - start}))
"""


def rioquant_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rioquant", "convert", *args, "--no-progress", "--force"]


def first_call(types: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", FIRST_CALL.format(types=types)], capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"1. first call (import + quantize and measure {', '.join(types)}) in a fresh process: "
          f"{result['seconds']:.1f} s, drivers compiled: {result['misses']}\n")


def warm_numba(work: Path, mixes: list[str]) -> None:
    """Every mix of a tiny checkpoint in one untimed process: Numba's cache then holds every driver the
    timed runs use (a new checkout compiles them once, minutes on a busy 2-core machine)."""
    tiny = build_checkpoint(replace(KQUANT, num_hidden_layers=2, num_experts=4), work / "warm")
    subprocess.run(rioquant_cmd(str(tiny), "-o", str(work / "warm-out"), *[f"--type={m}" for m in mixes]), check=True,
                   stdout=subprocess.DEVNULL)


def many_mixes(src: Path, work: Path, mixes: list[str]) -> None:
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    warm_numba(work, mixes)
    rows = []
    one = work / "one-pass"
    wall, rss, read = run_measured_io(rioquant_cmd(str(src), "-o", str(one), *[f"--type={m}" for m in mixes]))
    rows.append(("rioquant, one read, all mixes", wall, rss, read))
    separate = work / "separate"
    separate.mkdir()
    runs = [run_measured_io(rioquant_cmd(str(src), "-o", str(separate / f"{m}.gguf"), "--type", m)) for m in mixes]
    rows.append((f"rioquant, {len(mixes)} runs", sum(r[0] for r in runs), max(r[1] for r in runs), sum(r[2] for r in runs)))
    tree = llama_cpp_source()
    bf16 = work / "llama-bf16.gguf"
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    conv = run_measured_io([sys.executable, str(tree / "convert_hf_to_gguf.py"), "--outtype", "bf16", "--outfile",
                            str(bf16), "--no-mtp", str(src)], env=env)
    quants = [run_measured_io([sys.executable, "-c", QUANTIZE, str(bf16), str(work / f"llama-{m}.gguf"), m]) for m in mixes]
    rows.append((f"llama.cpp convert + {len(mixes)} quantize", conv[0] + sum(q[0] for q in quants),
                 max([conv[1], *(q[1] for q in quants)]), src_bytes + len(mixes) * bf16.stat().st_size))
    print(f"2. {len(mixes)} mixes ({', '.join(mixes)}) of a {src_bytes / 1e9:.2f} GB BF16 checkpoint")
    print(f"{'':<36} {'wall s':>8} {'peak RSS GB':>12} {'read GB':>8}")
    for name, wall, rss, read in rows:
        print(f"{name:<36} {wall:>8.1f} {rss:>12.2f} {read / 1e9:>8.2f}")
    print(f"one pass vs separate runs: {rows[1][1] / rows[0][1]:.2f}x faster; vs llama.cpp: {rows[2][1] / rows[0][1]:.2f}x")
    same_runs = all((one / f"{src.resolve().name}-{m}.gguf").read_bytes() == (separate / f"{m}.gguf").read_bytes()
                    for m in mixes)
    print(f"one-pass outputs byte-identical to their own runs: {same_runs}")
    for m in mixes:  # llama.cpp's file has no MTP tensors (--no-mtp): compare the tensors both hold
        ours, theirs = scan(separate / f"{m}.gguf").tensors, scan(work / f"llama-{m}.gguf").tensors
        same = all(ours[n].qtype == t.qtype and ours[n].data == t.data for n, t in theirs.items())
        print(f"  {m}: tensors equal to llama-quantize's: {same}")
    print()


def overlap(src: Path, work: Path, mix: str) -> None:
    out = subprocess.run([sys.executable, "-c", OVERLAP, str(src), str(work / "overlap.gguf"), mix],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    bound = max(r["read"], r["quantize"])
    print(f"3. overlap ({mix}, page cache warm): read {r['read']:.1f} s, quantize {r['quantize']:.1f} s "
          f"(sum {r['read'] + r['quantize']:.1f}, max {bound:.1f}); read-ahead off {r['serial']:.1f} s, "
          f"on {r['overlapped']:.1f} s = {r['overlapped'] / bound:.2f} x max, "
          f"{r['overlapped'] / (r['read'] + r['quantize']):.2f} x sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--mixes", default="Q4_K_M,Q3_K_M,Q5_K_M,Q6_K")
    parser.add_argument("--only", choices=["first-call", "mixes", "overlap"], default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    mixes = args.mixes.split(",")
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.1f} at start ({time.strftime('%Y-%m-%d %H:%M')})\n")
    if args.only in (None, "first-call"):
        first_call(["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
    if args.only == "first-call":
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rioquant-throughput-"))
    src = build_checkpoint(bench_spec(args.hidden, args.layers, args.experts), work / "src")
    if args.only in (None, "mixes"):
        many_mixes(src, work, mixes)
    if args.only in (None, "overlap"):
        overlap(src, work, mixes[0])
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} at the end")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
