"""Qwen3.5-MoE's vision tower (HF `vision_config`) → llama.cpp's multimodal projector, the mmproj GGUF.

Every fact about the projector file in one place, as export/qwen35moe.py holds the text model's: its
architecture (`clip`, projector `qwen3vl_merger`), the tower's hyper-parameters (VisionArgs, from
config.json's `vision_config` and preprocessor_config.json), the keys llama.cpp's loader reads
(tools/mtmd/clip.cpp), the tensor table, the one transform (the Conv3D patch kernel split in time into
two 2-D kernels, which is how clip.cpp applies it) and llama.cpp's converter's type rules
(conversion/qwen3vl.py `Qwen3VLVisionModel`, conversion/base.py `MmprojModel`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR

from rioquant.errors import CheckpointError
from rioquant.export.checkpoint import SourceTensor
from rioquant.export.tensor_map import VISION_PREFIXES, Piece, TensorRule, TensorSpec, gguf_name

M = MODEL_TENSOR
T = gguf.GGMLQuantizationType

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip": general.architecture of every mmproj
MMPROJ_TYPES = ("F16", "BF16", "F32", "Q8_0")  # the converter's --outtype choices that make sense here
PREPROCESSOR = "preprocessor_config.json"


@dataclass(frozen=True)
class VisionArgs:
    """The vision tower's hyper-parameters and the image normalisation llama.cpp applies before it."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    image_size: int  # side of the image the position table was trained for: sqrt(positions) x patch
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    projection_dim: int  # the text model's hidden size: what the merger outputs
    eps: float  # LayerNorm epsilon: llama.cpp's converter takes the text model's rms_norm_eps
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    def merged_size(self) -> int:
        """Width of a merged 2x2 group of patch vectors: the merger's input."""
        return self.hidden_size * self.spatial_merge_size**2


def has_vision(config: dict) -> bool:
    return isinstance(config.get("vision_config"), dict)


def vision_args(config: dict, preprocessor: dict | None, src: Path) -> VisionArgs:
    """VisionArgs from config.json and preprocessor_config.json (None: planning from config.json alone,
    with Qwen's 3-channel mean/std of 0.5, which changes no byte count).

    Defaults are llama.cpp's converter's: 2304 positions and patch 16 when absent, eps 1e-6.
    """
    if not has_vision(config):
        raise CheckpointError(f"{src / 'config.json'}: no vision_config; this checkpoint has no vision tower "
                              "(an mmproj needs Qwen3_5MoeForConditionalGeneration)")
    vision, text = config["vision_config"], config.get("text_config", {})
    if preprocessor is None:
        preprocessor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    try:
        positions = int(vision.get("num_position_embeddings", 2304))
        patch = int(vision.get("patch_size", 16))
        args = VisionArgs(
            depth=int(vision["depth"]), hidden_size=int(vision["hidden_size"]),
            intermediate_size=int(vision["intermediate_size"]), num_heads=int(vision["num_heads"]),
            in_channels=int(vision.get("in_channels", 3)), patch_size=patch,
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            image_size=int(vision.get("image_size") or int(positions**0.5 * patch)),
            num_position_embeddings=positions,
            deepstack_visual_indexes=tuple(int(i) for i in vision.get("deepstack_visual_indexes") or ()),
            projection_dim=int({**config, **text}["hidden_size"]),
            eps=float(text.get("rms_norm_eps", 1e-6)),
            image_mean=tuple(float(x) for x in preprocessor["image_mean"]),
            image_std=tuple(float(x) for x in preprocessor["image_std"]),
        )
    except KeyError as err:
        where = PREPROCESSOR if err.args[0] in ("image_mean", "image_std") else "config.json vision_config"
        raise CheckpointError(f"{src / where.split()[0]}: {where} is missing {err.args[0]!r}") from None
    if args.deepstack_visual_indexes:
        raise CheckpointError(f"{src / 'config.json'}: deepstack_visual_indexes {list(args.deepstack_visual_indexes)}: "
                              "a Qwen3-VL tower, not Qwen3.5's (rioquant converts Qwen3.5's, which has none)")
    if args.temporal_patch_size != 2:
        raise CheckpointError(f"{src / 'config.json'}: temporal_patch_size {args.temporal_patch_size}; llama.cpp's "
                              "qwen3vl_merger splits the patch kernel into exactly 2 frames")
    return args


# ---------------------------------------------------------------------------------------------
# Metadata: gguf-py's writer calls (each carries its key and value type) and what each is given.

