"""The conversion plan: for every GGUF tensor, its type, the rule that chose it, and its size.

Built from shapes alone, before any weight is read, so the same plan is the dry run, the size
estimate, the resume journal's key and the model card's table. The rules that no mix overrides are
llama.cpp's (llama-quant.cpp): which tensors are never quantized, and the fallback when a row does
not fit a type's block size. Between the two come, in llama-quantize's order, the user's overrides
and the recipe's rules (rioquant.quant.recipes); every entry records, in words, the rule that chose it.
"""

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum

from gguf import GGMLQuantizationType

from rioquant.errors import PlanError
from rioquant.files.gguf_file import block_index, nbytes
from rioquant.quant.rules import ModelFacts, Recipe, RecipeSource
from rioquant.quant.types import REQUIRES_IMATRIX, block_geometry

T = GGMLQuantizationType

# A row length that does not fit the target's block size falls back to a 32-block type, then F16
ROW_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS), T.IQ4_NL),
}

# llama-quantize writes the REQUIRES_IMATRIX types without importance data only for these two
# (tensor_requires_imatrix)
IMATRIX_EXEMPT = ("token_embd.weight", "output.weight")


class Origin(Enum):
    """What chose an entry's type, in llama.cpp's order; `PlanEntry.rule` says it in words."""

    KEPT_F32 = "kept F32"  # never quantized: 1-D, or one of the architecture's keep_f32 names
    OPTION = "option"  # the user's --tensor-type, --output-tensor-type or --token-embedding-type
    RECIPE_RULE = "recipe rule"  # the first matching rule of the recipe
    RECIPE_DEFAULT = "recipe default"  # no rule matched
    UNIFORM = "uniform"  # a uniform recipe's one type
    BUDGET = "budget"  # raised by --target-size / --target-bpw


@dataclass(frozen=True)
class PlanEntry:
    """One GGUF tensor in the plan. `shape` is numpy order (rows last). `rule` is for people (it also
    names a row-length fallback); `origin` is what code asks (may the budget raise this tensor?)."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    rule: str
    nbytes: int
    origin: Origin


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml's view of dimensionality: leading (numpy order) sizes of 1 do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def is_quantizable(name: str, shape: Sequence[int], keep_f32: Sequence[str]) -> bool:
    """llama.cpp's tensor_allows_quantization: 2-D/3-D weights, except names holding one of the
    architecture's `keep_f32` substrings (norms, router, conv for qwen35moe)."""
    return ggml_n_dims(shape) >= 2 and name.endswith("weight") and not any(part in name for part in keep_f32)


def fit_row_length(qtype: GGMLQuantizationType, n_per_row: int) -> tuple[GGMLQuantizationType, bool]:
    """llama.cpp's tensor_type_fallback: (type that fits the row, whether it fell back)."""
    block, _ = block_geometry(qtype)
    if n_per_row % block == 0:
        return qtype, False
    fallback = ROW_FALLBACK.get(qtype, qtype)
    if n_per_row % block_geometry(fallback)[0] != 0:
        fallback = T.F16
    return fallback, True


def needs_imatrix(entry: PlanEntry) -> bool:
    """Whether llama-quantize would refuse this tensor without an imatrix (tensor_requires_imatrix)."""
    return T[entry.qtype] in REQUIRES_IMATRIX and entry.name not in IMATRIX_EXEMPT


def recipe_needs_imatrix(recipe: Recipe) -> bool:
    """Whether the recipe names a type of REQUIRES_IMATRIX: a mix to make with --imatrix (on a given model all
    such tensors may still fall back to types that need none, as on rows that fit no 256-block)."""
    return any(T[t] in REQUIRES_IMATRIX for t in (recipe.default, *(r.qtype for r in recipe.rules)))


def plan_fingerprint(entries: Sequence[PlanEntry], options: dict) -> str:
    """A hash of everything that determines the output bytes: the resume journal's key."""
    payload = json.dumps({"entries": [asdict(e) for e in entries], "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Recipes: the type of every tensor from a mix (rioquant.quant.recipes) and the user's overrides.

@dataclass(frozen=True)
class Overrides:
    """llama-quantize's overrides: `--tensor-type` (first match wins), output and token-embedding types."""

    tensor_types: tuple[tuple[str, str], ...] = ()  # (regex searched in the name, type)
    output_type: str | None = None
    token_embd_type: str | None = None


def _exact(name: str, shape: tuple[int, ...], qtype: str, option: str, rule: str) -> PlanEntry:
    """A type the user named for one tensor: no fallback (llama.cpp applies none either), so it must fit."""
    block, _ = block_geometry(T[qtype])
    if shape[-1] % block:
        raise PlanError(f"{option} {qtype}: {name} has rows of {shape[-1]}, not a multiple of {qtype}'s block of {block}")
    return PlanEntry(name, shape, qtype, rule, nbytes(T[qtype], shape), Origin.OPTION)


def recipe_entry(
    name: str, shape: tuple[int, ...], recipe: Recipe, facts: ModelFacts, overrides: Overrides = Overrides(),
    tied_embeddings: bool = False,
) -> PlanEntry:
    """One tensor's type, in llama.cpp's order: never quantized, user overrides, recipe rules, row fallback."""
    if not is_quantizable(name, shape, facts.keep_f32):
        return PlanEntry(name, shape, "F32", "never quantized (1-D, norm, router or conv)", nbytes(T.F32, shape),
                         Origin.KEPT_F32)
    if name == "token_embd.weight" and overrides.token_embd_type:
        return _exact(name, shape, overrides.token_embd_type, "--token-embedding-type", "--token-embedding-type")
    if name == "output.weight" and overrides.output_type:
        return _exact(name, shape, overrides.output_type, "--output-tensor-type", "--output-tensor-type")
    row = shape[-1]
    manual = next(((p, t) for p, t in overrides.tensor_types if re.search(p, name)), None)
    if manual is not None:
        qtype, rule, origin = manual[1], f"--tensor-type {manual[0]}={manual[1]}", Origin.OPTION
    elif recipe.is_float:
        qtype, rule, origin = recipe.default, f"uniform {recipe.default}", Origin.UNIFORM
    else:
        # llama.cpp gives a tied token_embd (no output.weight) the output tensor's rules
        role = "output.weight" if tied_embeddings and name == "token_embd.weight" else name
        chosen = recipe.first_match(role, block_index(name), row, facts)
        if chosen is not None:
            qtype, rule, origin = chosen.qtype, f"{recipe.name}: {chosen.describe()}", Origin.RECIPE_RULE
        elif recipe.source is RecipeSource.UNIFORM:
            qtype, rule, origin = recipe.default, f"uniform {recipe.default}", Origin.UNIFORM
        else:
            qtype, rule, origin = recipe.default, f"{recipe.name}: default {recipe.default}", Origin.RECIPE_DEFAULT
    fitted, fell_back = fit_row_length(T[qtype], row)
    if fell_back:
        rule += f"; row of {row} does not fit {qtype} → {fitted.name}"
    return PlanEntry(name, shape, fitted.name, rule, nbytes(fitted, shape), origin)


def recipe_entries(
    tensors: Sequence[tuple[str, tuple[int, ...]]], recipe: Recipe, facts: ModelFacts, overrides: Overrides = Overrides(),
) -> list[PlanEntry]:
    """The plan entries of every tensor (name, numpy shape), in the given order."""
    tied = not any(name == "output.weight" for name, _ in tensors)
    return [recipe_entry(name, shape, recipe, facts, overrides, tied) for name, shape in tensors]
