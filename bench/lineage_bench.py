"""`rioquant lineage` read speed against reading the same files with nothing else, in the same run.

Three synthetic checkpoints (a parent B from rioquant.testing.checkpoints, a parent A = B + a task vector, a child
bf16(0.6·A + 0.4·B)) are written once under --dir. Then, alternately, the page cache is emptied for
their files (posix_fadvise DONTNEED after fsync: a cold read, as on a 3 × 807 GB comparison no cache
holds) and either
  raw      every file read start to end in 16 MB reads, one thread per model, nothing else; or
  lineage  `rioquant lineage CHILD --parent A --parent B --threads 3` in this process, every statistic
           included (three threads, as the raw read: on a shared machine the thread count sets the share).
Speed is bytes of the three models / wall seconds. The bar: lineage ≥ 0.8 × raw.
Run: `python -m bench.lineage_bench [--hidden 512 --layers 8 --experts 32] [--warm]`.
"""

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from rioquant.lineage.pipeline import LineageOptions, analyse
from rioquant.testing.checkpoints import KQUANT, build_checkpoint
from rioquant.testing.lineage_models import blend_f32, fine_tune, load, save

CHUNK = 16 << 20
BAR = 0.8


def model_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folders: list[Path]) -> None:
    """Drop the files' pages from the page cache (they are clean: written and fsynced by build)."""
    for path in (p for f in folders for p in model_files(f)):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(folder: Path) -> int:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    for path in model_files(folder):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def raw_read(folders: list[Path]) -> tuple[int, float, float]:
    """(bytes, wall seconds, CPU seconds of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=len(folders)) as pool:
        total = sum(pool.map(read_all, folders))
    return total, time.perf_counter() - start, time.process_time() - cpu


def lineage_read(child: Path, parents: list[Path]) -> tuple[int, float, float, str]:
    start, cpu = time.perf_counter(), time.process_time()
    threads = 1 + len(parents)  # as many threads as the raw read has: a fair share of a busy machine
    report = analyse(str(child), [str(p) for p in parents], LineageOptions(progress=False, threads=threads))
    return report["bytes_read"], time.perf_counter() - start, time.process_time() - cpu, report["verdict"]


def build(root: Path, spec) -> tuple[Path, Path, Path]:
    """B (the checkpoint builder's), A = B + task vector, child = bf16(0.6·A + 0.4·B); written once."""
    b_dir, a_dir, child_dir = root / "B", root / "A", root / "child"
    if not (child_dir / "config.json").is_file():
        build_checkpoint(spec, b_dir)
        b, config = load(b_dir)
        a = fine_tune(b, "bench")
        save(a_dir, a, config)
        save(child_dir, {name: blend_f32(a[name], b[name], 0.6) for name in a}, config)
    for folder in (b_dir, a_dir, child_dir):
        for path in model_files(folder):
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return child_dir, a_dir, b_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="raw/lineage pairs, alternated")
    parser.add_argument("--warm", action="store_true", help="leave the page cache alone (files read from RAM)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "rioquant-lineage-bench")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = replace(KQUANT, hidden_size=args.hidden, num_hidden_layers=args.layers, num_experts=args.experts,
                   expert_layout="fused")
    root = args.dir / f"h{args.hidden}-l{args.layers}-e{args.experts}"
    started = time.perf_counter()
    child, a, b = build(root, spec)
    folders = [child, a, b]
    size = sum(p.stat().st_size for f in folders for p in model_files(f))
    print(f"models: 3 × {size / 3e9:.2f} GB ({root}; built in {time.perf_counter() - started:.0f} s)")
    raw_speeds, lineage_speeds, cpu_speeds = [], [], []
    for round_ in range(args.rounds):
        if not args.warm:
            evict(folders)
        n, seconds, cpu = raw_read(folders)
        raw_speeds.append(n / seconds / 1e9)
        if not args.warm:
            evict(folders)
        n_lineage, seconds_lineage, cpu_lineage, verdict = lineage_read(child, [a, b])
        lineage_speeds.append(n_lineage / seconds_lineage / 1e9)
        cpu_speeds.append(n_lineage / cpu_lineage / 1e9)
        print(f"round {round_ + 1}: raw {n / 1e9:.2f} GB in {seconds:.2f} s = {raw_speeds[-1]:.2f} GB/s "
              f"(CPU {cpu:.1f} s); lineage {n_lineage / 1e9:.2f} GB in {seconds_lineage:.2f} s = "
              f"{lineage_speeds[-1]:.2f} GB/s (CPU {cpu_lineage:.1f} s: {cpu_speeds[-1]:.2f} GB per CPU-second) "
              f"→ {verdict}")
    raw, lineage = statistics.median(raw_speeds), statistics.median(lineage_speeds)
    ratio = lineage / raw
    cache = "warm page cache" if args.warm else "cold reads"
    print(f"median over {args.rounds} rounds ({cache}): raw {raw:.2f} GB/s, lineage {lineage:.2f} GB/s: "
          f"{ratio:.2f}× raw — {'meets' if ratio >= BAR else 'misses'} the {BAR}× bar; "
          f"lineage computes {statistics.median(cpu_speeds):.2f} GB per CPU-second "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