CLIP_KEYS: tuple[tuple[str, Callable[[VisionArgs], object]], ...] = (
    ("add_clip_has_vision_encoder", lambda v: True),
    ("add_vision_projection_dim", lambda v: v.projection_dim),
    ("add_vision_image_size", lambda v: v.image_size),
    ("add_vision_patch_size", lambda v: v.patch_size),
    ("add_vision_embedding_length", lambda v: v.hidden_size),
    ("add_vision_feed_forward_length", lambda v: v.intermediate_size),
    ("add_vision_block_count", lambda v: v.depth),
    ("add_vision_head_count", lambda v: v.num_heads),
    ("add_vision_image_mean", lambda v: list(v.image_mean)),
    ("add_vision_image_std", lambda v: list(v.image_std)),
    ("add_clip_projector_type", lambda v: gguf.VisionProjectorType.QWEN3VL),  # "qwen3vl_merger"
    ("add_vision_use_gelu", lambda v: True),
    ("add_vision_spatial_merge_size", lambda v: v.spatial_merge_size),
    ("add_vision_attention_layernorm_eps", lambda v: v.eps),
    ("add_vision_is_deepstack_layers", lambda v: [i in v.deepstack_visual_indexes for i in range(v.depth)]),
)


def add_clip_metadata(writer: gguf.GGUFWriter, v: VisionArgs) -> None:
    for method, value in CLIP_KEYS:
        getattr(writer, method)(value(v))


# ---------------------------------------------------------------------------------------------
# Tensors. Shapes are HF (torch) shapes as functions of VisionArgs.

def split_time(frame: int) -> Callable[[np.ndarray, VisionArgs], np.ndarray]:
    """The Conv3D patch kernel [out, in, 2, P, P] → frame `frame`'s 2-D kernel [out, in, P, P]."""
    def take(x: np.ndarray, v: VisionArgs) -> np.ndarray:
        return np.ascontiguousarray(x[:, :, frame])

    return take


TRANSFORMS: dict[str, Callable[[np.ndarray, VisionArgs], np.ndarray]] = {
    "patch_frame_0": split_time(0),
    "patch_frame_1": split_time(1),
}


def _patch_kernel(v: VisionArgs) -> tuple[int, ...]:
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


# (HF name inside `blocks.N.`, GGUF tensor, suffix, HF shape)
BLOCK_RULES: tuple[TensorRule, ...] = (
    TensorRule("norm1.weight", M.V_ENC_INPUT_NORM, ".weight", lambda v: (v.hidden_size,)),
    TensorRule("norm1.bias", M.V_ENC_INPUT_NORM, ".bias", lambda v: (v.hidden_size,)),
    TensorRule("attn.qkv.weight", M.V_ENC_ATTN_QKV, ".weight", lambda v: (3 * v.hidden_size, v.hidden_size)),  # kept fused
    TensorRule("attn.qkv.bias", M.V_ENC_ATTN_QKV, ".bias", lambda v: (3 * v.hidden_size,)),
    TensorRule("attn.proj.weight", M.V_ENC_ATTN_O, ".weight", lambda v: (v.hidden_size, v.hidden_size)),
    TensorRule("attn.proj.bias", M.V_ENC_ATTN_O, ".bias", lambda v: (v.hidden_size,)),
    TensorRule("norm2.weight", M.V_ENC_POST_ATTN_NORM, ".weight", lambda v: (v.hidden_size,)),
    TensorRule("norm2.bias", M.V_ENC_POST_ATTN_NORM, ".bias", lambda v: (v.hidden_size,)),
    TensorRule("mlp.linear_fc1.weight", M.V_ENC_FFN_UP, ".weight", lambda v: (v.intermediate_size, v.hidden_size)),
    TensorRule("mlp.linear_fc1.bias", M.V_ENC_FFN_UP, ".bias", lambda v: (v.intermediate_size,)),
    TensorRule("mlp.linear_fc2.weight", M.V_ENC_FFN_DOWN, ".weight", lambda v: (v.hidden_size, v.intermediate_size)),
    TensorRule("mlp.linear_fc2.bias", M.V_ENC_FFN_DOWN, ".bias", lambda v: (v.hidden_size,)),
)

# Tensors outside the blocks: (rule, the GGUF name's index — the merger's fc1/fc2 are mm.0/mm.2, as in
# Qwen2-VL's Sequential(Linear, GELU, Linear) — and suffix). Two rows read the one patch kernel.
TOP_RULES: tuple[tuple[TensorRule, int | None], ...] = (
    (TensorRule("patch_embed.proj.weight", M.V_ENC_EMBD_PATCH, ".weight", _patch_kernel, "patch_frame_0"), None),
    (TensorRule("patch_embed.proj.weight", M.V_ENC_EMBD_PATCH, ".weight.1", _patch_kernel, "patch_frame_1"), None),
    (TensorRule("patch_embed.proj.bias", M.V_ENC_EMBD_PATCH, ".bias", lambda v: (v.hidden_size,)), None),
    (TensorRule("pos_embed.weight", M.V_ENC_EMBD_POS, ".weight",
                lambda v: (v.num_position_embeddings, v.hidden_size)), None),
    (TensorRule("merger.norm.weight", M.V_POST_NORM, ".weight", lambda v: (v.hidden_size,)), None),
    (TensorRule("merger.norm.bias", M.V_POST_NORM, ".bias", lambda v: (v.hidden_size,)), None),
    (TensorRule("merger.linear_fc1.weight", M.V_MMPROJ, ".weight", lambda v: (v.merged_size, v.merged_size)), 0),
    (TensorRule("merger.linear_fc1.bias", M.V_MMPROJ, ".bias", lambda v: (v.merged_size,)), 0),
    (TensorRule("merger.linear_fc2.weight", M.V_MMPROJ, ".weight", lambda v: (v.projection_dim, v.merged_size)), 2),
    (TensorRule("merger.linear_fc2.bias", M.V_MMPROJ, ".bias", lambda v: (v.projection_dim,)), 2),
)


