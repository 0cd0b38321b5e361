"""Weights for the forward pass, one layer at a time, under GGUF names, from either kind of source.

A Hugging Face checkpoint is read through the converter's own table (`export.qwen35moe.tensor_specs`
and its transforms: +1 on norms, -exp(A_log), V heads in tiled order), so both sources hand the
forward pass the same tensors under the same names and one forward pass serves both. A GGUF tensor is
dequantized when its layer is loaded; an expert stack stays in its stored form (quantized bytes or
BF16) and one expert is dequantized when the forward pass reaches it, so a layer costs its stored size.

Layer tensors are keyed by kind: `blk.3.attn_q.weight` → `attn_q`, `blk.3.ssm_dt.bias` → `ssm_dt`.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from rioquant.errors import CheckpointError, EvaluationError
from rioquant.evaluate.dequant import dequantize_rows, dequantize_to, dequantize_torch
from rioquant.export.checkpoint import read_config, read_float32, scan_tensors
from rioquant.export.metadata import gguf_model_args
from rioquant.export.qwen35moe import ARCH, KEEP_F32, ModelArgs, load_tensor, model_args, tensor_specs
from rioquant.export.tensor_map import TensorSpec, load_piece
from rioquant.files.gguf_file import TensorInfo, read_tensor_bytes, tensor_kind
from rioquant.files.gguf_set import open_set
from rioquant.quant.plan import is_quantizable

F32 = GGMLQuantizationType.F32
SOURCE_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def rope_sections(a: ModelArgs) -> tuple[int, int, int, int]:
    """ggml's four MRoPE sections (text, height, width, extra) from the three a text model uses."""
    return (*[*a.mrope_section, 0, 0, 0][:3], 0)


