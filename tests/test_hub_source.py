"""`convert ORG/REPO`: a checkpoint streamed from the Hub (a local double) through a bounded cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import rioquant.source.hub as hub_module
from rioquant.convert import ConvertHooks, ConvertOptions, RunOptions, build_plan, convert
from rioquant.errors import CheckpointError
from rioquant.source import HubOptions
from rioquant.testing.checkpoints import TINY, build_checkpoint
from tests.hub_double import HubDouble
from tests.test_convert_reliability import run_cli

REPO = "tiny-org/Tiny-MoE"
CACHE_MAX = 75 * 10**6  # ~100 MB in all; the plan needs ~30 MB of config and tokenizer + ~33 MB of shards at once
OPTIONS = ConvertOptions(qtype="Q8_0")


def _reshard(single: Path, out: Path) -> Path:
    """save_pretrained's layout: contiguous runs of the state dict (embeddings, layers, norm + head, MTP),
    so a stream can drop a shard once its layers are written."""
    tensors = load_file(str(single / "model.safetensors"))
    groups = [lambda n: "embed_tokens" in n, lambda n: ".layers.0." in n or ".layers.1." in n,
              lambda n: ".layers.2." in n or ".layers.3." in n or n.startswith("mtp."),
              lambda n: n in ("model.norm.weight", "lm_head.weight")]
    out.mkdir(parents=True)
    for f in single.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    weight_map = {}
    for i, belongs in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {n: t for n, t in tensors.items() if belongs(n)}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    assert weight_map.keys() == tensors.keys()
    import json

    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub-src")
    return _reshard(build_checkpoint(replace(TINY, mtp=True), root / "single"), root / "Tiny-MoE")


@pytest.fixture(scope="module")
def local_q8(checkpoint, tmp_path_factory) -> Path:
    (out,) = convert(checkpoint, tmp_path_factory.mktemp("local") / "m.gguf", OPTIONS, RunOptions(progress=False, report=False))
    return out


@pytest.fixture
def hub(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    with HubDouble(max_requests=400, lifetime_s=600) as double:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", double.url)  # HF_ENDPOINT, read at import
        monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                            double.url + "/{repo_id}/resolve/{revision}/{filename}")
        double.serve(REPO, {f.name: f.read_bytes() for f in checkpoint.iterdir()})
        yield double


@pytest.fixture
def disk_watch(monkeypatch):
    """The cache folder's size after every download, measured here (not by the code under test)."""
    sizes: list[int] = []
    download = hub_module.hf_hub_download

    def measured(*args, local_dir, **kwargs):
        path = download(*args, local_dir=local_dir, **kwargs)
        sizes.append(sum(p.stat().st_size for p in Path(local_dir).rglob("*") if p.is_file()))
        return path

    monkeypatch.setattr(hub_module, "hf_hub_download", measured)
    return sizes


def _shard_gets(hub: HubDouble) -> dict[str, int]:
    """How often each shard was downloaded whole (header range reads not counted)."""
    counts: dict[str, int] = {}
    for name in hub.state.downloads:
        if name.endswith(".safetensors"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_streamed_conversion_equals_local_and_stays_under_cache_max(hub, disk_watch, local_q8, checkpoint, tmp_path):
    cache = tmp_path / "cache"
    run = RunOptions(progress=False, report=False, hub=HubOptions(cache, CACHE_MAX))
    (out,) = convert(REPO, tmp_path / "m.gguf", OPTIONS, run)
    assert out.read_bytes() == local_q8.read_bytes()
    total = sum(f.stat().st_size for f in checkpoint.iterdir())
    assert max(disk_watch) <= CACHE_MAX < total, (max(disk_watch), total)
    assert not list((cache / REPO).glob("*.safetensors"))  # every shard deleted once converted
    assert _shard_gets(hub) == dict.fromkeys(sorted(p.name for p in checkpoint.glob("*.safetensors")), 1)
    assert hub.state.unexpected == []


def test_kill_then_resume_fetches_only_what_is_left_and_refetches_a_truncated_shard(hub, local_q8, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "m.gguf"
    run = RunOptions(progress=False, report=False, hub=HubOptions(cache, CACHE_MAX))

    def kill_at_blk0_ssm_out(entry):
        if entry.name == "blk.0.ssm_out.weight":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(REPO, out, OPTIONS, run, ConvertHooks(on_tensor=kill_at_blk0_ssm_out))
    present = sorted((cache / REPO).glob("*.safetensors"))
    assert [p.name for p in present] == ["model-00002-of-00004.safetensors"]  # the shard being converted
    with open(present[0], "r+b") as f:
        f.truncate(present[0].stat().st_size // 2)
    before = _shard_gets(hub)
    (resumed,) = convert(REPO, out, OPTIONS, replace(run, resume=True))
    assert resumed.read_bytes() == local_q8.read_bytes()
    after = _shard_gets(hub)
    fetched = {name: after[name] - before.get(name, 0) for name in after}
    assert fetched.get("model-00001-of-00004.safetensors", 0) == 0  # its tensors were written before the kill
    assert fetched["model-00002-of-00004.safetensors"] >= 1  # the truncated copy was fetched again


def test_missing_revision_and_too_small_cache_are_one_line_errors(hub, tmp_path, capsys):
    code, err = run_cli(["convert", f"{REPO}@no-such-branch", "-o", tmp_path / "m.gguf", "--cache-dir", tmp_path / "c"], capsys)
    assert code == 1 and err.strip() == f"error: {REPO}: revision 'no-such-branch' does not exist"
    code, err = run_cli(["convert", REPO, "-o", tmp_path / "m.gguf", "--cache-dir", tmp_path / "c", "--cache-max", "20M"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "alone is" in err, err
    assert _shard_gets(hub) == {}  # header range reads only: refused before any download


def test_plan_downloads_config_and_tokenizer_only(hub, tmp_path, capsys):
    code, err = run_cli(["plan", REPO, "--type", "Q4_K_M", "--cache-dir", tmp_path / "c"], capsys)
    assert code == 0, err
    fetched = set(hub.state.downloads)
    assert "config.json" in fetched and "tokenizer.json" in fetched
    assert not any(name.endswith((".safetensors", ".index.json")) for name in fetched), fetched
    plan = build_plan(REPO, ConvertOptions(qtype="Q4_K_M"), weights_optional=True, hub=HubOptions(tmp_path / "c"))
    assert plan.source.identity == f"{REPO}@{hub.commit_of(REPO, 'main')}"


def test_a_name_outside_the_cache_is_never_fetched(hub, checkpoint, tmp_path):
    import json

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../outside.safetensors"
    hub.serve(REPO, {**{f.name: f.read_bytes() for f in checkpoint.iterdir()},
                     "model.safetensors.index.json": json.dumps(index).encode()}, "evil")
    with pytest.raises(CheckpointError, match="outside"):
        convert(f"{REPO}@evil", tmp_path / "m.gguf", OPTIONS, RunOptions(progress=False, hub=HubOptions(tmp_path / "c")))
    assert not (tmp_path / "outside.safetensors").exists()
