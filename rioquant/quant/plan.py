"""The conversion plan: for every GGUF tensor, its type, the rule that chose it, and its size.

Built from shapes alone, before any weight is read, so the same plan is the dry run, the size
estimate, the resume journal's key and the model card's table. The rules that no mix overrides are
llama.cpp's (llama-quant.cpp): which tensors are never quantized, and the fallback when a row does
not fit a type's block size.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from gguf import GGMLQuantizationType

from rioquant.quant.types import block_geometry

T = GGMLQuantizationType

# Substrings of names llama.cpp never quantizes (kept in the converter's F32)
NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d")

# A row length that does not fit the target's block size falls back to a 32-block type, then F16
ROW_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


@dataclass(frozen=True)
class PlanEntry:
    """One GGUF tensor in the plan. `shape` is numpy order (rows last)."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    rule: str
    nbytes: int


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml's view of dimensionality: leading (numpy order) sizes of 1 do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def is_quantizable(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's tensor_allows_quantization for qwen35moe: 2-D/3-D weights but norms, router, conv."""
    return (
        ggml_n_dims(shape) >= 2
        and name.endswith("weight")
        and not any(part in name for part in NEVER_QUANTIZED)
    )


def fit_row_length(qtype: GGMLQuantizationType, n_per_row: int) -> tuple[GGMLQuantizationType, bool]:
    """llama.cpp's tensor_type_fallback: (type that fits the row, whether it fell back)."""
    block, _ = block_geometry(qtype)
    if n_per_row % block == 0:
        return qtype, False
    fallback = ROW_FALLBACK.get(qtype, qtype)
    if n_per_row % block_geometry(fallback)[0] != 0:
        fallback = T.F16
    return fallback, True


def tensor_nbytes(qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    block, type_bytes = block_geometry(qtype)
    n = 1
    for d in shape:
        n *= d
    return n // block * type_bytes


def uniform_entry(name: str, shape: tuple[int, ...], target: GGMLQuantizationType) -> PlanEntry:
    """The type of one tensor when every quantizable tensor gets `target` (`--type Q4_K`, F16, …)."""
    if target is T.F32 or not is_quantizable(name, shape):
        qtype = T.F32
        rule = "F32 output" if target is T.F32 else "never quantized (1-D, norm, router or conv)"
    else:
        qtype, fell_back = fit_row_length(target, shape[-1])
        rule = f"row length {shape[-1]} does not fit {target.name}: fallback" if fell_back else f"uniform {target.name}"
    return PlanEntry(name, shape, qtype.name, rule, tensor_nbytes(qtype, shape))


def plan_fingerprint(entries: Sequence[PlanEntry], options: dict) -> str:
    """A hash of everything that determines the output bytes: the resume journal's key."""
    payload = json.dumps({"entries": [asdict(e) for e in entries], "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
