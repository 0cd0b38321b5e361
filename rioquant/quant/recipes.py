"""Every recipe `--type` and `--recipe` can name: llama.cpp's mixes (llama_mixes.py), rioquant's dynamic
mixes (dynamic_mixes.py), the uniform types, and user recipes in TOML.

A recipe names the default type of every quantizable tensor and ordered rules (tensor-name pattern,
conditions → type; first match wins) that override it. plan.py applies a recipe: never-quantized
tensors first, then user overrides, then these rules, then llama.cpp's row-length fallback. The rule
language (patterns, conditions) is rules.py.
"""

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from gguf import LlamaFileType

from rioquant.errors import PlanError, QuantInputError
from rioquant.quant.dynamic_mixes import XL_MIXES
from rioquant.quant.llama_mixes import LLAMA_MIXES
from rioquant.quant.rules import Recipe, RecipeSource, Rule, layer_condition_holds
from rioquant.quant.types import parse_qtype

F = LlamaFileType


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
