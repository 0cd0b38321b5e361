"""The recipe language: a rule is a tensor-name pattern plus conditions → a type; a recipe is a default
type, llama.cpp's file type and ordered rules, first match wins (the built-in tables are in recipes.py).

Conditions a rule may carry, all of which must hold:
- `layers`: a condition on the tensor's block index i, with n the block count (the MTP block included:
  llama.cpp's n_layer_all). "use_more_bits" is llama.cpp's
  `i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`; otherwise "i < 2", "i < n/8", "i >= 7*n/8" (integer
  division, as in C). Tensors outside a block (output, token_embd) never match a layer condition.
  llama.cpp indexes attn_v-like rules by a counter of attn_v-like tensors visited in (block, name)
  order, and ffn_down rules by the block in the name; qwen35moe has exactly one attn_v-like tensor per
  block (attn_qkv in linear-attention blocks, attn_v in full-attention ones), so both are the block index.
  The one exception is the ffn_down rule of the lowest-bit i-quant mixes (IQ1_*, IQ2_*), which counts
  ffn_down tensors as visited: two per block here, ffn_down_exps before ffn_down_shexp, so the k-th is
  2i or 2i+1, written "2*i < n/8" and "2*i+1 < n/8" (the left side may be "A*i+B").
- `experts`: the model has exactly this many experts (llama.cpp special-cases 8); `min_experts`: at least.
- `min_gqa`: n_head / n_head_kv is at least this.
- `row_misfit`: the row length is not a multiple of the default type's block (llama.cpp then gives
  output.weight Q8_0 instead of Q6_K).
- `imatrix`: an importance matrix is given (True) or not (False): llama.cpp's `has_imatrix`, which a few
  i-quant and legacy mixes look at.

Patterns are Python regular expressions searched in the GGUF tensor name (`re.search`, like
llama-quantize's `std::regex_search`). The llama.cpp categories are substrings, reproduced exactly:
"attn_v-like" is attn_v.weight, attn_qkv.weight or attn_kv_b.weight (so the linear-attention attn_qkv is
treated as attn_v, and llama.cpp's separate ATTENTION_QKV branch is never reached); "ffn_down" covers
ffn_down_exps and ffn_down_shexp.
"""

import re
from dataclasses import dataclass
from enum import StrEnum

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from rioquant.errors import PlanError

T = GGMLQuantizationType


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules look at besides the tensor name: expert count, GQA ratio, block count."""

    n_expert: int
    n_gqa: int  # n_head // n_head_kv
    n_blocks: int  # transformer blocks including MTP (NextN) blocks: llama.cpp's n_layer_all
    keep_f32: tuple[str, ...] = ()  # the architecture's never-quantized name substrings (export.qwen35moe.KEEP_F32)
    has_imatrix: bool = False  # --imatrix given: not a fact of the model, but llama.cpp's rules read it


_LAYER_CONDITION = re.compile(
    r"^(?:(\d+)\s*\*\s*)?i(?:\s*\+\s*(\d+))?\s*(<|<=|>|>=)\s*(?:(\d+)|(?:(\d+)\s*\*\s*)?n\s*/\s*(\d+)|n)$"
)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the blocks and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def layer_condition_holds(condition: str, i: int, n: int) -> bool:
    """Evaluate a `layers` condition (see the module docstring) for block i of n."""
    if condition == "use_more_bits":
        return use_more_bits(i, n)
    match = _LAYER_CONDITION.match(condition.strip())
    if match is None:
        raise PlanError(f"layer condition {condition!r}: expected use_more_bits, 'i < K', 'i < n/D', 'i >= M*n/D' or 'A*i+B < n/D'")
    scale, offset, op, const, mult, div = match.groups()
    i = int(scale or 1) * i + int(offset or 0)
    if const is not None:
        bound = int(const)
    elif div is not None:
        bound = int(mult or 1) * n // int(div)
    else:
        bound = n
    return {"<": i < bound, "<=": i <= bound, ">": i > bound, ">=": i >= bound}[op]


@dataclass(frozen=True)
class Rule:
    """One row of a recipe: tensors whose name matches `pattern` (and the conditions) get `qtype`."""

    pattern: str
    qtype: str
    why: str = ""
    layers: str | None = None
    experts: int | None = None
    min_gqa: int | None = None
    row_misfit: bool = False
    min_experts: int | None = None
    imatrix: bool | None = None

    def matches(self, name: str, block: int | None, row: int, default: str, facts: ModelFacts) -> bool:
        if not re.search(self.pattern, name):
            return False
        if self.experts is not None and facts.n_expert != self.experts:
            return False
        if self.min_gqa is not None and facts.n_gqa < self.min_gqa:
            return False
        if self.min_experts is not None and facts.n_expert < self.min_experts:
            return False
        if self.imatrix is not None and facts.has_imatrix != self.imatrix:
            return False
        if self.row_misfit and row % GGML_QUANT_SIZES[T[default]][0] == 0:
            return False
        if self.layers is not None and (block is None or not layer_condition_holds(self.layers, block, facts.n_blocks)):
            return False
        return True

    def describe(self) -> str:
        if self.why:
            return self.why
        conditions = [c for c in (
            self.layers and f"layers {self.layers}",
            self.experts is not None and f"{self.experts} experts",
            self.min_gqa is not None and f"n_gqa >= {self.min_gqa}",
            self.row_misfit and "row does not fit the default type",
            self.min_experts is not None and f">= {self.min_experts} experts",
            self.imatrix is not None and ("with an imatrix" if self.imatrix else "without an imatrix"),
        ) if c]
        return f"/{self.pattern}/" + (f" ({', '.join(conditions)})" if conditions else "") + f" → {self.qtype}"


class RecipeSource(StrEnum):
    """Where a built-in recipe comes from (a user recipe's source is its TOML path)."""

    LLAMA_CPP = "llama.cpp"  # llama-quantize's mixes, equal to llama_model_quantize
    RIOQUANT = "rioquant"  # rioquant's dynamic mixes
    UNIFORM = "uniform"  # one type for every quantizable tensor, no rules


@dataclass(frozen=True)
class Recipe:
    """A named mix: the default type, llama.cpp's file type to record, and ordered rules."""

    name: str
    default: str
    file_type: LlamaFileType
    rules: tuple[Rule, ...] = ()
    summary: str = ""
    source: "RecipeSource | str" = RecipeSource.LLAMA_CPP  # or the user's TOML path

    def first_match(self, name: str, block: int | None, row: int, facts: ModelFacts) -> Rule | None:
        return next((r for r in self.rules if r.matches(name, block, row, self.default, facts)), None)

    @property
    def is_float(self) -> bool:
        return self.default in ("F32", "F16", "BF16")
