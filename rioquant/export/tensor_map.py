"""The architecture-neutral half of a tensor map: table rows, where each GGUF tensor's data comes from.

An architecture module (export/qwen35moe.py) lists its tensors as `TensorRule` rows and walks them
into `TensorSpec`s; the converter and the evaluator read a spec's `Piece`s without knowing the
architecture. Names come from gguf-py's TENSOR_NAMES, so there is no second spelling of them here.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES

from rioquant.errors import CheckpointError
from rioquant.export.checkpoint import SourceTensor

ShapeFn = Callable[[Any], tuple[int, ...]]  # the architecture's ModelArgs → HF (torch) shape

# Where multimodal checkpoints keep the vision tower: transformers writes `model.visual.`, other exports
# `visual.` or `model.language_model.visual.` (llama.cpp's converter writes an empty mmproj for the last).
# The text GGUF leaves all of them out; export/qwen35moe_vision.py reads them into the mmproj.
VISION_PREFIXES = ("model.visual.", "visual.", "model.language_model.visual.")


@dataclass(frozen=True)
class TensorRule:
    """One row of an architecture's table: an HF tensor, its GGUF name, shape and transform."""

    hf: str  # name inside the layer (or at top level)
    gguf: MODEL_TENSOR
    suffix: str  # ".weight", ".bias" or ""
    shape: ShapeFn
    transform: str | None = None  # a name in the architecture's TRANSFORMS, recorded in the plan


@dataclass(frozen=True)
class Piece:
    """A part of a GGUF tensor's data: `rows` of slab `index` (or the whole) of one source tensor."""

    source: SourceTensor
    index: int | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: its name, numpy-order shape, the pieces stacked on axis 0, and its transform."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    transform: str | None
    layer: int | None

    @property
    def is_expert_stack(self) -> bool:
        return len(self.shape) == 3


def gguf_name(rule: TensorRule, layer: int | None) -> str:
    return TENSOR_NAMES[rule.gguf].format(bid=layer) + rule.suffix


class SourceNames:
    """Source tensors with the language-model prefix removed; tracks which ones were consumed.

    Hugging Face's multimodal checkpoints nest the text model under `model.language_model.` and keep
    the vision tower under one of VISION_PREFIXES; the tower goes to the mmproj file, not the text GGUF."""

    def __init__(self, tensors: dict[str, SourceTensor]) -> None:
        self.by_name: dict[str, SourceTensor] = {}
        for name, tensor in tensors.items():
            if name.startswith(VISION_PREFIXES):
                continue
            short = re.sub(r"^model\.(language_model\.)?", "", name)
            self.by_name[short] = tensor
        self.used: set[str] = set()

    def take(self, name: str, rule_shape: tuple[int, ...]) -> SourceTensor:
        tensor = self.by_name.get(name)
        if tensor is None:
            raise CheckpointError(f"checkpoint has no tensor {name} (expected from config.json)")
        if tensor.shape != rule_shape:
            raise CheckpointError(
                f"{tensor.file.name}: tensor {tensor.name} has shape {list(tensor.shape)}, "
                f"config.json implies {list(rule_shape)}"
            )
        self.used.add(name)
        return tensor

    def has(self, name: str) -> bool:
        return name in self.by_name


def mtp_layer_count(specs: list[TensorSpec], n_layers: int) -> int:
    """How many NextN layers the spec list carries beyond the `n_layers` decoder blocks (0 when MTP is
    dropped or absent)."""
    layers = {s.layer for s in specs if s.layer is not None}
    return max(0, len(layers) - n_layers)


def load_piece(piece: Piece, read: Callable[[SourceTensor, int | None], np.ndarray]) -> np.ndarray:
    """One expert slab as float32 (rows, cols)."""
    values = read(piece.source, piece.index)
    return values[piece.rows[0] : piece.rows[1]] if piece.rows else values
