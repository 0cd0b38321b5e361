"""`--ray`: conversion and evaluation on a Ray cluster give one machine's bytes and figures.

The cluster is three Ray nodes on this machine (`ray.cluster_utils.Cluster`): a head that runs no
task and two one-CPU workers, started once for the session. The checkpoint is TINY (float32 for the
evaluations, as tests/test_evaluate.py), so the time goes into Ray's start-up, not the model.

- convert (one task per tensor or expert slab): interrupted on the cluster, resumed on the cluster by a new driver while a worker node is
  killed (its tasks run again elsewhere), the GGUF equals the local one byte for byte, and so does the
  error report. From a GGUF (the nodes read it by its path; one output copies its tensors, the other
  quantizes them) and from ORG/REPO (a Hub double on localhost: each node fetches the shards itself,
  the workers of one machine share its cache) the bytes equal the local run's too.
- ppl / kld / imatrix: with the same --group-chunks, every figure equals the local run's exactly, and
  the imatrix file is byte-identical.
- Without Ray, `--ray` says in one line how to install it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from rioquant.cli import main
from rioquant.convert import ConvertHooks, ConvertOptions, RunOptions, convert, convert_many
from rioquant.evaluate.engine import EngineOptions
from rioquant.evaluate.pipelines import collect_imatrix, kl_divergence, perplexity
from rioquant.source import HubOptions
from rioquant.testing.checkpoints import TINY, build_checkpoint
from tests.faults import fails_on_call
from tests.hub_double import hub_double
from tests.test_evaluate import evaluation_text

CTX = 64
CHUNKS = 4
GROUP = 2  # chunks per task: two tasks, one per worker node


def add_node(cluster, attempts: int = 3, **args):
    """A node (the first one added is the head); Ray gives a node 30 s to register, which a loaded 2-core
    machine can miss, so it is tried again."""
    for attempt in range(attempts):
        try:
            return cluster.add_node(**args)
        except Exception:  # Ray raises a bare Exception: "The current node timed out during startup"
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="session")
def cluster():
    """Head (no CPUs: it only schedules) + two one-CPU worker nodes; the driver is this process."""
    ray = pytest.importorskip("ray", reason="the `ray` extra (pip install 'rioquant[ray]')")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")  # each node's agent starts slowly under load
    # Ray refuses to create objects once its disk is 95% used; a shared test machine's disk can be, while
    # this session's objects (a TINY model's quantized tensors) need a few MB
    os.environ.setdefault("RAY_local_fs_capacity_threshold", "0.9999")
    c = Cluster()
    add_node(c, num_cpus=0, include_dashboard=False)
    for _ in range(2):
        add_node(c, num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def models(module_tmp) -> SimpleNamespace:
    root = module_tmp("ray")
    hf = build_checkpoint(replace(TINY, dtype="float32", mtp=True, shards=2), root / "hf")
    text = root / "topics.txt"
    text.write_text(evaluation_text(20_000))
    return SimpleNamespace(root=root, hf=hf, text=text)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report_tensors(gguf: Path) -> list:
    return json.loads(gguf.with_suffix(".report.json").read_text())["tensors"]


QUIET = RunOptions(progress=False)


@pytest.mark.slow
def test_convert_on_cluster_resumed_with_a_node_killed_equals_local(cluster, models, tmp_path):
    options = ConvertOptions(qtype="Q4_0")
    (local,) = convert(models.hf, tmp_path / "local.gguf", options, QUIET)
    out = tmp_path / "cluster.gguf"
    on_cluster = replace(QUIET, ray=cluster.address)
    with pytest.raises(KeyboardInterrupt):  # the driver stops midway, like ^C
        convert(models.hf, out, options, on_cluster, ConvertHooks(on_tensor=fails_on_call(6, KeyboardInterrupt())))

    killed = []

    def kill_a_worker(*_) -> None:
        """Before the new driver's first write a worker node dies with tasks out (the writer thread calls this)."""
        if not killed:
            killed.append(cluster.list_all_nodes()[-1])
            cluster.remove_node(killed[0], allow_graceful=False)

    try:
        (resumed,) = convert(models.hf, out, options, replace(on_cluster, resume=True),
                             ConvertHooks(on_tensor=kill_a_worker))
    finally:
        add_node(cluster, num_cpus=1)  # the session's later tests get two workers again
    assert killed
    assert sha256(resumed) == sha256(local)
    assert report_tensors(resumed) == report_tensors(local)


