"""Quantization recipes as data: ordered rules (tensor-name pattern, conditions → type), first match wins.

A recipe names the default type of every quantizable tensor and the rules that override it. The
llama.cpp mixes below are `llama_tensor_get_type_impl` (src/llama-quant.cpp) for qwen35moe, rewritten
as tables and checked tensor by tensor against `llama_model_quantize` (tests/test_recipes.py); the XL
mixes are ours (docs/recipes.md gives the reason for every rule). plan.py applies a recipe: never-quantized
tensors first, then user overrides, then these rules, then llama.cpp's row-length fallback.

The rule language (patterns, conditions) is rules.py.
"""

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from gguf import GGMLQuantizationType, LlamaFileType

from rioquant.errors import PlanError, QuantInputError
from rioquant.export.qwen35moe import ATTENTION, DOWN_EXPS, MTP_PROJ, SHARED_EXPERT, SSM_GATES, SSM_OUT
from rioquant.quant.rules import Recipe, RecipeSource, Rule, layer_condition_holds
from rioquant.quant.types import parse_qtype

T = GGMLQuantizationType
F = LlamaFileType


# ---------------------------------------------------------------------------------------------
# llama.cpp's categories (substring tests in tensor_get_category) and the rules every mix shares.

OUTPUT = r"^output\.weight$"
TOKEN_EMBD = r"^token_embd\.weight$"
ATTN_V_LIKE = r"attn_v\.weight|attn_qkv\.weight|attn_kv_b\.weight"
ATTN_K = r"attn_k\.weight"
ATTN_OUTPUT = r"attn_output\.weight"
FFN_DOWN = r"ffn_down"
ATTN_Q = r"attn_q\.weight"
FFN_GATE_UP = r"ffn_gate|ffn_up"

# output.weight: Q8_0 when its row does not fit the mix's block, else Q6_K (Q8_0 mixes keep Q8_0)
OUTPUT_Q8_0_IF_MISFIT = Rule(OUTPUT, "Q8_0", "output: row does not fit the mix's block → Q8_0", row_misfit=True)
OUTPUT_Q6_K = Rule(OUTPUT, "Q6_K", "output → Q6_K")
OUTPUT_Q5_K = Rule(OUTPUT, "Q5_K", "output → Q5_K")  # the lowest-bit i-quant mixes
# "for the 8-expert model, bumping this to Q8_0 trades just ~128MB" (llama-quant.cpp)
EIGHT_EXPERTS = (
    Rule(ATTN_V_LIKE, "Q8_0", "8-expert model: attn_v/attn_qkv → Q8_0", experts=8),
    Rule(ATTN_K, "Q8_0", "8-expert model: attn_k → Q8_0", experts=8),
)
EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K = Rule(ATTN_OUTPUT, "Q5_K", "8-expert model: attn_output → Q5_K", experts=8)


def _llama(name: str, default: str, file_type: LlamaFileType, summary: str, *rules: Rule,
           output_rule: Rule = OUTPUT_Q6_K) -> Recipe:
    output = (OUTPUT_Q8_0_IF_MISFIT,) if default == "Q8_0" else (OUTPUT_Q8_0_IF_MISFIT, output_rule)
    return Recipe(name, default, file_type, (*output, *EIGHT_EXPERTS, *rules), summary)


def _llama_lowest(name: str, default: str, file_type: LlamaFileType, summary: str, *, token_embd: str, low: str,
                  attn_output: str | None) -> Recipe:
    """llama.cpp's branch for IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ2_M, which replaces the shared
    rules: output Q5_K, no 8-expert Q8_0, and `low` (Q2_K or IQ3_S) for the first n/8 ffn_down tensors
    as visited (two per block: see the module docstring)."""
    rules = (
        OUTPUT_Q8_0_IF_MISFIT,
        OUTPUT_Q5_K,
        Rule(TOKEN_EMBD, token_embd, f"token_embd → {token_embd}"),
        Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K (n_head/n_head_kv >= 4)", min_gqa=4),
        Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K (>= 4 experts)", min_experts=4),
        Rule(ATTN_V_LIKE, low, f"attn_v/attn_qkv → {low}"),
        Rule(ATTN_K, "Q4_K", "8-expert model: attn_k → Q4_K", experts=8),
        Rule(r"ffn_down_exps", low, f"ffn_down among the first n/8 ffn_down tensors → {low}", layers="2*i < n/8"),
        Rule(r"ffn_down_shexp", low, f"ffn_down among the first n/8 ffn_down tensors → {low}", layers="2*i+1 < n/8"),
        EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
        *((Rule(ATTN_OUTPUT, attn_output, f"attn_output → {attn_output}"),) if attn_output else ()),
    )
    return Recipe(name, default, file_type, rules, summary)


