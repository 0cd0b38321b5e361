"""`rioquant publish`: verification of every GGUF, the model card and files, the dry run, the upload.

Figures in the card are checked against independent readers: tensor sizes and types from
rioquant/testing/gguf_scan.py (not rioquant's header reader), checksums with coreutils' `sha256sum -c`. The
upload runs against tests/hub_double.py, a small HTTP test double of the Hub on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import pytest
import yaml

from rioquant.cli import main
from rioquant.errors import GGUFError, PublishError, RioquantError
from rioquant.publish.gotemplate import QWEN35_GO_TEMPLATE
from rioquant.publish.release import PublishOptions, plan_release, publish
from rioquant.publish.verify import find_sets
from rioquant.testing.gguf_scan import scan
from tests.hub_double import HubDouble
from tests.publish_files import BASE_MODEL, patch_scalar, qwen35_template, tiny_release, write_gguf

REPO = "me/Tiny-GGUF"
TOKEN = "hf_test_token_do_not_print_4242"
V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return tiny_release(tmp_path_factory.getbasetemp())


@pytest.fixture
def release_dir(converted, tmp_path) -> Path:
    """A release folder: the converted Q8_0 with its report and an eval, plus a hand-made split Q4_K_M set."""
    folder = tmp_path / "release"
    folder.mkdir()
    for src in converted.parent.glob("tiny-Q8_0.*"):
        shutil.copy2(src, folder / src.name)
    (folder / "tiny-Q8_0.eval.json").write_text(json.dumps(  # `ppl --json` and `kld --json` merged, + text
        {"ppl": 12.3456, "ppl_stderr": 0.25, "tokens_scored": 2550, "chunks": 10, "ctx": 512,
         "kld": 0.01234, "kld_stderr": 0.0002, "ppl_q": 12.3456, "same_top_p": 0.97,
         "text": "wiki.test.raw", "base": "/data/tiny-BF16.gguf"}))
    write_gguf(folder / "hand-Q4_K_M.gguf", chat_template=qwen35_template(), split_max_tensors=2,
               sampling={"temp": 0.6, "top_p": 0.95, "top_k": 20})
    (folder / "notes.txt").write_text("not part of the release\n")
    return folder


@pytest.fixture
def no_hub_login(monkeypatch, tmp_path):
    """No token from the environment or a saved login."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))


# -- verification ---------------------------------------------------------------------------------