class StoredRows:
    """A weight [n, *item] held in its stored form (quantized bytes, or a BF16/F16/F32 tensor), dequantized to
    float32 a range of its first axis at a time: the rows of a vocabulary slice of the output matrix, or
    one expert of a stack. Held this way a tensor costs its stored size, and what is dequantized is used at
    once, while it is still in cache."""

    def __init__(self, name: str, shape: tuple[int, ...], device: torch.device,
                 raw: np.ndarray | None = None, qtype: GGMLQuantizationType | None = None,
                 dense: torch.Tensor | None = None) -> None:
        self.name, self.shape, self.device = name, tuple(shape), device
        self.qtype = qtype
        self.raw = raw  # uint8 (n, item bytes) in host memory, dequantized by Numba (CPU)
        self.raw_device = None  # the same bytes on the GPU, dequantized by the torch kernels (CUDA)
        if raw is not None and device.type != "cpu":
            self.raw_device, self.raw = torch.from_numpy(raw).to(device), None
        self.dense = dense  # BF16/F16/F32 [n, *item] on device (HF source)

    @property
    def nbytes(self) -> int:
        held = next(t for t in (self.dense, self.raw_device) if t is not None) if self.raw is None else None
        return int(self.raw.nbytes) if held is None else held.numel() * held.element_size()

    @property
    def float_bytes(self) -> int:
        return 4 * math.prod(self.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """float32 [stop - start, *item] on the device."""
        shape = (stop - start, *self.shape[1:])
        if self.dense is not None:
            return self.dense[start:stop].float()
        if self.raw_device is not None:
            return dequantize_torch(self.raw_device[start:stop], self.qtype, shape)
        return dequantize_to(self.raw[start:stop], self.qtype, shape, self.device)


class ExpertStack(StoredRows):
    """An expert tensor [E, rows, cols] held in its stored form; `expert(e)` is float32 (rows, cols)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache: dict[int, torch.Tensor] | None = None  # float32 slabs, when keep_dequantized()

    def keep_dequantized(self) -> None:
        """Keep each expert's float32 slab after first use (when the layer meets several chunk groups)."""
        self.cache = {}

    def expert(self, e: int) -> torch.Tensor:
        if self.cache is not None and e in self.cache:
            return self.cache[e]
        w = self.rows(e, e + 1)[0]
        if self.cache is not None:
            self.cache[e] = w
        return w


LayerWeights = dict[str, "torch.Tensor | ExpertStack"]


@dataclass(frozen=True)
class HeadWeights:
    output_norm: torch.Tensor  # (H,)
    output: StoredRows  # (n_vocab, H), dequantized a vocabulary slice at a time


class ModelSource:
    """What the engine needs from a model: its shape, one layer's weights, the embedding and the head."""

    path: Path
    kind: str  # "hf" or "gguf"
    args: ModelArgs
    rope_sections: tuple[int, int, int, int]
    n_vocab: int

    def layer(self, il: int, device: torch.device) -> LayerWeights:
        raise NotImplementedError

    def embedding_rows(self, token_ids: np.ndarray) -> np.ndarray:
        """float32 (len(token_ids), H): rows of the token embedding."""
        raise NotImplementedError

    def head(self, device: torch.device) -> HeadWeights:
        raise NotImplementedError

    def weight_types(self, il: int | None) -> dict[str, GGMLQuantizationType]:
        """Stored type of each matrix of layer il (None: the head, as {"output": type}), for ggml numerics."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.path} ({self.kind})"


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoint


class HFSource(ModelSource):
    kind = "hf"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.args = model_args(read_config(path), str(path / "config.json"))
        self.rope_sections = rope_sections(self.args)
        specs = tensor_specs(scan_tensors(path), self.args, with_mtp=False)
        self.top = {s.name: s for s in specs if s.layer is None}
        self.layers: dict[int, list[TensorSpec]] = {}
        for spec in specs:
            if spec.layer is not None:
                self.layers.setdefault(spec.layer, []).append(spec)
        self.n_vocab = self.args.vocab_size

    def _float(self, spec: TensorSpec) -> np.ndarray:
        return load_tensor(spec, self.args, read_float32)

    def layer(self, il: int, device: torch.device) -> LayerWeights:
        weights: LayerWeights = {}
        for spec in self.layers[il]:
            kind = tensor_kind(spec.name)
            if spec.is_expert_stack:
                dtype = SOURCE_TORCH_DTYPES[spec.pieces[0].source.dtype]
                dense = torch.empty(spec.shape, dtype=dtype, device=device)
                for e, piece in enumerate(spec.pieces):  # f32 → source dtype is exact
                    dense[e] = torch.from_numpy(load_piece(piece, read_float32)).to(dtype)
                weights[kind] = ExpertStack(spec.name, spec.shape, device, dense=dense)
            else:
                weights[kind] = torch.from_numpy(self._float(spec)).to(device)
        return weights

    def weight_types(self, il: int | None) -> dict[str, GGMLQuantizationType]:
        """As the BF16/F16/F32 GGUF of this checkpoint would store them (routers kept F32 by the converter)."""
        if il is None:
            spec = self.top.get("output.weight", self.top["token_embd.weight"])
            return {"output": GGMLQuantizationType[spec.pieces[0].source.dtype]}
        types = {}
        for spec in self.layers[il]:
            keep_f32 = not is_quantizable(spec.name, spec.shape, KEEP_F32)
            types[tensor_kind(spec.name)] = F32 if keep_f32 else GGMLQuantizationType[spec.pieces[0].source.dtype]
        return types

    def embedding_rows(self, token_ids: np.ndarray) -> np.ndarray:
        spec = self.top["token_embd.weight"]
        return read_float32(spec.pieces[0].source)[token_ids]

    def head(self, device: torch.device) -> HeadWeights:
        norm = torch.from_numpy(self._float(self.top["output_norm.weight"])).to(device)
        out_spec = self.top.get("output.weight", self.top["token_embd.weight"])  # tied embeddings
        dense = torch.from_numpy(self._float(out_spec)).to(device)
        return HeadWeights(norm, StoredRows(out_spec.name, tuple(dense.shape), device, dense=dense))


# ---------------------------------------------------------------------------------------------
# GGUF


class GGUFSource(ModelSource):
    kind = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model = open_set(path)
        arch = self.model.get("general.architecture")
        if arch != ARCH:
            raise EvaluationError(f"{path}: architecture {arch!r}; rioquant evaluates {ARCH} models only")
        self.args = gguf_model_args(self.model)
        self.rope_sections = rope_sections(self.args)
        self.n_vocab = self.args.vocab_size

    def _tensor(self, name: str) -> TensorInfo:
        tensor = self.model.tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"{self.path}: tensor {name} missing")
        return tensor

    def _float(self, tensor: TensorInfo, device: torch.device) -> torch.Tensor:
        return dequantize_to(read_tensor_bytes(tensor), tensor.qtype, tensor.shape, device)

    def layer(self, il: int, device: torch.device) -> LayerWeights:
        prefix = f"blk.{il}."
        weights: LayerWeights = {}
        for name, tensor in self.model.tensors.items():
            if not name.startswith(prefix):
                continue
            kind = tensor_kind(name)
            if len(tensor.shape) == 3:
                raw = read_tensor_bytes(tensor).reshape(tensor.shape[0], -1)
                weights[kind] = ExpertStack(name, tensor.shape, device, raw=raw, qtype=tensor.qtype)
            else:
                weights[kind] = self._float(tensor, device)
        if not weights:
            raise CheckpointError(f"{self.path}: no tensors for block {il}")
        return weights

    def weight_types(self, il: int | None) -> dict[str, GGMLQuantizationType]:
        if il is None:
            out = self.model.tensors.get("output.weight") or self._tensor("token_embd.weight")
            return {"output": out.qtype}
        prefix = f"blk.{il}."
        return {tensor_kind(n): t.qtype for n, t in self.model.tensors.items() if n.startswith(prefix)}

    def embedding_rows(self, token_ids: np.ndarray) -> np.ndarray:
        tensor = self._tensor("token_embd.weight")
        return dequantize_rows(read_tensor_bytes(tensor), tensor.qtype, tensor.shape[1], token_ids)

    def head(self, device: torch.device) -> HeadWeights:
        norm = self._float(self._tensor("output_norm.weight"), device)
        out = self.model.tensors.get("output.weight") or self._tensor("token_embd.weight")
        raw = read_tensor_bytes(out).reshape(out.shape[0], -1)
        return HeadWeights(norm, StoredRows(out.name, out.shape, device, raw=raw, qtype=out.qtype))


def open_source(path: Path | str) -> ModelSource:
    """A Hugging Face checkpoint directory or a GGUF file (any file of a split set)."""
    path = Path(path)
    if path.is_dir():
        return HFSource(path)
    if path.is_file():
        return GGUFSource(path)
    raise EvaluationError(f"{path}: no such model (expected a checkpoint directory or a .gguf file)")
