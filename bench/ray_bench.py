"""`convert --ray` on this machine: task overhead against a local run, scaling with node count, and a
paper estimate for the 397B on N nodes from measured per-type quantization costs.

1. The bench checkpoint (a KQUANT-shaped model, sized by the flags) converted to --type locally (all
   cores, then one thread) and on Ray clusters of 1, 2, 3 one-CPU worker nodes started on this machine
   (`ray.cluster_utils.Cluster`, a head that runs no task), each output checked byte for byte against
   the local one. Overhead = (1-node cluster − local 1 thread) / tasks.
2. Per-type cost: seconds per million weights of read + transform + quantize, one thread, timing what
   one cluster task runs (fanout's ReadStage + QuantizeStage) item by item: a tensor or an expert slab.
3. The 397B (tests/data/rio-3.5-open-397b/config.json, planned without weights) on N nodes of C cores:
   compute = Σ weights × cost(type) / (N·C), bounded below by the largest task; the driver receives
   and writes the whole output once (network and disk bandwidths are stated assumptions).

Run: `python -m bench.ray_bench [--hidden 512 --layers 4 --experts 32 --type Q4_K_M]`.
"""

import argparse
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from rioquant.convert import ROW_BLOCK_BYTES, ConvertOptions, RunOptions, build_plan, convert
from rioquant.export.tensor_map import TensorSpec
from rioquant.fanout import QuantizeStage, ReadStage, WorkItem
from rioquant.testing.checkpoints import KQUANT, build_checkpoint

CONFIG_397B = Path(__file__).resolve().parent.parent / "tests" / "data" / "rio-3.5-open-397b"
NODE_CORES = 32  # paper nodes: 32 cores each …
NETWORK_GBPS = 1.25  # … 10 Gb/s to the driver …
DRIVER_DISK_GBPS = 2.0  # … and an NVMe the driver writes the GGUF to


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def tasks_of(spec: TensorSpec) -> int:
    """Cluster tasks of a tensor: one per expert slab of an expert stack, else one (fanout.work_items)."""
    return len(spec.pieces) if spec.is_expert_stack else 1


def per_type_costs(src: Path, qtype: str) -> dict[str, float]:
    """Seconds per million weights of each type in the mix, one thread: what one task does (read +
    transform + quantize of a tensor or an expert slab), timed item by item."""
    plan = build_plan(src, ConvertOptions(qtype=qtype))
    read = ReadStage(plan.source)
    quantize = QuantizeStage(plan.source, [plan.entries], [None], [False], ROW_BLOCK_BYTES, 1)
    seconds, weights = defaultdict(float), defaultdict(int)
    for i, (spec, entry) in enumerate(zip(plan.specs, plan.entries, strict=True)):
        for expert in range(len(spec.pieces)) if spec.is_expert_stack else [None]:
            item = WorkItem(i, expert, True, (0,), (), 0)
            t, _ = timed(lambda item=item: quantize(item, read(item)))
            seconds[entry.qtype] += t
        weights[entry.qtype] += math.prod(entry.shape)
    return {t: seconds[t] / weights[t] * 1e6 for t in seconds}


