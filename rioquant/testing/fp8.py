"""A tiny FP8 checkpoint made from a BF16 one, laid out as Qwen's `-FP8` releases are.

Qwen's FP8 repositories quantize the linear layers' weight matrices to `F8_E4M3` with one float32
multiplier per 128×128 block (`NAME_scale_inv`: despite the name, the value dequantization multiplies
by), and keep the rest in BF16: embeddings, the output head, norms, the MoE routers and shared-expert
gates, the Gated DeltaNet convolution and its `A_log` / `dt_bias`. `config.json` gains
`quantization_config` {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size}.
Each block's multiplier is its largest magnitude over 448 (E4M3's largest finite value), as the
releases' own quantizer chooses it; the block size is a parameter so small test shapes can span several.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# The linear layers quantized (name endings; fused expert stacks end in `_proj`); every other tensor,
# including the small Gated DeltaNet `in_proj_a` / `in_proj_b`, stays BF16 ("modules_to_not_convert").
FP8_LAYERS = ("_proj.weight", "_proj", "in_proj_qkv.weight", "in_proj_z.weight", "mtp.fc.weight")


def is_fp8_target(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(FP8_LAYERS) and tensor.ndim >= 2


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 weight, float32 scale_inv of shape (..., ceil(R/b0), ceil(C/b1)))."""
    *lead, rows, cols = weight.shape
    b0, b1 = block
    padded = torch.zeros((*lead, math.ceil(rows / b0) * b0, math.ceil(cols / b1) * b1), dtype=torch.float32)
    padded[..., :rows, :cols] = weight.float()
    blocks = padded.unflatten(-1, (-1, b1)).unflatten(-3, (-1, b0))  # (..., R/b0, b0, C/b1, b1)
    scale = blocks.abs().amax(dim=(-3, -1)) / E4M3_MAX  # (..., R/b0, C/b1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = (blocks / scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols]
    return quantized.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def fp8_checkpoint(bf16: Path, out: Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Write the FP8 form of the BF16 checkpoint `bf16` into `out` (same shards, index updated)."""
    shutil.copytree(bf16, out)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name in [n for n, t in tensors.items() if is_fp8_target(n, t)]:
            tensors[name], tensors[f"{name}_scale_inv"] = quantize_blocks(tensors[name], block)
            if index is not None:
                index["weight_map"][f"{name}_scale_inv"] = shard.name
        save_file(tensors, str(shard), metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
