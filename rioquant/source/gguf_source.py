"""A GGUF as the source of a conversion, read as llama-quantize reads it.

One file or a whole split set (any shard names the set). Its tensors are already in GGUF form (names,
transforms applied), so each becomes a spec of its own, in the order llama-quantize writes them (its
loader's map: tensors outside the blocks first, then block by block, by name within each). Its keys are
copied in their order, except those llama-quantize drops (`split.*`) or sets again at the end
(`general.quantization_version`, `general.file_type`); a tensor whose type the recipe leaves alone
(llama.cpp's tensor_allows_quantization says no) keeps its type; a tensor already of its target type is
copied byte for byte. F32, F16 and BF16 are read exactly; Q8_0 is dequantized and quantized again,
with a warning, as llama-quantize does with --allow-requantize.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np

from rioquant.errors import CheckpointError
from rioquant.export.metadata import gguf_model_args
from rioquant.export.qwen35moe import ARCH
from rioquant.export.tensor_map import Piece, TensorSpec
from rioquant.files.gguf_file import TensorInfo, block_index, nbytes, read_tensor_bytes
from rioquant.files.gguf_set import GGUFSet, open_set
from rioquant.quant import dequantize
from rioquant.quant.plan import Origin, PlanEntry, ggml_n_dims
from rioquant.source import Source

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType
READABLE = (T.F32, T.F16, T.BF16, T.Q8_0)
# Keys llama-quantize does not copy as they are: the split keys (a new split writes its own) and the two
# it sets again after copying the rest (gguf_set_val removes a key and appends it).
NOT_COPIED = ("split.no", "split.count", "split.tensors.count", "general.quantization_version", "general.file_type")


def quantize_order(name: str) -> tuple[int, str]:
    """llama-quantize's tensor order (llama_model_loader's weight_name_comparer): block (-1 outside), name."""
    block = block_index(name)
    return (-1 if block is None else block, name)


class GGUFSource(Source):
    model: GGUFSet

    def read(self, tensor: TensorInfo, index: int | None = None) -> np.ndarray:  # type: ignore[override]
        shape = tensor.shape if index is None else tensor.shape[1:]
        return dequantize(read_tensor_bytes(tensor, index), tensor.qtype, shape)

    def read_rows(self, tensor: TensorInfo, index: int | None, rows: list[int]) -> np.ndarray:  # type: ignore[override]
        slab_shape = tensor.shape if index is None else tensor.shape[1:]
        row_bytes = nbytes(tensor.qtype, slab_shape[-1:])
        base = tensor.data_start + (index or 0) * nbytes(tensor.qtype, slab_shape)
        views = [replace(tensor, shape=(1, slab_shape[-1]), data_start=base + r * row_bytes) for r in rows]
        return np.concatenate([self.read(v) for v in views])

    def copies(self, spec: TensorSpec, qtype: str) -> bool:
        return spec.pieces[0].source.qtype == T[qtype]

    def raw_chunks(self, spec: TensorSpec, expert: int | None = None) -> Iterator[np.ndarray]:
        for piece in spec.pieces if expert is None else spec.pieces[expert:expert + 1]:
            yield read_tensor_bytes(piece.source, piece.index)

    def on_nodes(self) -> Source:
        """Without the driver's parts (the keys to copy, the parsed headers with the vocabulary): a task
        needs only the tensors' paths and offsets."""
        return replace(self, carried=None)

    def kept_entries(self, entries: list[PlanEntry]) -> list[PlanEntry]:
        types = {s.name: s.pieces[0].source.qtype for s in self.specs}
        return [replace(e, qtype=types[e.name].name, nbytes=nbytes(types[e.name], e.shape), rule="kept as in the GGUF")
                if e.origin == Origin.KEPT_F32 and types[e.name] != T.F32 else e for e in entries]


def gguf_source(path: Path, with_mtp: bool) -> GGUFSource:
    model = open_set(path)
    arch = model.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{model.path}: general.architecture is {arch!r}; rioquant converts {ARCH}")
    args = gguf_model_args(model)
    tensors = sorted(model.tensors.values(), key=lambda t: quantize_order(t.name))
    unreadable = next((t for t in tensors if t.qtype not in READABLE), None)
    if unreadable is not None:
        raise CheckpointError(f"{unreadable.file}: tensor {unreadable.name} is {unreadable.qtype.name}; a GGUF source "
                              "must be F32, F16, BF16 or Q8_0 (quantizing from a quantized file compounds the error)")
    has_mtp = any((block_index(t.name) or 0) >= args.num_hidden_layers for t in tensors)
    if has_mtp and not with_mtp:
        raise CheckpointError(f"{model.path}: --no-mtp: a GGUF's MTP layer is part of its block count; "
                              "convert from the checkpoint to drop it")
    if any(t.qtype == T.Q8_0 for t in tensors):
        log.warning("%s: Q8_0 tensors are dequantized and quantized again (llama-quantize's --allow-requantize); "
                    "the result is worse than quantizing the BF16 original", model.path)
    specs = [TensorSpec(t.name, _ggml_shape(t.shape), tuple(Piece(t, e) for e in range(t.shape[0])) if len(t.shape) == 3 else (Piece(t),),
                        None, block_index(t.name)) for t in tensors]  # type: ignore[arg-type]
    source = GGUFSource(model.path, {}, args, specs, identity=str(model.path.resolve()), carried=_copier(model))
    source.model = model
    return source


def _ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape llama-quantize writes: ggml's n_dims drops outer sizes of 1 ({H, 1} → {H})."""
    return shape[len(shape) - ggml_n_dims(shape):]


def _copier(model: GGUFSet):
    """The writer step that copies the GGUF's keys (with their exact types) in their order, from the header
    open_set already parsed (gguf-py's GGUFReader builds a numpy view per token: ~25 s for 248K tokens)."""
    header = model.first
    copied = [(k, header.value_types[k], header.array_item_types.get(k), v) for k, v in header.metadata.items()
              if k not in NOT_COPIED and k != "general.architecture"]

    def add(writer: gguf.GGUFWriter) -> None:
        for key, vtype, sub_type, value in copied:
            writer.add_key_value(key, value, vtype, sub_type)

    return add
