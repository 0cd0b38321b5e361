"""What error tracking costs: `convert` on a K-quant-shaped tiny checkpoint with and without it.

Builds rioquant.testing.checkpoints.KQUANT (8 experts, MTP; about 150 M weights, dominated by the 248K-token
embedding and output matrices, like the real model's largest tensors), warms the Numba caches, then
converts it `--repeats` times each way, alternating, and reports the best times and their ratio.
The goal is tracking under 15 % of the conversion time. Absolute times move with machine load;
the ratio measured side by side is what counts, and the time spent inside the tracker itself
(measured in the same run, so immune to load between runs) is printed beside it.

    .venv/bin/python -m bench.report_overhead --types Q4_K,Q8_0 --repeats 3
"""

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.quant.metrics import TensorErrorTracker
from rioquant.testing.checkpoints import KQUANT, build_checkpoint


class TrackerClock:
    """Wall time spent in TensorErrorTracker.add (dequantize + reduce) during one conversion."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = TensorErrorTracker.add
        clock = self

        def timed_add(tracker, *args, **kwargs):
            start = time.perf_counter()
            try:
                return clock.original(tracker, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        TensorErrorTracker.add = timed_add


def timed_convert(src: Path, out: Path, qtype: str, report: bool, threads: int | None, clock: TrackerClock) -> tuple[float, float]:
    """(conversion seconds, of which inside the tracker)."""
    clock.seconds = 0.0
    start = time.perf_counter()
    convert(src, out, ConvertOptions(qtype=qtype), RunOptions(progress=False, force=True, report=report, threads=threads))
    return time.perf_counter() - start, clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_K,Q8_0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--src", type=Path, default=None, help="an existing checkpoint instead of KQUANT")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rq-bench-") as tmp:
        tmp = Path(tmp)
        src = args.src or build_checkpoint(replace(KQUANT, num_experts=8, mtp=True), tmp / "src")
        clock = TrackerClock()
        print(f"checkpoint {src}; best of {args.repeats}, seconds\n")
        print(f"{'type':<6} {'no report':>10} {'report':>10} {'overhead':>9} | {'in tracker':>10} {'share':>7}")
        for qtype in args.types.split(","):
            out = tmp / f"{qtype}.gguf"
            timed_convert(src, out, qtype, True, args.threads, clock)  # compile / load the Numba caches
            plain, tracked = [], []
            for _ in range(args.repeats):
                plain.append(timed_convert(src, out, qtype, False, args.threads, clock)[0])
                tracked.append(timed_convert(src, out, qtype, True, args.threads, clock))
            a = min(plain)
            b, inside = min(tracked)
            print(f"{qtype:<6} {a:>10.2f} {b:>10.2f} {100 * (b - a) / a:>8.1f}% | {inside:>10.2f} {100 * inside / b:>6.1f}%")


if __name__ == "__main__":
    main()