def _gguf_shape(rule: TensorRule, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    return hf_shape[:2] + hf_shape[3:] if rule.transform in TRANSFORMS else hf_shape


def vision_tensors(tensors: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
    """The tower's tensors by their name inside the tower, wherever the checkpoint keeps it."""
    found: dict[str, SourceTensor] = {}
    for name, tensor in tensors.items():
        prefix = next((p for p in VISION_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            found[name[len(prefix):]] = tensor
    return found


def vision_specs(tensors: dict[str, SourceTensor], v: VisionArgs, src: Path) -> list[TensorSpec]:
    """The mmproj's tensor list from headers only: patch and position embeddings, blocks, merger.

    Reads the tower under any of VISION_PREFIXES; a checkpoint with none is a one-line error, as is
    a tower tensor the table does not know (an unknown one would be silently left out of the file).
    """
    tower = vision_tensors(tensors)
    if not tower:
        raise CheckpointError(f"{src}: no vision tower tensors (looked for {', '.join(p + '*' for p in VISION_PREFIXES)}); "
                              "drop --mmproj or convert the multimodal checkpoint")
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> SourceTensor:
        tensor = tower.get(name)
        if tensor is None:
            raise CheckpointError(f"{src}: vision tower has no tensor {name} (expected from config.json vision_config)")
        if tensor.shape != shape:
            raise CheckpointError(f"{tensor.file.name}: tensor {tensor.name} has shape {list(tensor.shape)}, "
                                  f"config.json vision_config implies {list(shape)}")
        used.add(name)
        return tensor

    def spec(rule: TensorRule, hf_name: str, index: int | None, layer: int | None) -> TensorSpec:
        tensor = take(hf_name, rule.shape(v))
        return TensorSpec(gguf_name(rule, index), _gguf_shape(rule, tensor.shape), (Piece(tensor),), rule.transform, layer)

    specs = [spec(rule, rule.hf, index, None) for rule, index in TOP_RULES[:4]]
    for block in range(v.depth):
        specs += [spec(rule, f"blocks.{block}.{rule.hf}", block, block) for rule in BLOCK_RULES]
    specs += [spec(rule, rule.hf, index, None) for rule, index in TOP_RULES[4:]]
    unknown = sorted(tower.keys() - used)
    if unknown:
        raise CheckpointError(f"{tower[unknown[0]].file.name}: unexpected vision tensor {tower[unknown[0]].name}")
    return specs


def config_vision_tensors(v: VisionArgs, config_path: Path) -> dict[str, SourceTensor]:
    """The tower's source tensors config.json implies (BF16, under `model.visual.`), for planning
    without weights; walks the same tables as `vision_specs`."""
    rows = [(rule.hf, rule.shape(v)) for rule, _ in TOP_RULES]
    rows += [(f"blocks.{b}.{rule.hf}", rule.shape(v)) for b in range(v.depth) for rule in BLOCK_RULES]
    prefix = VISION_PREFIXES[0]
    return {prefix + name: SourceTensor(prefix + name, config_path, "BF16", shape, 0) for name, shape in rows}


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> tuple[str, str]:
    """(type, why) of one mmproj tensor: llama.cpp's converter's rules, in its order.

    The patch kernels are F16 in an F16 file and F32 otherwise (MmprojModel.tensor_force_quant);
    1-D tensors, norms and the position table stay F32; a Q8_0 row that does not divide by 32 is F16
    (gguf-py's QuantError fallback).
    """
    if ".patch_embd.weight" in name:
        return ("F16", "patch kernel: F16 in an F16 file") if outtype == "F16" else ("F32", "patch kernel: F32 unless F16")
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return "F32", "1-D: kept F32"
    if name == gguf.TENSOR_NAMES[M.V_ENC_EMBD_POS] + ".weight":
        return "F32", "position table: kept F32"
    block = gguf.GGML_QUANT_SIZES[T[outtype]][0]
    if shape[-1] % block:
        return "F16", f"rows of {shape[-1]} do not divide by {block}: F16"
    return outtype, f"--mmproj {outtype}"


def load_vision_tensor(spec: TensorSpec, v: VisionArgs, read: Callable[[SourceTensor, int | None], np.ndarray]) -> np.ndarray:
    """The whole transformed tensor as float32."""
    (piece,) = spec.pieces
    values = read(piece.source, piece.index)
    return TRANSFORMS[spec.transform](values, v) if spec.transform else values


def parameter_count(specs: list[TensorSpec]) -> int:
    return sum(math.prod(s.shape) for s in specs)