def test_verify_accepts_a_file_and_a_split_set(tmp_path):
    write_gguf(tmp_path / "one.gguf")
    write_gguf(tmp_path / "two.gguf", split_max_tensors=2, n_tensors=5)
    sets = {s.stem: s for s in find_sets(tmp_path)}
    assert [p.name for p in sets["two"].files] == [f"two-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert sum(len(scan(p).tensors) for p in sets["two"].files) == 5
    assert [p.name for p in sets["one"].files] == ["one.gguf"]


def test_missing_shard_is_refused_before_anything_else(tmp_path):
    files = write_gguf(tmp_path / "q.gguf", split_max_tensors=1, n_tensors=3)
    files[1].unlink()
    with pytest.raises(PublishError, match=r"q-00002-of-00003\.gguf: missing from the split set q \(2 of 3"):
        find_sets(tmp_path)


def test_truncated_shard_is_refused(tmp_path):
    files = write_gguf(tmp_path / "q.gguf", split_max_tensors=2)
    size = files[1].stat().st_size
    os.truncate(files[1], size - 7)
    with pytest.raises(GGUFError, match=rf"q-00002-of-00002\.gguf: {size - 7} bytes on disk, its header describes {size}"):
        find_sets(tmp_path)


@pytest.mark.parametrize("key, vtype, value, message", [  # the types gguf-py's writer gives these keys
    ("split.no", V.UINT16, 0, r"q-00002-of-00002\.gguf: split\.no is 0, expected 1 for shard 2 of 2"),
    ("split.count", V.UINT16, 3, r"q-00002-of-00002\.gguf: split\.count is 3, expected 2"),
    ("split.tensors.count", V.INT32, 5, r"split\.tensors\.count says \['4', '5'\], the 2 shards hold 4 tensors"),
])
def test_inconsistent_split_keys_are_refused(tmp_path, key, vtype, value, message):
    files = write_gguf(tmp_path / "q.gguf", split_max_tensors=2)
    patch_scalar(files[1], key, vtype, value)
    with pytest.raises(GGUFError, match=message):
        find_sets(tmp_path)


def test_renamed_shard_and_bad_magic_are_refused(tmp_path):
    files = write_gguf(tmp_path / "a" / "q.gguf", split_max_tensors=2)
    files[0].rename(tmp_path / "a" / "q-full.gguf")
    files[1].unlink()
    with pytest.raises(GGUFError, match=r"q-full\.gguf: shard 1 of a 2-file split set \(split\.count\) but not named"):
        find_sets(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.gguf").write_bytes(b"<html>Not Found</html>" + b"\0" * 64)
    with pytest.raises(RioquantError, match=r"x\.gguf: invalid magic b'<htm'"):
        find_sets(tmp_path / "b")


# -- card and files -----------------------------------------------------------------------------


def test_card_and_generated_files(release_dir, no_hub_login):
    release = plan_release(REPO, release_dir, PublishOptions(dry_run=True, progress=False, base_models=("rio/Tiny",)))
    generated = release.generated
    card = generated["README.md"]

    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["rio/Tiny", BASE_MODEL]  # the --base-model, then the GGUF's lineage
    assert front["base_model_relation"] == "quantized"
    assert front["pipeline_tag"] == "text-generation" and {"gguf", "qwen35moe"} <= set(front["tags"])

    q8 = scan(release_dir / "tiny-Q8_0.gguf")
    n_bytes = sum(len(t.data) for t in q8.tensors.values())
    n_weights = sum(math.prod(t.shape) for t in q8.tensors.values())
    row = next(line for line in card.splitlines() if line.startswith("| Q8_0 |"))
    assert f"| {8 * n_bytes / n_weights:.2f} |" in row and "| Q8_0 | no | 12.3456 ± 0.2500 | 0.01234 ± 0.00020 |" in row
    assert "| Q4_K_M | `hand-Q4_K_M-00001-of-00002.gguf` + 1 shards |" in card
    # the Q8_0 recipe: every tensor kind with the types gguf_scan finds
    kinds: dict[str, Counter] = {}
    for name, t in q8.tensors.items():
        kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        kinds.setdefault(kind, Counter())[t.qtype.name] += 1
    recipe = card.split("### Q8_0")[1].split("##")[0]
    for kind, types in kinds.items():
        cell = ", ".join(f"{name} ×{n}" for name, n in types.most_common())
        assert f"| {kind} | {sum(types.values())} | {cell} |" in recipe, kind
    assert "`tiny-Q8_0.report.json`" in recipe
    assert "Q8_0: on wiki.test.raw, n_ctx 512, KLD vs tiny-BF16.gguf" in card
    assert f"llama-cli -hf {REPO}:Q4_K_M" in card and f"ollama run hf.co/{REPO}:Q4_K_M" in card

    assert generated["template"] == QWEN35_GO_TEMPLATE + "\n"
    params = json.loads(generated["params"])
    assert params["stop"] == ["<|im_end|>", "<|endoftext|>"] and params["temperature"] == 0.6
    # every uploaded file is in the card's table and in SHA256SUMS, with its true digest
    sums = dict(reversed(line.split("  ", 1)) for line in generated["SHA256SUMS"].splitlines())
    for path in ["tiny-Q8_0.gguf", "tiny-Q8_0.report.json", "tiny-Q8_0.eval.json",
                 "hand-Q4_K_M-00001-of-00002.gguf", "hand-Q4_K_M-00002-of-00002.gguf"]:
        digest = hashlib.sha256((release_dir / path).read_bytes()).hexdigest()
        assert sums[path] == digest and f"| `{path}` |" in card and digest in card
    assert "notes.txt" not in sums and release.skipped == ["notes.txt"]


def test_dry_run_prints_the_plan_and_changes_nothing(release_dir, no_hub_login, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in release_dir.iterdir()}
    main(["publish", REPO, str(release_dir), "--dry-run", "--private", "--revision", "v1",
          "--commit-message", "First quants", "--no-progress"])
    out = capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in release_dir.iterdir() if p.name != ".rioquant-sha256.json"}
    assert after == before  # nothing written but the hidden sha256 cache
    assert out.startswith(f"repository: https://huggingface.co/{REPO} (model; created private if missing)\n"
                          "revision:   v1 (branch created if missing)\ncommit:     First quants\n")
    for name in ("README.md", "template", "params", "SHA256SUMS", "tiny-Q8_0.gguf", "hand-Q4_K_M-00002-of-00002.gguf"):
        assert f"  {name} " in out
    assert "----- README.md -----" in out


def test_written_sums_check_with_coreutils(release_dir, no_hub_login, monkeypatch):
    monkeypatch.setattr("rioquant.publish.release.upload_release", lambda *a, **k: "no upload in this test")
    publish(REPO, release_dir, PublishOptions(progress=False))
    result = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=release_dir, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (release_dir / "README.md").read_text().startswith("---\n")


def test_foreign_readme_is_kept_unless_forced(release_dir, no_hub_login):
    (release_dir / "README.md").write_text("# my own card\n")
    with pytest.raises(PublishError, match=r"README\.md: exists and was not written by rioquant; .*--force"):
        publish(REPO, release_dir, PublishOptions(dry_run=True, progress=False))
    plan = publish(REPO, release_dir, PublishOptions(dry_run=True, progress=False, force=True))
    assert "----- README.md -----\n---\n" in plan


def test_incomplete_set_uploads_nothing(release_dir, monkeypatch):
    (release_dir / "hand-Q4_K_M-00002-of-00002.gguf").unlink()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubDouble(max_requests=5, lifetime_s=30) as hub, pytest.raises(PublishError, match="missing from the split set"):
        publish(REPO, release_dir, PublishOptions(progress=False, endpoint=hub.url))
    assert hub.state.requests == []


# -- upload ---------------------------------------------------------------------------------------


def test_upload_to_the_hub_double(release_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    with HubDouble(max_requests=60, lifetime_s=60) as hub:
        options = PublishOptions(progress=False, endpoint=hub.url, private=True, revision="v1",
                                 commit_message="Tiny quants")
        out = publish(REPO, release_dir, options)
        expected = sorted(["README.md", "SHA256SUMS", "params", "template", "hand-Q4_K_M-00001-of-00002.gguf",
                           "hand-Q4_K_M-00002-of-00002.gguf", "tiny-Q8_0.gguf", "tiny-Q8_0.report.json",
                           "tiny-Q8_0.report.csv", "tiny-Q8_0.eval.json"])
        assert out.startswith(f"uploaded {len(expected)} files to {hub.url}/{REPO}: {hub.url}/{REPO}/commit/")
        repo = hub.state.repos[REPO]
        assert repo["private"] is True
        files = repo["branches"]["v1"]
        assert sorted(files) == expected  # notes.txt and the hidden sha256 cache stay local
        for path, data in files.items():
            assert data == (release_dir / path).read_bytes(), path
        assert hub.state.commits[-1]["summary"] == "Tiny quants"
        assert all(auth == f"Bearer {TOKEN}" for method, path, auth in hub.state.requests if path.startswith("/api/"))
        assert hub.state.cards and hub.state.cards[0]["base_model_relation"] == "quantized"
        assert hub.state.unexpected == []
        publish(REPO, release_dir, options)  # running again (an interrupted upload) commits the same files
        assert len(hub.state.commits) == 2 and hub.state.unexpected == []


def test_cli_upload_uses_hf_endpoint_and_never_prints_the_token(release_dir, tmp_path):
    """The real command in a subprocess: HF_ENDPOINT and HF_TOKEN from the environment, a hub that
    rejects the token quoting it back; the one-line error must name the step and mask the token."""
    with HubDouble(max_requests=20, lifetime_s=60, reject_token=True) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        result = subprocess.run([sys.executable, "-m", "rioquant", "publish", REPO, str(release_dir), "--no-progress"],
                                capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert TOKEN not in result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {hub.url}/{REPO}: cannot create the repository (")
    assert result.stderr.count("\n") == 1
    calls = [r[:2] for r in hub.state.requests]
    assert ("POST", "/api/repos/create") in calls
    assert not [c for c in calls if any(step in c[1] for step in ("preupload", "lfs", "commit"))]  # nothing sent


def test_no_token_is_a_clear_error(release_dir, no_hub_login):
    with pytest.raises(PublishError, match=r"no Hugging Face token; set HF_TOKEN or run `hf auth login`"):
        publish(REPO, release_dir, PublishOptions(progress=False, endpoint="http://127.0.0.1:9"))
