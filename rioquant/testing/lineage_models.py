"""A family of tiny qwen3_5_moe checkpoints with known lineage, for `rioquant lineage` tests and bench.

One base checkpoint from `testing.checkpoints.build_checkpoint` (vocabulary cut to VOCAB rows: lineage
reads no tokenizer, and the 248K-row embedding would be 90 % of every file), two fine-tunes of it
(base + distinct random task vectors of TASK_SCALE of each tensor's spread), an unrelated model
(another seed), and children made from the parents with torch — independently of rioquant's kernels —
in float32 arithmetic (torch / mergekit ≥ 0.1) or bfloat16 arithmetic (older mergekit: weights and
products in bfloat16, summed in float32). `output_norm` (`model.norm.weight`) is left as the base's in
both fine-tunes: the parents are equal there, a tensor without evidence.
"""

import json
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rioquant.testing.checkpoints import TINY, build_checkpoint

VOCAB = 512
TASK_SCALE = 0.05
UNTOUCHED = "model.norm.weight"  # equal in both parents: no evidence
SPEC = replace(TINY, num_experts=4, moe_intermediate_size=64)

Weights = dict[str, torch.Tensor]


def _noise(name: str, tag: str, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{tag}:{name}".encode()))
    return torch.randn(like.shape, generator=g)


def _task_vector(name: str, tag: str, base: torch.Tensor, scale: float = TASK_SCALE) -> torch.Tensor:
    spread = base.float().std() if base.numel() > 1 else base.float().abs()
    return _noise(name, tag, base) * (scale * float(spread) + 1e-3)


def load(folder: Path) -> tuple[Weights, dict]:
    return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


def save(folder: Path, weights: Weights, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _small(spec, folder: Path) -> tuple[Weights, dict]:
    """A checkpoint of `spec` with its vocabulary cut to VOCAB rows."""
    weights, config = load(build_checkpoint(spec, folder / "full"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:VOCAB].clone()
    config["vocab_size"] = VOCAB
    return weights, config


def fine_tune(base: Weights, tag: str, scale: float = TASK_SCALE) -> Weights:
    return {name: w if name == UNTOUCHED else (w.float() + _task_vector(name, tag, w, scale)).to(w.dtype)
            for name, w in base.items()}


def blend_f32(a: torch.Tensor, b: torch.Tensor, wa: float) -> torch.Tensor:
    """bf16(wa·A + (1 − wa)·B) computed in float32, as torch (and mergekit ≥ 0.1) do."""
    return (a.float() * wa + b.float() * (1.0 - wa)).to(a.dtype)


def blend_bf16(a: torch.Tensor, b: torch.Tensor, wa: float) -> torch.Tensor:
    """Older mergekit's linear merge on bfloat16 tensors: weights held as bfloat16, products rounded to
    bfloat16, summed (torch accumulates a bfloat16 sum in float32), normalised by the bfloat16 weight sum."""
    weights = torch.tensor([wa, 1.0 - wa], dtype=a.dtype)
    stacked = torch.stack([a, b])
    shape = (2,) + (1,) * a.dim()
    return (weights.reshape(shape) * stacked).sum(dim=0) / weights.sum()


def per_tensor(parents: tuple[Weights, Weights], rule: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]) -> Weights:
    a, b = parents
    return {name: rule(name, a[name], b[name]) for name in a}


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def build_family(root: Path) -> dict[str, Path]:
    """Every model of the family under root, by role."""
    base, config = _small(SPEC, root / "base")
    other, _ = _small(replace(SPEC, seed=7), root / "other")
    a, b = fine_tune(base, "A"), fine_tune(base, "B")
    parents = (a, b)
    per_layer = {0: 0.3, 1: 0.45, 2: 0.6, 3: 0.75}

    def partial(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        layer = layer_of(name)
        return blend_f32(x, y, 0.6) if layer is not None and layer < 2 else x  # the rest copied from A

    def merged_then_trained(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        blended = blend_f32(x, y, 0.6).float()
        update = _task_vector(name, "update", base[name], 0.2 * TASK_SCALE)
        return (blended + update).to(x.dtype) if name != UNTOUCHED else blended.to(x.dtype)

    models: dict[str, Weights] = {
        "base": base, "A": a, "B": b, "other": other,
        "blend_f32": per_tensor(parents, lambda n, x, y: blend_f32(x, y, 0.6)),
        "blend_bf16": per_tensor(parents, lambda n, x, y: blend_bf16(x, y, 0.6)),
        "per_layer": per_tensor(parents, lambda n, x, y: blend_f32(x, y, per_layer.get(layer_of(n), 0.5))),
        "partial": per_tensor(parents, partial),
        "update": per_tensor(parents, merged_then_trained),
        "independent": fine_tune(base, "C"),
    }
    return {role: save(root / role, weights, config) for role, weights in models.items()}
