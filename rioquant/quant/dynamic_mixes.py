"""rioquant's dynamic mixes for qwen35moe: every non-expert matrix held high, the routed experts pushed
low, the experts' down projections raised where the fidelity bench measured them sensitive.

In the 397B the routed experts are 97.5 % of the weights, so their types set the file's size and
everything else is nearly free: attention, `ssm_out`, the shared expert and the embeddings can sit
several steps above the experts for a few GB. docs/recipes.md gives the evidence for every rule (the
nano model's ablation, bench/xl_ablation.py) and the 397B sizes.

Two families share one shape:
- the K-quant XL mixes (Q4_K_XL, Q3_K_XL, Q2_K_XL): experts at one K type, down projections one or two
  steps higher in the first and the use_more_bits blocks;
- the i-quant XL mixes (IQ3_XL, IQ2_XL, IQ1_XL) for 128 GB machines: gate/up experts at an i-quant
  lattice type, down experts a step higher everywhere (the down projection is where an expert's error
  reaches the residual stream unfiltered). Their default types (IQ3_XXS, IQ2_XXS, IQ1_M) are ones
  llama-quantize refuses without an importance matrix, so plan and convert ask for --imatrix.

The tensor-name patterns are the architecture's (rioquant.export.qwen35moe).
"""

from gguf import LlamaFileType

from rioquant.export.qwen35moe import ATTENTION, DOWN_EXPS, MTP_PROJ, SHARED_EXPERT, SSM_GATES, SSM_OUT
from rioquant.quant.llama_mixes import OUTPUT, OUTPUT_Q8_0_IF_MISFIT, TOKEN_EMBD
from rioquant.quant.rules import Recipe, RecipeSource, Rule

F = LlamaFileType


def _xl(name: str, default: str, file_type: LlamaFileType, summary: str, *, attention: str, ssm_out: str,
        shared: str, token_embd: str, down_first: str, down_more: str | None, down: str | None = None,
        output: str = "Q6_K") -> Recipe:
    """The XL shape: every non-expert matrix held high; ffn_down_exps raised in the first n/8 blocks
    (the ablation: the first block's down projections carry most of the experts' error) and in
    llama.cpp's use_more_bits blocks (unless `down_more` is None); `down` (default: the mix's default)
    elsewhere, `default` for the gate/up experts."""
    down = down or default
    rules = (
        OUTPUT_Q8_0_IF_MISFIT,
        Rule(OUTPUT, output, f"output → {output}: every token's logits, 1 of 400 B weights"),
        Rule(TOKEN_EMBD, token_embd, f"token_embd → {token_embd}: a lookup, cheap; measured sensitive"),
        Rule(SSM_OUT, ssm_out, f"ssm_out → {ssm_out}: the most sensitive tensor, ~1% of the weights"),
        Rule(ATTENTION, attention, f"attention projections → {attention}: all sensitive in this hybrid"),
        Rule(SSM_GATES, attention, f"ssm_alpha/ssm_beta → {attention}: with attention, negligible size"),
        Rule(MTP_PROJ, attention, f"MTP eh_proj → {attention}"),
        Rule(SHARED_EXPERT, shared, f"shared expert → {shared}: every token uses it"),
        Rule(DOWN_EXPS, down_first, f"ffn_down_exps in the first n/8 blocks → {down_first}: the most sensitive experts",
             layers="i < n/8"),
        *((Rule(DOWN_EXPS, down_more, f"ffn_down_exps in use_more_bits blocks → {down_more}", layers="use_more_bits"),)
          if down_more else ()),
        Rule(DOWN_EXPS, down, f"ffn_down_exps → {down} elsewhere"),
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
    _xl("IQ3_XL", "IQ3_XXS", F.MOSTLY_IQ3_XS,
        "gate/up experts IQ3_XXS, down IQ3_XXS (IQ4_XS/IQ3_S first/use_more_bits); attention Q6_K, ssm_out Q8_0",
        attention="Q6_K", ssm_out="Q8_0", shared="Q6_K", token_embd="Q4_K", down_first="IQ4_XS", down_more="IQ3_S",
        down="IQ3_XXS"),
    _xl("IQ2_XL", "IQ2_XXS", F.MOSTLY_IQ2_S,
        "gate/up experts IQ2_XXS, down IQ2_XS (IQ3_S/IQ2_S first/use_more_bits); attention Q6_K, ssm_out Q8_0",
        attention="Q6_K", ssm_out="Q8_0", shared="Q6_K", token_embd="Q4_K", down_first="IQ3_S", down_more="IQ2_S",
        down="IQ2_XS"),
    _xl("IQ1_XL", "IQ1_M", F.MOSTLY_IQ1_M,
        "gate/up experts IQ1_M, down IQ2_XXS (IQ3_XXS in the first blocks); attention, ssm_out Q5_K",
        attention="Q5_K", ssm_out="Q5_K", shared="Q5_K", token_embd="Q3_K", down_first="IQ3_XXS", down_more=None,
        down="IQ2_XXS", output="Q5_K"),
)}

__all__ = ["XL_MIXES"]
