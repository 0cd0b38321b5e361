"""The vision projector (`rioquant mmproj`, `convert --mmproj`) on one tiny Qwen3.5-MoE VL checkpoint.

- Every tensor's bytes and every metadata value equal what llama.cpp's converter writes with `--mmproj`,
  for F16, BF16, F32 and Q8_0, wherever the checkpoint keeps the tower.
- llama.cpp loads it: libmtmd's image embeddings against transformers' vision tower + merger on the
  same pixels, and one image+text prompt's logits through the text GGUF and the mmproj against
  transformers' Qwen3_5MoeForConditionalGeneration.
- `plan` gives its exact size; bad inputs are one-line errors; `--force` and `--resume` as for the model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from rioquant.cli import main
from rioquant.convert import ConvertHooks, RunOptions
from rioquant.mmproj import build_mmproj_plan, describe_mmproj, write_mmproj
from rioquant.testing.checkpoints import IMAGE_ID, TINY, build_checkpoint
from rioquant.testing.oracles import run_reference_mmproj
from rioquant.testing.vision import (
    LlamaVision,
    sample_image,
    transformers_image_embeddings,
    transformers_prompt_logits,
)
from tests.test_convert import assert_same_gguf
from tests.test_convert_reliability import run_cli, run_cli_output

# `rioquant plan --mmproj` for the 397B's tower (456,010,480 parameters; directory Rio-3.5-Open-397B,
# no model card): the exact file sizes README.md quotes
MMPROJ_397B = {"F16": 918_165_536, "BF16": 921_704_480, "F32": 1_824_061_472, "Q8_0": 624_229_280}
CONFIG_397B = Path(__file__).parent / "data" / "rio-3.5-open-397b" / "config.json"
PROMPT = "<|im_start|>user\n<__media__>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def release(vision_checkpoint, module_tmp) -> Path:
    """`rioquant convert --type F32 --mmproj F32`: the text GGUF and its projector, as a user makes them."""
    out = module_tmp("release")
    main(["convert", str(vision_checkpoint), "-o", str(out / "Tiny-VL-F32.gguf"), "--type", "F32", "--mmproj", "F32",
          "--no-progress", "--no-report"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0"])
def test_mmproj_equals_reference_converter(vision_checkpoint, tmp_path, qtype):
    ref = run_reference_mmproj(vision_checkpoint, tmp_path / "ref.gguf", qtype.lower())
    ours = write_mmproj(build_mmproj_plan(vision_checkpoint, qtype), tmp_path / "ours.gguf", RunOptions(progress=False))
    assert_same_gguf(ours, ref)


@pytest.mark.slow
def test_convert_mmproj_f32_equals_reference_and_plan_size(vision_checkpoint, release, tmp_path, capsys):
    ours = release / "mmproj-F32.gguf"
    assert_same_gguf(ours, run_reference_mmproj(vision_checkpoint, tmp_path / "ref.gguf", "f32"))
    code, out, _ = run_cli_output(["plan", vision_checkpoint, "--type", "F32", "--mmproj", "F32", "--json"], capsys)
    assert code == 0 and json.loads(out)["mmproj"]["file_bytes"] == ours.stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["visual.", "model.language_model.visual."])
def test_every_tower_location_is_read(vision_checkpoint, tmp_path, capsys, prefix):
    """The same weights under another prefix give llama.cpp's file for `model.visual.` (its converter
    writes an empty projector for `model.language_model.visual.`); the text plan leaves the tower out."""
    src = build_checkpoint(replace(TINY, with_vision=True, mtp=True, vision_prefix=prefix), tmp_path / "Tiny-VL")
    code, err = run_cli(["mmproj", src, "-o", tmp_path / "mmproj-F16.gguf", "--no-progress"], capsys)
    assert code == 0, err
    assert_same_gguf(tmp_path / "mmproj-F16.gguf", run_reference_mmproj(vision_checkpoint, tmp_path / "ref.gguf"))
    code, out, err = run_cli_output(["plan", src, "--type", "Q8_0", "--json"], capsys)
    assert code == 0, err
    assert not any(t["name"].startswith(("v.", "mm.")) for t in json.loads(out)["tensors"])


def test_bad_inputs_are_one_line_errors(vision_checkpoint, tmp_path, capsys):
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    config = json.loads((vision_checkpoint / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "vision_config"}))
    no_tower = tmp_path / "no-tower"
    no_tower.mkdir()
    shutil.copyfile(vision_checkpoint / "config.json", no_tower / "config.json")
    shutil.copyfile(vision_checkpoint / "preprocessor_config.json", no_tower / "preprocessor_config.json")
    save_file({"model.language_model.norm.weight": np.zeros(64, np.float32)}, str(no_tower / "model.safetensors"))
    cases = [
        (["mmproj", text_only], "no vision_config"),
        (["convert", text_only, "-o", tmp_path / "x.gguf", "--mmproj"], "no vision_config"),
        (["mmproj", no_tower], "no vision tower tensors"),
    ]
    for args, message in cases:
        code, err = run_cli(args, capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()
    code, err = run_cli(["mmproj", vision_checkpoint, "--type", "Q4_K"], capsys)
    assert code == 2 and "Q4_K" in err


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_force_and_resume(vision_checkpoint, release, tmp_path, capsys):
    out = release / "mmproj-F32.gguf"
    code, err = run_cli(["mmproj", vision_checkpoint, "-o", out, "--type", "F32"], capsys)
    assert code == 1 and "--force" in err
    plan = build_mmproj_plan(vision_checkpoint, "F32")
    written = []

    def stop_at_tenth(entry):
        written.append(entry.name)
        if len(written) == 10:
            raise Interrupt

    resumed = tmp_path / "mmproj-F32.gguf"
    with pytest.raises(Interrupt):
        write_mmproj(plan, resumed, RunOptions(progress=False), ConvertHooks(on_tensor=stop_at_tenth))
    assert not resumed.exists()
    write_mmproj(plan, resumed, RunOptions(progress=False, resume=True), ConvertHooks(on_tensor=written.append))
    assert len(written) == len(plan.entries) + 1  # the interrupted tensor is redone, the nine before are not
    assert resumed.read_bytes() == out.read_bytes()


def test_397b_mmproj_sizes(tmp_path):
    folder = tmp_path / "Rio-3.5-Open-397B"
    folder.mkdir()
    shutil.copyfile(CONFIG_397B, folder / "config.json")
    for qtype, size in MMPROJ_397B.items():
        summary = describe_mmproj(build_mmproj_plan(folder, qtype, weights_optional=True))
        assert (summary["file_bytes"], summary["parameters"], len(summary["tensors"])) == (size, 456_010_480, 334)


# Cosine of llama.cpp's image embeddings with transformers' per image token. Measured: F32 0.9999998,
# F16 0.9999997, Q8_0 0.9998.
MIN_COSINE = {"F32": 0.999, "F16": 0.999, "Q8_0": 0.995}


@pytest.mark.slow
def test_llama_cpp_image_embeddings_and_logits_match_transformers(vision_checkpoint, release, tmp_path):
    image = sample_image()
    reference = transformers_image_embeddings(vision_checkpoint, image)
    mmprojs = {"F32": release / "mmproj-F32.gguf"}
    for qtype in ("F16", "Q8_0"):
        mmprojs[qtype] = write_mmproj(build_mmproj_plan(vision_checkpoint, qtype), tmp_path / f"mmproj-{qtype}.gguf",
                                      RunOptions(progress=False))
    for qtype, mmproj in mmprojs.items():
        llama = LlamaVision(release / "Tiny-VL-F32.gguf", mmproj)
        try:
            ours = llama.image_embeddings(image)
            if qtype == "F32":
                logits, layout = llama.prompt_logits(PROMPT, image)
        finally:
            llama.close()
        assert ours.shape == reference.shape == (16, TINY.hidden_size)  # 128x128: 8x8 patches, merged 2x2
        cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
        assert cosine.min() >= MIN_COSINE[qtype], (qtype, cosine)
    assert 16 in layout  # the image took its 16 tokens between <|vision_start|> and <|vision_end|>
    expected = transformers_prompt_logits(vision_checkpoint, layout, image, IMAGE_ID)
    assert logits.argmax() == expected.argmax()
    assert np.abs(logits - expected).max() < 3e-3 * max(1.0, float(np.abs(expected).max()) / 10)


@pytest.mark.slow
def test_modelfile_and_card_carry_the_projector(release, capsys):
    code, out, err = run_cli_output(["modelfile", release / "Tiny-VL-F32.gguf", "-o", release / "Modelfile"], capsys)
    assert code == 0, err
    froms = [line for line in (release / "Modelfile").read_text().splitlines() if line.startswith("FROM ")]
    assert froms == ["FROM ./Tiny-VL-F32.gguf", "FROM ./mmproj-F32.gguf"]
    code, out, err = run_cli_output(["modelfile", release / "Tiny-VL-F32.gguf", "--no-mmproj"], capsys)
    assert code == 0 and "mmproj" not in out
    code, out, err = run_cli_output(["publish", "me/Tiny-VL-GGUF", release, "--dry-run", "--no-progress"], capsys)
    assert code == 0, err
    digest = hashlib.sha256((release / "mmproj-F32.gguf").read_bytes()).hexdigest()
    assert "| `mmproj-F32.gguf` | " in out and f"`{digest}` |" in out
    assert "--mmproj mmproj-F32.gguf" in out and "pipeline_tag: image-text-to-text" in out
    assert "| F32 | `Tiny-VL-F32.gguf` |" in out  # the projector is no quant of its own