def cluster_run(src: Path, out: Path, qtype: str, nodes: int) -> float:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        # a first small run so every worker has imported rioquant and loaded Numba's cache
        convert(src, out, ConvertOptions(qtype=qtype), RunOptions(progress=False, force=True, report=False,
                                                                 ray=cluster.address))
        t, _ = timed(convert, src, out, ConvertOptions(qtype=qtype),
                     RunOptions(progress=False, force=True, report=False, ray=cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return t


def estimate_397b(costs: dict[str, float], qtype: str, task_overhead_s: float) -> None:
    plan = build_plan(CONFIG_397B, ConvertOptions(qtype=qtype), weights_optional=True)
    missing = {e.qtype for e in plan.entries} - costs.keys()
    if missing:
        print(f"(no measured cost for {sorted(missing)}: counted at the slowest measured type)")
    slowest = max(costs.values())
    compute_s = sum(math.prod(e.shape) * costs.get(e.qtype, slowest) / 1e6 for e in plan.entries)
    tasks = sum(tasks_of(s) for s in plan.specs)
    largest = max(math.prod(e.shape) * costs.get(e.qtype, slowest) / 1e6 / tasks_of(s)
                  for s, e in zip(plan.specs, plan.entries, strict=True))
    out_gb = plan.total_bytes / 1e9
    write_s = out_gb / min(NETWORK_GBPS, DRIVER_DISK_GBPS)
    print(f"\n397B {qtype}: {len(plan.entries)} tensors → {tasks} tasks, {out_gb:.1f} GB out; one core: "
          f"{compute_s / 3600:.1f} h of quantization; largest task {largest:.0f} s")
    print(f"paper nodes: {NODE_CORES} cores, {NETWORK_GBPS} GB/s to the driver, driver disk {DRIVER_DISK_GBPS} GB/s "
          f"(driver floor: {write_s / 60:.1f} min to receive and write)")
    print(f"{'nodes':>5} {'compute min':>12} {'overhead min':>13} {'estimate min':>13}")
    for n in (1, 2, 4, 8, 16, 32):
        cores = n * NODE_CORES
        compute = max(compute_s / cores, largest)
        overhead = tasks * task_overhead_s / cores
        print(f"{n:>5} {compute / 60:>12.1f} {overhead / 60:>13.2f} {max(compute + overhead, write_s) / 60:>13.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--type", dest="qtype", default="Q4_K_M")
    parser.add_argument("--max-nodes", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rioquant-ray-bench-"))
    spec = replace(KQUANT, hidden_size=args.hidden, num_hidden_layers=args.layers, num_experts=args.experts,
                   num_experts_per_tok=8, moe_intermediate_size=args.hidden // 2,
                   shared_expert_intermediate_size=args.hidden // 2)
    src = build_checkpoint(spec, work / "src")
    plan = build_plan(src, ConvertOptions(qtype=args.qtype))
    tasks = sum(tasks_of(s) for s in plan.specs)
    print(f"checkpoint: {sum(f.stat().st_size for f in src.glob('*.safetensors')) / 1e9:.2f} GB, "
          f"{len(plan.entries)} tensors → {tasks} tasks, {os.cpu_count()} cores on this machine\n")

    local = work / "local.gguf"
    options = ConvertOptions(qtype=args.qtype)
    convert(src, local, options, RunOptions(progress=False, force=True, report=False))  # warm: Numba cache, page cache
    rows = []
    t_all, _ = timed(convert, src, local, options, RunOptions(progress=False, force=True, report=False))
    rows.append(("local, all cores", t_all, True))
    t_one, _ = timed(convert, src, local, options, RunOptions(progress=False, force=True, report=False, threads=1))
    rows.append(("local, 1 thread", t_one, True))
    reference = sha256(local)
    cluster_times = {}
    for nodes in range(1, args.max_nodes + 1):
        out = work / f"ray{nodes}.gguf"
        cluster_times[nodes] = cluster_run(src, out, args.qtype, nodes)
        rows.append((f"ray, {nodes} node{'s' if nodes > 1 else ''} × 1 CPU", cluster_times[nodes], sha256(out) == reference))
    print(f"{'run':<24} {'wall s':>8} {'identical':>10}")
    for name, t, same in rows:
        print(f"{name:<24} {t:>8.1f} {str(same):>10}")
    overhead = (cluster_times[1] - t_one) / tasks
    print(f"\ntask overhead (1 node vs local 1 thread): {overhead * 1e3:.0f} ms per task")
    print(f"scaling 1 → {args.max_nodes} nodes: {cluster_times[1] / cluster_times[args.max_nodes]:.2f}x "
          f"(this machine has {os.cpu_count()} cores shared with other jobs: no scaling is expected)")

    costs = per_type_costs(src, args.qtype)
    print("\nper-type cost, one thread (read + transform + quantize): " +
          ", ".join(f"{t} {s:.3f} s/M weights" for t, s in sorted(costs.items())))
    estimate_397b(costs, args.qtype, max(overhead, 0.0))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
