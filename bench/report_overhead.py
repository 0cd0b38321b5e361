"""What error tracking costs: `convert` on a K-quant-shaped tiny checkpoint with and without it.

Builds rioquant.testing.checkpoints.KQUANT (8 experts, MTP; about 150 M weights, dominated by the 248K-token
embedding and output matrices, like the real model's largest tensors), warms the Numba caches, then
converts it `--repeats` times each way, alternating, and reports the best times and their ratio.
The goal is tracking under 5 % of the conversion time. Absolute times move with machine load;
the ratio measured side by side is what counts. Each row is measured in the quantize pass itself
(api.quantize_measured), so its cost is no separate call: the seconds spent in the quantize stage
(fanout.QuantizeStage, the critical path of the CPU work) are printed for both ways, and their
difference as a share of the conversion with the report. On a shared machine whole conversions
vary by more than that; the last column is steadier: every work item of one conversion quantized
twice, with and without measuring, back to back in alternating order (load cancels out), best of
`--repeats`, and what measuring adds as a share of the conversion with the report.

`--fresh` runs each conversion as a new `rioquant convert` process instead, as a user does: that
includes what the report costs once per process (loading its Numba drivers; compiling them, before
they were cached, was most of the 17 % a user saw on a 2.7 GB checkpoint).

    .venv/bin/python -m bench.report_overhead --types Q4_K,Q8_0 --repeats 3 [--fresh]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rioquant import fanout
from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.testing.checkpoints import KQUANT, build_checkpoint


class StageClock:
    """Wall time spent in the quantize stage (quantizing, and measuring when reported) during one conversion."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original = fanout.QuantizeStage.__call__
        clock = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        fanout.QuantizeStage.__call__ = timed


def paired_stage(src: Path, out: Path, qtype: str, threads: int | None, repeats: int) -> tuple[float, float]:
    """(quantize stage seconds without, with measuring) over every work item of one conversion, item by item."""
    calls = []
    timed = fanout.QuantizeStage.__call__

    def keep(stage, item, rows):
        calls.append((stage, item, rows))
        return timed(stage, item, rows)

    fanout.QuantizeStage.__call__ = keep
    try:
        convert(src, out, ConvertOptions(qtype=qtype), RunOptions(progress=False, force=True, threads=threads))
    finally:
        fanout.QuantizeStage.__call__ = timed
    stages = [replace(calls[0][0], reports=[measure]) for measure in (False, True)]
    best = [float("inf")] * 2
    for rep in range(repeats):
        seconds = [0.0, 0.0]
        for _, item, rows in calls:
            for way in (0, 1) if rep % 2 == 0 else (1, 0):
                start = time.perf_counter()
                stages[way](item, rows)
                seconds[way] += time.perf_counter() - start
        best = [min(b, s) for b, s in zip(best, seconds, strict=True)]
    return best[0], best[1]


def timed_convert(src: Path, out: Path, qtype: str, report: bool, threads: int | None, clock: StageClock,
                  fresh: bool = False) -> tuple[float, float]:
    """(conversion seconds, of which in the quantize stage; nan for a fresh process, which this one cannot see into)."""
    clock.seconds = 0.0
    start = time.perf_counter()
    if fresh:
        subprocess.run([sys.executable, "-m", "rioquant", "convert", str(src), "-o", str(out), "--type", qtype, "--force",
                        "--no-progress", *([] if report else ["--no-report"]),
                        *([] if threads is None else ["--threads", str(threads)])], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start, float("nan")
    convert(src, out, ConvertOptions(qtype=qtype), RunOptions(progress=False, force=True, report=report, threads=threads))
    return time.perf_counter() - start, clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_K,Q8_0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--src", type=Path, default=None, help="an existing checkpoint instead of KQUANT")
    parser.add_argument("--fresh", action="store_true", help="each conversion a new rioquant process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rq-bench-") as tmp:
        tmp = Path(tmp)
        src = args.src or build_checkpoint(replace(KQUANT, num_experts=8, mtp=True), tmp / "src")
        clock = StageClock()
        print(f"checkpoint {src}; best of {args.repeats}, seconds\n")
        print(f"{'type':<6} {'no report':>10} {'report':>10} {'overhead':>9} | quantize stage: {'plain':>6} {'report':>7} "
              f"{'share':>6} | item by item: {'plain':>6} {'report':>7} {'share':>6}")
        for qtype in args.types.split(","):
            out = tmp / f"{qtype}.gguf"
            timed_convert(src, out, qtype, True, args.threads, clock)  # compile / load the Numba caches
            timed_convert(src, out, qtype, False, args.threads, clock)
            plain, tracked = [], []
            for _ in range(args.repeats):
                plain.append(timed_convert(src, out, qtype, False, args.threads, clock, args.fresh))
                tracked.append(timed_convert(src, out, qtype, True, args.threads, clock, args.fresh))
            (a, stage_a), (b, stage_b) = min(plain), min(tracked)
            item_a, item_b = paired_stage(src, out, qtype, args.threads, args.repeats)
            print(f"{qtype:<6} {a:>10.2f} {b:>10.2f} {100 * (b - a) / a:>8.1f}% | {'':>15} {stage_a:>6.2f} {stage_b:>7.2f} "
                  f"{100 * (stage_b - stage_a) / b:>5.1f}% | {'':>13} {item_a:>6.2f} {item_b:>7.2f} "
                  f"{100 * (item_b - item_a) / b:>5.1f}%")


if __name__ == "__main__":
    main()
