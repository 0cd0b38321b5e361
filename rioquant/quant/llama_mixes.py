"""llama.cpp's mixes for qwen35moe as tables: `llama_tensor_get_type_impl` (src/llama-quant.cpp)
rewritten as ordered rules and checked tensor by tensor against `llama_model_quantize`
(tests/test_recipes.py, tests/test_mix_bytes.py).

llama.cpp's category tests are substring tests on the tensor name (tensor_get_category); the patterns
below are those substrings. The rule language is rules.py; the mixes that are ours are dynamic_mixes.py.
"""

from gguf import LlamaFileType

from rioquant.quant.rules import Recipe, Rule

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
