"""Conversion of a multi-GB synthetic checkpoint to Q4_K: rioquant's one pass vs llama.cpp's two steps.

llama.cpp's pipeline is its own converter (`convert_hf_to_gguf.py --outtype bf16`) followed by
`llama_model_quantize` (pure Q4_K, so both produce the same types). Each step runs in its own process,
timed, with its peak RSS taken from the kernel (wait4); the disk each pipeline needs is the sum of its
files alive at once. Both outputs are checked tensor for tensor, so speed is never bought with
different bytes. Run: `python -m bench.convert_bench [--hidden 1024 --layers 12 --experts 48]`.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rioquant.testing.checkpoints import KQUANT, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.llama_src import llama_cpp_source

QUANTIZE_PURE_Q4_K = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = 14  # LLAMA_FTYPE_MOSTLY_Q4_K_S, with pure: every quantizable tensor Q4_K
p.pure = True
p.nthread = {threads}
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


# The measured command is started by a fresh, small Python that forks it and reports its wait4 peak RSS:
# on Linux a child's ru_maxrss starts from the memory image it was forked (or vforked) from, so
# measuring straight from this process, which holds the synthetic checkpoint while building it,
# would report our own peak for every step. Before reaping, it reads the child's /proc/PID/io `rchar`:
# the bytes it read through read calls (page cache included; mmap'ed reads are not counted).
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)\n"
    "io = dict(line.split(': ') for line in open(f'/proc/{pid}/io').read().splitlines())\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write(f'\\nmaxrss_kib={usage.ru_maxrss} rchar={io[\"rchar\"]}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured_io(args: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GB, bytes read) of one child process."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=log).returncode
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    if code != 0:
        raise SystemExit(f"{args[:4]} failed: {text[-2000:]}")
    rss, rchar = text.rsplit("maxrss_kib=", 1)[1].split()
    return wall, int(rss) * 1024 / 1e9, int(rchar.removeprefix("rchar="))  # ru_maxrss is in KiB on Linux


def run_measured(args: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process."""
    return run_measured_io(args, env)[:2]


def bench_spec(hidden: int, layers: int, experts: int):
    """The bench checkpoint's shape: the 397B's proportions (8 of many experts, 128-wide heads), scaled down."""
    return replace(
        KQUANT, hidden_size=hidden, num_hidden_layers=layers, num_experts=experts,
        num_experts_per_tok=8, moe_intermediate_size=hidden // 2, shared_expert_intermediate_size=hidden // 2,
        num_attention_heads=8, head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=48)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rioquant-bench-"))
    src = build_checkpoint(bench_spec(args.hidden, args.layers, args.experts), work / "src")
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    threads = os.cpu_count() or 1
    print(f"checkpoint: {src_bytes / 1e9:.2f} GB BF16, {threads} threads\n")

    ours = work / "rioquant-Q4_K.gguf"
    t_ours, rss_ours = run_measured([sys.executable, "-m", "rioquant", "convert", str(src), "-o", str(ours),
                                     "--type", "Q4_K", "--no-progress", "--force"])

    tree = llama_cpp_source()
    bf16 = work / "llama-bf16.gguf"
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    t_conv, rss_conv = run_measured([sys.executable, str(tree / "convert_hf_to_gguf.py"), "--outtype", "bf16",
                                     "--outfile", str(bf16), "--no-mtp", str(src)], env=env)
    bf16_bytes = bf16.stat().st_size
    theirs = work / "llama-Q4_K.gguf"
    t_quant, rss_quant = run_measured([sys.executable, "-c", QUANTIZE_PURE_Q4_K.format(threads=threads),
                                       str(bf16), str(theirs)])

    a, b = scan(ours).tensors, scan(theirs).tensors
    same = a.keys() == b.keys() and all(a[n].qtype == b[n].qtype and a[n].data == b[n].data for n in a)
    out_bytes = ours.stat().st_size
    t_llama = t_conv + t_quant
    print(f"{'pipeline':<34} {'wall s':>8} {'peak RSS GB':>12} {'disk GB':>8}")
    print(f"{'rioquant convert --type Q4_K':<34} {t_ours:>8.1f} {rss_ours:>12.2f} {out_bytes / 1e9:>8.2f}")
    print(f"{'llama.cpp convert → BF16':<34} {t_conv:>8.1f} {rss_conv:>12.2f} {bf16_bytes / 1e9:>8.2f}")
    print(f"{'llama.cpp quantize BF16 → Q4_K':<34} {t_quant:>8.1f} {rss_quant:>12.2f} {(bf16_bytes + theirs.stat().st_size) / 1e9:>8.2f}")
    print(f"\nwall time ratio llama.cpp / rioquant: {t_llama / t_ours:.2f}x")
    print(f"peak RSS ratio llama.cpp (max of steps) / rioquant: {max(rss_conv, rss_quant) / rss_ours:.2f}x")
    print(f"disk: rioquant {out_bytes / 1e9:.2f} GB, llama.cpp {(bf16_bytes + theirs.stat().st_size) / 1e9:.2f} GB at peak")
    print(f"tensor bytes identical: {same}")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