# IQ4_XS and IQ4_NL share every rule (llama.cpp treats the two ftypes alike)
IQ4_RULES = (
    EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
    Rule(ATTN_V_LIKE, "Q5_K", "attn_v/attn_qkv → Q5_K (n_head/n_head_kv >= 4)", min_gqa=4),
    Rule(FFN_DOWN, "Q5_K", "ffn_down in the first n/8 blocks → Q5_K (without an imatrix)", layers="i < n/8",
         imatrix=False),
)

LLAMA_MIXES: dict[str, Recipe] = {r.name: r for r in (
    _llama("Q8_0", "Q8_0", F.MOSTLY_Q8_0, "everything Q8_0"),
    _llama("Q6_K", "Q6_K", F.MOSTLY_Q6_K, "everything Q6_K"),
    _llama("Q5_K_M", "Q5_K", F.MOSTLY_Q5_K_M, "Q5_K; Q6_K for attn_v-like and ffn_down in use_more_bits blocks",
           Rule(ATTN_V_LIKE, "Q6_K", "attn_v/attn_qkv in use_more_bits blocks → Q6_K", layers="use_more_bits"),
           Rule(FFN_DOWN, "Q6_K", "ffn_down in use_more_bits blocks → Q6_K", layers="use_more_bits")),
    _llama("Q5_K_S", "Q5_K", F.MOSTLY_Q5_K_S, "Q5_K; output Q6_K"),
    _llama("Q4_K_M", "Q4_K", F.MOSTLY_Q4_K_M, "Q4_K; Q6_K for attn_v-like and ffn_down in use_more_bits blocks",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(ATTN_V_LIKE, "Q6_K", "attn_v/attn_qkv in use_more_bits blocks → Q6_K", layers="use_more_bits"),
           Rule(FFN_DOWN, "Q6_K", "ffn_down in use_more_bits blocks → Q6_K", layers="use_more_bits")),
    _llama("Q4_K_S", "Q4_K", F.MOSTLY_Q4_K_S, "Q4_K; Q5_K for the first attn_v-like and ffn_down blocks",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(ATTN_V_LIKE, "Q5_K", "attn_v/attn_qkv in the first 4 blocks → Q5_K", layers="i < 4"),
           Rule(FFN_DOWN, "Q5_K", "ffn_down in the first n/8 blocks → Q5_K", layers="i < n/8")),
    _llama("Q3_K_L", "Q3_K", F.MOSTLY_Q3_K_L, "Q3_K; Q5_K for attn_v-like, ffn_down and attn_output",
           Rule(ATTN_OUTPUT, "Q3_K", "8-expert model: attn_output keeps Q3_K", experts=8),
           Rule(ATTN_V_LIKE, "Q5_K", "attn_v/attn_qkv → Q5_K"),
           Rule(FFN_DOWN, "Q5_K", "ffn_down → Q5_K"),
           Rule(ATTN_OUTPUT, "Q5_K", "attn_output → Q5_K")),
    _llama("Q3_K_M", "Q3_K", F.MOSTLY_Q3_K_M, "Q3_K; Q4_K/Q5_K for attn_v-like, ffn_down and attn_output",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(ATTN_V_LIKE, "Q5_K", "attn_v/attn_qkv in the first 2 blocks → Q5_K", layers="i < 2"),
           Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K"),
           Rule(FFN_DOWN, "Q5_K", "ffn_down in the first n/16 blocks → Q5_K", layers="i < n/16"),
           Rule(FFN_DOWN, "Q4_K", "ffn_down → Q4_K"),
           Rule(ATTN_OUTPUT, "Q4_K", "attn_output → Q4_K")),
    _llama("Q3_K_S", "Q3_K", F.MOSTLY_Q3_K_S, "Q3_K; output Q6_K",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K),
    _llama("Q2_K", "Q2_K", F.MOSTLY_Q2_K, "Q2_K; Q3_K/Q4_K for attn_v-like, ffn_down and attn_output",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K (n_head/n_head_kv >= 4)", min_gqa=4),
           Rule(ATTN_V_LIKE, "Q3_K", "attn_v/attn_qkv → Q3_K"),
           Rule(FFN_DOWN, "Q3_K", "ffn_down → Q3_K"),
           Rule(ATTN_OUTPUT, "Q3_K", "attn_output → Q3_K")),
    # legacy 32-weight blocks; with an imatrix llama.cpp guards the first ffn_down blocks of Q4_0/Q5_0
    _llama("Q5_1", "Q5_1", F.MOSTLY_Q5_1, "everything Q5_1"),
    _llama("Q5_0", "Q5_0", F.MOSTLY_Q5_0, "Q5_0; with an imatrix Q5_1 for ffn_down in the first n/8 blocks",
           Rule(FFN_DOWN, "Q5_1", "ffn_down in the first n/8 blocks → Q5_1 (with an imatrix)", layers="i < n/8",
                imatrix=True)),
    _llama("Q4_1", "Q4_1", F.MOSTLY_Q4_1, "everything Q4_1"),
    _llama("Q4_0", "Q4_0", F.MOSTLY_Q4_0, "Q4_0; with an imatrix Q4_1 for ffn_down in the first n/8 blocks",
           Rule(FFN_DOWN, "Q4_1", "ffn_down in the first n/8 blocks → Q4_1 (with an imatrix)", layers="i < n/8",
                imatrix=True)),
    # i-quants: IQ4_NL/IQ4_XS/IQ3_S/IQ3_M need no imatrix; the others are refused without one (plan.py)
    *(_llama(t, t, file_type, f"{t}; Q5_K for attn_v-like (GQA >= 4) and, without an imatrix, the first n/8 "
             "ffn_down blocks", *IQ4_RULES)
      for t, file_type in (("IQ4_XS", F.MOSTLY_IQ4_XS), ("IQ4_NL", F.MOSTLY_IQ4_NL))),
    _llama("IQ3_M", "IQ3_S", F.MOSTLY_IQ3_M, "IQ3_S; Q4_K for attn_v-like, attn_output and the first ffn_down blocks",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K"),
           Rule(FFN_DOWN, "Q4_K", "ffn_down in the first n/8 blocks → Q4_K", layers="i < n/8"),
           Rule(FFN_DOWN, "Q4_K", "8-expert model: ffn_down in use_more_bits blocks → Q4_K", layers="use_more_bits",
                experts=8),
           Rule(ATTN_OUTPUT, "Q4_K", "attn_output → Q4_K")),
    _llama("IQ3_S", "IQ3_S", F.MOSTLY_IQ3_S, "IQ3_S; Q4_K for attn_v-like (GQA >= 4)",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K (n_head/n_head_kv >= 4)", min_gqa=4)),
    _llama("IQ3_XS", "IQ3_S", F.MOSTLY_IQ3_XS, "IQ3_S; IQ3_XXS for attn_q, attn_k and the middle blocks' ffn_gate/ffn_up",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K (n_head/n_head_kv >= 4)", min_gqa=4),
           Rule(ATTN_K, "IQ3_XXS", "attn_k → IQ3_XXS"),
           Rule(ATTN_Q, "IQ3_XXS", "attn_q → IQ3_XXS"),
           Rule(FFN_GATE_UP, "IQ3_S", "ffn_gate/ffn_up in the first n/8 blocks keep IQ3_S", layers="i < n/8"),
           Rule(FFN_GATE_UP, "IQ3_S", "ffn_gate/ffn_up in the last n/8 blocks keep IQ3_S", layers="i >= 7*n/8"),
           Rule(FFN_GATE_UP, "IQ3_XXS", "ffn_gate/ffn_up in the middle blocks → IQ3_XXS")),
    _llama("IQ3_XXS", "IQ3_XXS", F.MOSTLY_IQ3_XXS, "IQ3_XXS; IQ3_S/Q4_K for token_embd, attn_v-like, attn_output; "
           "IQ2_S for attn_q, attn_k",
           EIGHT_EXPERTS_ATTN_OUTPUT_Q5_K,
           Rule(TOKEN_EMBD, "IQ3_S", "token_embd → IQ3_S"),
           Rule(ATTN_V_LIKE, "Q4_K", "attn_v/attn_qkv → Q4_K (n_head/n_head_kv >= 4)", min_gqa=4),
           Rule(ATTN_V_LIKE, "IQ3_S", "attn_v/attn_qkv → IQ3_S (without an imatrix)", imatrix=False),
           Rule(ATTN_K, "IQ2_S", "attn_k → IQ2_S"),
           Rule(ATTN_Q, "IQ2_S", "attn_q → IQ2_S"),
           Rule(FFN_DOWN, "Q4_K", "ffn_down in the first n/8 blocks → Q4_K (without an imatrix)", layers="i < n/8",
                imatrix=False),
           Rule(FFN_DOWN, "Q3_K", "ffn_down → Q3_K (without an imatrix)", imatrix=False),
           Rule(ATTN_OUTPUT, "IQ3_S", "attn_output → IQ3_S"),
           output_rule=OUTPUT_Q5_K),
    _llama_lowest("IQ2_M", "IQ2_S", F.MOSTLY_IQ2_M, "IQ2_S; IQ3_S/Q4_K/Q5_K for embeddings, attention, first ffn_down",
                  token_embd="IQ3_S", low="IQ3_S", attn_output="IQ3_S"),
    _llama_lowest("IQ2_S", "IQ2_XS", F.MOSTLY_IQ2_S, "IQ2_XS; IQ3_S/Q4_K/Q5_K for embeddings, attention, first ffn_down",
                  token_embd="IQ3_S", low="IQ3_S", attn_output="IQ3_S"),
    _llama_lowest("IQ2_XS", "IQ2_XS", F.MOSTLY_IQ2_XS, "IQ2_XS; Q2_K/Q4_K/Q5_K for embeddings, attention, first ffn_down",
                  token_embd="Q2_K", low="Q2_K", attn_output=None),
    _llama_lowest("IQ2_XXS", "IQ2_XXS", F.MOSTLY_IQ2_XXS, "IQ2_XXS; Q2_K/Q4_K/Q5_K for embeddings, attention, "
                  "first ffn_down", token_embd="Q2_K", low="Q2_K", attn_output=None),
    _llama_lowest("IQ1_M", "IQ1_M", F.MOSTLY_IQ1_M, "IQ1_M; Q2_K/IQ2_XXS/Q4_K/Q5_K for embeddings, attention, "
                  "first ffn_down", token_embd="Q2_K", low="Q2_K", attn_output="IQ2_XXS"),
    _llama_lowest("IQ1_S", "IQ1_S", F.MOSTLY_IQ1_S, "IQ1_S; Q2_K/IQ2_XXS/Q4_K/Q5_K for embeddings, attention, "
                  "first ffn_down", token_embd="Q2_K", low="Q2_K", attn_output="IQ2_XXS"),
)}

# ---------------------------------------------------------------------------------------------
# rioquant's dynamic mixes for qwen35moe (docs/recipes.md has the evidence and the 397B sizes).

# The tensor-name patterns (ATTENTION, SSM_GATES, SSM_OUT, SHARED_EXPERT, MTP_PROJ, DOWN_EXPS) are the
# architecture's: rioquant.export.qwen35moe.


def _xl(name: str, default: str, file_type: LlamaFileType, summary: str, *, attention: str, ssm_out: str,
        shared: str, token_embd: str, down_first: str, down_more: str) -> Recipe:
    """The XL shape: every non-expert matrix held high; ffn_down_exps two steps above the default in the
    first n/8 blocks (the fidelity bench's ablation: the first block's down projections carry most of
    the experts' error), one step above in llama.cpp's use_more_bits blocks, the default elsewhere."""
    rules = (
        OUTPUT_Q8_0_IF_MISFIT,
        Rule(OUTPUT, "Q6_K", "output → Q6_K: every token's logits, 1 of 400 B weights"),
        Rule(TOKEN_EMBD, token_embd, f"token_embd → {token_embd}: a lookup, cheap; measured sensitive"),
        Rule(SSM_OUT, ssm_out, f"ssm_out → {ssm_out}: the most sensitive tensor, ~1% of the weights"),
        Rule(ATTENTION, attention, f"attention projections → {attention}: all sensitive in this hybrid"),
        Rule(SSM_GATES, attention, f"ssm_alpha/ssm_beta → {attention}: with attention, negligible size"),
        Rule(MTP_PROJ, attention, f"MTP eh_proj → {attention}"),
        Rule(SHARED_EXPERT, shared, f"shared expert → {shared}: every token uses it"),
        Rule(DOWN_EXPS, down_first, f"ffn_down_exps in the first n/8 blocks → {down_first}: the most sensitive experts",
             layers="i < n/8"),
        Rule(DOWN_EXPS, down_more, f"ffn_down_exps in use_more_bits blocks → {down_more}", layers="use_more_bits"),
        Rule(DOWN_EXPS, default, f"ffn_down_exps → {default} elsewhere"),
    )
    return Recipe(name, default, file_type, rules, summary, source=RecipeSource.RIOQUANT)


XL_MIXES: dict[str, Recipe] = {r.name: r for r in (
    _xl("Q4_K_XL", "Q4_K", F.MOSTLY_Q4_K_M,
        "experts Q4_K, down Q6_K/Q5_K in first/use_more_bits blocks; attention, ssm_out, shared experts Q8_0",
        attention="Q8_0", ssm_out="Q8_0", shared="Q8_0", token_embd="Q5_K", down_first="Q6_K", down_more="Q5_K"),
    _xl("Q3_K_XL", "Q3_K", F.MOSTLY_Q3_K_M,
        "experts Q3_K, down Q5_K/Q4_K in first/use_more_bits blocks; attention Q6_K, ssm_out Q8_0",
        attention="Q6_K", ssm_out="Q8_0", shared="Q6_K", token_embd="Q4_K", down_first="Q5_K", down_more="Q4_K"),
    _xl("Q2_K_XL", "Q2_K", F.MOSTLY_Q2_K,
        "experts Q2_K, down Q4_K/Q3_K in first/use_more_bits blocks; attention Q6_K, ssm_out Q8_0",
        attention="Q6_K", ssm_out="Q8_0", shared="Q6_K", token_embd="Q4_K", down_first="Q4_K", down_more="Q3_K"),
)}

# Every quantizable tensor at one type, no rules (llama-quantize --pure). Q8_0, Q6_K and Q2_K are not
# here: those names are llama.cpp mixes, whose rules win (Q8_0 and Q6_K differ from pure only in the
# output and 8-expert attention tensors; Q2_K differs a lot). F32/F16/BF16 also keep llama.cpp's F32
# for never-quantized tensors.
UNIFORM: dict[str, Recipe] = {r.name: r for r in (
    Recipe("F32", "F32", F.ALL_F32, summary="every tensor F32", source=RecipeSource.UNIFORM),
    Recipe("F16", "F16", F.MOSTLY_F16, summary="F16; norms, router, conv F32", source=RecipeSource.UNIFORM),
    Recipe("BF16", "BF16", F.MOSTLY_BF16, summary="BF16; norms, router, conv F32", source=RecipeSource.UNIFORM),
    Recipe("Q5_K", "Q5_K", F.MOSTLY_Q5_K_S, summary="every quantizable tensor Q5_K", source=RecipeSource.UNIFORM),
    Recipe("Q4_K", "Q4_K", F.MOSTLY_Q4_K_S, summary="every quantizable tensor Q4_K", source=RecipeSource.UNIFORM),
    Recipe("Q3_K", "Q3_K", F.MOSTLY_Q3_K_S, summary="every quantizable tensor Q3_K", source=RecipeSource.UNIFORM),
)}

RECIPES: dict[str, Recipe] = {**UNIFORM, **LLAMA_MIXES, **XL_MIXES}


def get_recipe(name: str) -> Recipe:
    """The built-in recipe `name` (case-insensitive), or a PlanError listing the choices."""
    recipe = RECIPES.get(name.upper())
    if recipe is None:
        raise PlanError(f"--type {name}: unknown; choose one of {', '.join(RECIPES)}")
    return recipe


def check_type(qtype: str, where: str) -> str:
    """Normalise a type name and check rioquant can write it; `where` names the option or file."""
    try:
        return parse_qtype(qtype).name
    except QuantInputError as err:
        raise PlanError(f"{where}: {err}") from None


def parse_tensor_type(text: str) -> tuple[str, str]:
    """`--tensor-type REGEX=TYPE` as llama-quantize parses it: split at the first '=', pattern lower-cased."""
    pattern, sep, qtype = text.partition("=")
    if not sep or not pattern or not qtype:
        raise PlanError(f"--tensor-type {text!r}: expected REGEX=TYPE, e.g. ffn_down_exps=Q6_K")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as err:
        raise PlanError(f"--tensor-type {text!r}: bad regular expression ({err})") from None
    return pattern, check_type(qtype, f"--tensor-type {text!r}")


# ---------------------------------------------------------------------------------------------
# User recipes: TOML with the same fields as Rule.

_RULE_KEYS = {"pattern", "type", "why", "layers", "experts", "min_gqa", "row_misfit", "min_experts", "imatrix"}
_TOP_KEYS = {"name", "base", "default", "file_type", "summary", "rules"}


def _rule_from_toml(raw: Mapping, where: str) -> Rule:
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown key {sorted(unknown)[0]!r} (rules take {', '.join(sorted(_RULE_KEYS))})")
    if "pattern" not in raw or "type" not in raw:
        raise PlanError(f"{where}: a rule needs pattern and type")
    try:
        re.compile(raw["pattern"])
    except (re.error, TypeError) as err:
        raise PlanError(f"{where}: bad pattern {raw['pattern']!r} ({err})") from None
    layers = raw.get("layers")
    if layers is not None:
        try:
            layer_condition_holds(str(layers), 0, 1)  # validates the syntax
        except PlanError as err:
            raise PlanError(f"{where}: {err}") from None
    return Rule(
        pattern=raw["pattern"], qtype=check_type(str(raw["type"]), where), why=str(raw.get("why", "")),
        layers=layers, experts=raw.get("experts"), min_gqa=raw.get("min_gqa"), row_misfit=bool(raw.get("row_misfit", False)),
        min_experts=raw.get("min_experts"), imatrix=raw.get("imatrix"),
    )


def load_recipe(path: Path) -> Recipe:
    """A user recipe from TOML: `default` (or `base`, a built-in mix these rules go in front of) and [[rules]].

    Example:
        base = "Q4_K_M"
        [[rules]]
        pattern = "ffn_down_exps"
        type = "Q6_K"
        layers = "i < n/8"
        why = "first blocks' down projections"
    """
    where = f"--recipe {path}"
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"{where}: file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise PlanError(f"{where}: invalid TOML ({err})") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown key {sorted(unknown)[0]!r} (a recipe takes {', '.join(sorted(_TOP_KEYS))})")
    base = RECIPES.get(str(data["base"]).upper()) if "base" in data else None
    if "base" in data and base is None:
        raise PlanError(f"{where}: base {data['base']!r} unknown; choose one of {', '.join(RECIPES)}")
    if base is None and "default" not in data:
        raise PlanError(f"{where}: give `default = \"Q4_K\"` or `base = \"Q4_K_M\"`")
    default = check_type(str(data["default"]), where) if "default" in data else base.default
    rules = tuple(_rule_from_toml(r, f"{where} rule {i + 1}") for i, r in enumerate(data.get("rules", [])))
    if "file_type" in data:
        try:
            file_type = F[str(data["file_type"])] if not str(data["file_type"]).isdigit() else F(int(data["file_type"]))
        except (KeyError, ValueError):
            raise PlanError(f"{where}: unknown file_type {data['file_type']!r} (e.g. MOSTLY_Q4_K_M)") from None
    elif base is not None:
        file_type = base.file_type
    else:
        file_type = default_file_type(default)
    return Recipe(
        name=str(data.get("name", Path(path).stem)), default=default, file_type=file_type,
        rules=rules + (base.rules if base else ()), summary=str(data.get("summary", "")), source=str(path),
    )


def default_file_type(default: str) -> LlamaFileType:
    """llama.cpp's file type for a recipe whose default type is `default` (the mix of that name if its
    default is that type, else the first mix whose default it is)."""
    for recipe in sorted((*UNIFORM.values(), *LLAMA_MIXES.values()), key=lambda r: r.name != default):
        if recipe.default == default:
            return recipe.file_type
    return F.GUESSED


__all__ = ["LLAMA_MIXES", "RECIPES", "UNIFORM", "XL_MIXES", "get_recipe", "load_recipe", "parse_tensor_type"]
