"""`convert`, `mmproj` and `lineage` from ORG/REPO: checkpoints streamed from the Hub (a local double)
through a bounded cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import rioquant.source.hub as hub_module
from rioquant.convert import ConvertHooks, ConvertOptions, RunOptions, build_plan, convert
from rioquant.errors import CheckpointError
from rioquant.lineage.pipeline import LineageOptions, analyse
from rioquant.mmproj import build_mmproj_plan, write_mmproj
from rioquant.source import HubOptions
from rioquant.testing.checkpoints import TINY, build_checkpoint
from rioquant.testing.lineage_models import build_family
from tests.hub_double import HubDouble, hub_double
from tests.test_convert_reliability import run_cli, run_cli_output

REPO = "tiny-org/Tiny-MoE"
VL_REPO = "tiny-org/Tiny-VL"  # named as the local checkpoint's folder: general.name is read from it
CACHE_MAX = 75 * 10**6  # ~100 MB in all; the plan needs ~30 MB of config and tokenizer + ~33 MB of shards at once
OPTIONS = ConvertOptions(qtype="Q8_0")


# save_pretrained's layout: contiguous runs of the state dict (embeddings, layers, norm + head, MTP),
# so a stream can drop a shard once its layers are written
TEXT_SHARDS = (lambda n: "embed_tokens" in n, lambda n: ".layers.0." in n or ".layers.1." in n,
               lambda n: ".layers.2." in n or ".layers.3." in n or n.startswith("mtp."),
               lambda n: n in ("model.norm.weight", "lm_head.weight"))
# A VL checkpoint: the tower's blocks beside layers 2-3, its other tensors beside the head, so the
# projector needs two of four shards and holds both at once (patch embedding first, merger last)
VISION_SHARDS = (lambda n: "embed_tokens" in n, lambda n: ".layers.0." in n or ".layers.1." in n,
                 lambda n: ".layers.2." in n or ".layers.3." in n or n.startswith("mtp.") or ".blocks." in n,
                 lambda n: "language_model.norm." in n or n == "lm_head.weight" or n.startswith("model.visual."))


def _reshard(single: Path, out: Path, groups=TEXT_SHARDS) -> Path:
    """The checkpoint in `single` cut into one shard per group (a tensor goes to the first that takes it)."""
    tensors = load_file(str(single / "model.safetensors"))
    out.mkdir(parents=True)
    for f in single.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    weight_map: dict[str, str] = {}
    for i, belongs in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {n: t for n, t in tensors.items() if belongs(n) and n not in weight_map}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    assert weight_map.keys() == tensors.keys()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def checkpoint(module_tmp) -> Path:
    root = module_tmp("hub-src")
    return _reshard(build_checkpoint(replace(TINY, mtp=True), root / "single"), root / "Tiny-MoE")


@pytest.fixture(scope="module")
def local_q8(checkpoint, module_tmp) -> Path:
    (out,) = convert(checkpoint, module_tmp("local") / "m.gguf", OPTIONS, RunOptions(progress=False, report=False))
    return out


@pytest.fixture
def hub(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with hub_double(monkeypatch, max_requests=400, lifetime_s=600) as double:
        double.serve(REPO, {f.name: f.read_bytes() for f in checkpoint.iterdir()})
        yield double


@pytest.fixture
def disk_watch(monkeypatch):
    """The size of --cache-dir (every repository's folder, CACHE_DIR/ORG/REPO) after every download,
    measured here (not by the code under test)."""
    sizes: list[int] = []
    download = hub_module.hf_hub_download

    def measured(*args, local_dir, **kwargs):
        path = download(*args, local_dir=local_dir, **kwargs)
        sizes.append(sum(p.stat().st_size for p in Path(local_dir).parent.parent.rglob("*") if p.is_file()))
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
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../outside.safetensors"
    hub.serve(REPO, {**{f.name: f.read_bytes() for f in checkpoint.iterdir()},
                     "model.safetensors.index.json": json.dumps(index).encode()}, "evil")
    with pytest.raises(CheckpointError, match="outside"):
        convert(f"{REPO}@evil", tmp_path / "m.gguf", OPTIONS, RunOptions(progress=False, hub=HubOptions(tmp_path / "c")))
    assert not (tmp_path / "outside.safetensors").exists()


# -- mmproj and lineage from the Hub ----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_mmproj(vision_checkpoint, module_tmp) -> Path:
    out = module_tmp("local-mmproj") / "mmproj-F16.gguf"
    return write_mmproj(build_mmproj_plan(vision_checkpoint, "F16"), out, RunOptions(progress=False))


@pytest.fixture
def vl_hub(hub, vision_checkpoint, tmp_path) -> HubDouble:
    """The VL checkpoint served as VL_REPO in four shards (VISION_SHARDS): the tower in the last two."""
    folder = _reshard(vision_checkpoint, tmp_path / "hub-vl" / "Tiny-VL", VISION_SHARDS)
    hub.serve(VL_REPO, {f.name: f.read_bytes() for f in folder.iterdir()})
    hub.total = sum(f.stat().st_size for f in folder.iterdir())
    return hub


def test_mmproj_from_the_hub_fetches_the_tower_shards_alone_and_equals_local(vl_hub, disk_watch, local_mmproj,
                                                                             tmp_path, capsys):
    cache = tmp_path / "cache"
    code, plan, err = run_cli_output(["plan", VL_REPO, "--type", "Q8_0", "--mmproj", "F16", "--json", "--cache-dir", cache],
                                     capsys)
    assert code == 0 and json.loads(plan)["mmproj"]["file_bytes"] == local_mmproj.stat().st_size, err
    assert _shard_gets(vl_hub) == {}  # `plan` reads config.json alone
    out = tmp_path / "mmproj-F16.gguf"
    code, err = run_cli(["mmproj", VL_REPO, "-o", out, "--cache-dir", cache, "--cache-max", "75M", "--no-progress"], capsys)
    assert code == 0, err
    assert out.read_bytes() == local_mmproj.read_bytes()
    assert max(disk_watch) <= CACHE_MAX < vl_hub.total, (max(disk_watch), vl_hub.total)
    assert _shard_gets(vl_hub) == {"model-00003-of-00004.safetensors": 1, "model-00004-of-00004.safetensors": 1}
    assert not list((cache / VL_REPO).glob("*.safetensors"))


def test_convert_mmproj_from_the_hub_fetches_the_tower_shards_after_the_text(vl_hub, disk_watch, local_mmproj,
                                                                            tmp_path, capsys):
    """The text conversion deletes every shard it held before the projector fetches its two again."""
    code, err = run_cli(["convert", VL_REPO, "-o", tmp_path / "out" / "Tiny-VL-F16.gguf", "--type", "F16", "--mmproj",
                         "F16", "--cache-dir", tmp_path / "cache", "--cache-max", "75M", "--no-progress", "--no-report"],
                        capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "mmproj-F16.gguf").read_bytes() == local_mmproj.read_bytes()
    assert max(disk_watch) <= CACHE_MAX
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert _shard_gets(vl_hub) == dict(zip(names, [1, 1, 2, 2], strict=True))


@pytest.fixture(scope="module")
def family(module_tmp) -> dict[str, Path]:
    return build_family(module_tmp("lineage"))


LINEAGE_CAP = 10**6  # both Hub models: ~1.46 MB of shards, ~0.6 MB of them at once (layers 0-1)


def test_lineage_from_the_hub_equals_local_under_cache_max(hub, disk_watch, family, tmp_path):
    """Child and one parent from the Hub, the other parent local: the same report as from local copies."""
    total = 0
    for role in ("blend_f32", "B"):
        folder = _reshard(family[role], tmp_path / "hub" / role)
        hub.serve(f"tiny-org/{role}", {f.name: f.read_bytes() for f in folder.iterdir()})
        total += sum(f.stat().st_size for f in folder.iterdir())
    a, b = str(family["A"]), str(family["B"])
    local = analyse(str(family["blend_f32"]), [a, b], LineageOptions(progress=False, threads=2))
    cache = tmp_path / "cache"
    streamed = analyse("tiny-org/blend_f32", [a, "tiny-org/B"],
                       LineageOptions(progress=False, threads=2, hub=HubOptions(cache, LINEAGE_CAP)))

    def numbers(report: dict) -> str:  # JSON: NaN equals NaN
        named = ("child", "parents", "seconds", "coefficients", "intervals")
        return json.dumps([{k: v for k, v in report.items() if k not in named},
                           list(report["coefficients"].values()), list(report["intervals"].values())])

    assert local["verdict"] == "exact blend" and numbers(streamed) == numbers(local)
    assert max(disk_watch) <= LINEAGE_CAP < total, (max(disk_watch), total)
    shards = sorted(p.name for p in (tmp_path / "hub" / "B").glob("*.safetensors"))
    assert _shard_gets(hub) == dict.fromkeys(shards, 2)  # each shard of each model fetched once
    assert not list(cache.rglob("*.safetensors"))


def test_mmproj_and_lineage_refuse_a_cache_max_too_small_before_downloading(vl_hub, family, tmp_path, capsys):
    folder = _reshard(family["B"], tmp_path / "hub" / "B")
    vl_hub.serve("tiny-org/B", {f.name: f.read_bytes() for f in folder.iterdir()})
    runs = [["mmproj", VL_REPO, "-o", tmp_path / "m.gguf", "--cache-max", "50M"],
            ["lineage", str(family["blend_f32"]), "--parent", str(family["A"]), "--parent", "tiny-org/B",
             "--cache-max", "300K"]]
    for argv in runs:
        code, err = run_cli([*argv, "--cache-dir", tmp_path / "c", "--no-progress"], capsys)
        assert code == 1 and err.startswith("error: --cache-max ") and len(err.strip().splitlines()) == 1, err
    assert _shard_gets(vl_hub) == {}