@pytest.fixture(scope="module")
def q8(models) -> Path:
    (path,) = convert(models.hf, models.root / "tiny-Q8_0.gguf", ConvertOptions(qtype="Q8_0"), QUIET)
    return path


@pytest.mark.slow
def test_convert_from_a_gguf_on_cluster_equals_local(cluster, q8, tmp_path):
    """Q8_0 → [Q8_0, Q4_0]: the nodes copy the first output's tensors from the file and dequantize and
    quantize the second's."""
    mixes = [ConvertOptions(qtype="Q8_0"), ConvertOptions(qtype="Q4_0")]
    runs = [convert_many(q8, [(tmp_path / where / f"{o.qtype}.gguf", o) for o in mixes], run)
            for where, run in (("local", QUIET), ("cluster", replace(QUIET, ray=cluster.address)))]
    assert [sha256(files[0]) for files in runs[1]] == [sha256(files[0]) for files in runs[0]]
    assert report_tensors(runs[1][1][0]) == report_tensors(runs[0][1][0])


@pytest.mark.slow
def test_convert_from_the_hub_on_cluster_equals_local(cluster, models, monkeypatch, tmp_path):
    """The nodes fetch the shards from the Hub the driver used (the double's URL, which their own
    huggingface_hub does not know), each shard once: the two workers share this machine's cache."""
    repo = f"tiny-org/{models.hf.name}"  # general.name comes from the folder: the local run's name
    options = ConvertOptions(qtype="Q4_0")
    (local,) = convert(models.hf, tmp_path / "local.gguf", options, QUIET)
    cache = tmp_path / "cache"
    with hub_double(monkeypatch, max_requests=400, lifetime_s=600) as hub:
        hub.serve(repo, {f.name: f.read_bytes() for f in models.hf.iterdir()})
        (ours,) = convert(repo, tmp_path / "hub.gguf", options,
                          replace(QUIET, ray=cluster.address, hub=HubOptions(cache)))
    assert sha256(ours) == sha256(local)
    assert report_tensors(ours) == report_tensors(local)
    shards = sorted(f.name for f in models.hf.glob("*.safetensors"))
    assert sorted(n for n in hub.state.downloads if n.endswith(".safetensors")) == shards
    assert all((cache / repo / shard).is_file() for shard in shards)  # kept for later tasks and runs
    assert hub.state.unexpected == []


@pytest.mark.slow
def test_ppl_and_kld_on_cluster_equal_local(cluster, models, q8):
    local = EngineOptions(progress=False, group_chunks=GROUP, threads=1)
    on_cluster = replace(local, ray=cluster.address)
    assert perplexity(q8, models.text, CTX, CHUNKS, on_cluster) == perplexity(q8, models.text, CTX, CHUNKS, local)
    kld = [kl_divergence(models.hf, q8, models.text, CTX, CHUNKS, o) for o in (local, on_cluster)]
    assert kld[0] == kld[1]
    assert kld[0]["tokens_scored"] == CHUNKS * (CTX - 1 - CTX // 2)


@pytest.mark.slow
def test_imatrix_on_cluster_is_byte_identical(cluster, models, tmp_path):
    local = EngineOptions(progress=False, group_chunks=GROUP, threads=1)
    files = [tmp_path / "local.gguf", tmp_path / "cluster.gguf"]
    results = [collect_imatrix(models.hf, models.text, f, CTX, CHUNKS, o, process_output=True)
               for f, o in zip(files, (local, replace(local, ray=cluster.address)), strict=True)]
    assert results[0]["entries"] == results[1]["entries"] > 0
    assert sha256(files[0]) == sha256(files[1])


@pytest.mark.parametrize("command", [["convert", "{src}", "-o", "{out}"], ["ppl", "{src}", "--text", "{text}"]])
def test_without_ray_the_error_says_how_to_install(models, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    argv = [a.format(src=models.hf, out=tmp_path / "x.gguf", text=models.text) for a in command]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--ray"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1
    assert "pip install 'rioquant[ray]'" in err and not (tmp_path / "x.gguf").exists()
