"""Where the weights come from: untrusted index layouts, FP8 checkpoints, GGUF sources, the Hub."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.testing.checkpoints import TINY, build_checkpoint
from tests.test_convert_reliability import run_cli


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return build_checkpoint(replace(TINY, shards=2), tmp_path_factory.mktemp("sharded") / "src")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- untrusted layouts -----------------------------------------------------------------------

@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused(sharded, tmp_path, capsys, escape):
    src = _copy(sharded, tmp_path / "src")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(src / "model-00001-of-00002.safetensors", outside)  # a valid shard: only the name is wrong
    name = str(outside) if escape == "ABSOLUTE" else escape
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: name if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out" / "m.gguf"
    code, err = run_cli(["convert", src, "-o", out, "--type", "F16", "--no-progress"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "outside" in lines[0] and repr(name) in lines[0], lines[0]
    assert not out.exists()


def test_snapshot_of_symlinks_into_a_blob_store_converts(sharded, tmp_path):
    """The Hub cache's layout: the snapshot's files are symlinks to blobs elsewhere; names are what count."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / sharded.name  # general.name comes from it
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / f"blob{i}")
    options, run = ConvertOptions(qtype="F16"), RunOptions(progress=False, report=False)
    (linked,) = convert(snapshot, tmp_path / "linked.gguf", options, run)
    (plain,) = convert(sharded, tmp_path / "plain.gguf", options, run)
    assert linked.read_bytes() == plain.read_bytes()
