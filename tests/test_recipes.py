"""Recipes against llama.cpp's own quantizer: every tensor's type (and bytes) as `llama_model_quantize` chooses.

The oracle is llama-cpp-python's `llama_model_quantize` on a BF16 GGUF written by llama.cpp's own
converter from the same tiny checkpoint (rioquant/testing/llama_quantize.py). Three checkpoints cover the rules'
branches: 8 experts (llama.cpp's special case) with an MTP block; 6 experts with n_head/n_head_kv = 4 and
16 blocks (so n/8, n/16 and use_more_bits all bite); and TINY, whose rows of 64 and 32 fit no K-quant
block, so every fallback type appears. Decisions come from llama.cpp's dry run (seconds per mix), with
and without an imatrix where the mix looks at it or needs it (then `plan` refuses, as llama-quantize
does); every mix is also quantized for real and compared byte for byte with `rioquant convert`, with and
without an imatrix (see BYTES_CASES for what is pinned to keep that affordable).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from rioquant.convert import ConvertOptions, RunOptions, build_plan, convert, describe_plan
from rioquant.errors import ImatrixError, PlanError
from rioquant.quant.plan import recipe_needs_imatrix
from rioquant.quant.recipes import LLAMA_MIXES, RECIPES, XL_MIXES, get_recipe, load_recipe, parse_tensor_type
from rioquant.quant.rules import ModelFacts, layer_condition_holds, use_more_bits
from rioquant.testing.checkpoints import KQUANT, TINY, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.imatrix_files import gguf_importance, random_entries, write_gguf_imatrix
from rioquant.testing.llama_quantize import llama_dry_run, llama_quantize
from rioquant.testing.oracles import llama_logits, run_reference_converter

T = GGMLQuantizationType

VARIANTS = {
    "8-experts-mtp": replace(KQUANT, num_experts=8, num_hidden_layers=8, mtp=True),
    "6-experts-gqa4-16-blocks": replace(KQUANT, num_experts=6, num_attention_heads=8, num_hidden_layers=16),
    "tiny-fallbacks-mtp": replace(TINY, mtp=True),
}


# ---------------------------------------------------------------------------------------------
# The rule language, against llama.cpp's C expressions written out by hand


def test_use_more_bits_is_llama_cpp_formula():
    # C: i < n/8 || i >= 7*n/8 || (i - n/8) % 3 == 2, integer division; 61 = the 397B's 60 blocks + MTP
    assert [i for i in range(61) if use_more_bits(i, 61)] == [
        0, 1, 2, 3, 4, 5, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 53, 54, 55, 56, 57, 58, 59, 60,
    ]
    assert [i for i in range(5) if use_more_bits(i, 5)] == [2, 4]


@pytest.mark.parametrize("condition,n,expected", [
    ("i < 2", 61, [0, 1]),
    ("i < n/16", 61, [0, 1, 2]),
    ("i < n/8", 16, [0, 1]),
    ("i >= 7*n/8", 16, [14, 15]),
    ("i >= n", 4, []),
    ("2*i < n/8", 61, [0, 1, 2, 3]),  # the first 7 ffn_down tensors, two per block: ffn_down_exps...
    ("2*i+1 < n/8", 61, [0, 1, 2]),  # ... and ffn_down_shexp
])
def test_layer_conditions(condition, n, expected):
    assert [i for i in range(n) if layer_condition_holds(condition, i, n)] == expected


def test_recipe_table_names():
    assert list(LLAMA_MIXES) == ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
                                 "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS",
                                 "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
    assert list(XL_MIXES) == ["Q4_K_XL", "Q3_K_XL", "Q2_K_XL", "IQ3_XL", "IQ2_XL", "IQ1_XL"]
    for uniform in ("F32", "F16", "BF16", "Q5_K", "Q4_K", "Q3_K"):
        assert RECIPES[uniform].rules == ()
    assert get_recipe("q4_k_m") is LLAMA_MIXES["Q4_K_M"]


@pytest.mark.parametrize("text,message", [
    ("ffn_down", "expected REGEX=TYPE"),
    ("=Q4_K", "expected REGEX=TYPE"),
    ("ffn_down=Q9_K", "unsupported tensor type"),
    ("ffn_(down=Q4_K", "bad regular expression"),
])
def test_tensor_type_errors_name_the_option(text, message):
    with pytest.raises(PlanError, match=message) as err:
        parse_tensor_type(text)
    assert str(err.value).startswith("--tensor-type") and "\n" not in str(err.value)


def test_tensor_type_parsing_is_llama_quantizes():
    assert parse_tensor_type("BLK\\.1\\.FFN_DOWN=q6_k") == ("blk\\.1\\.ffn_down", "Q6_K")  # pattern lower-cased
    with pytest.raises(PlanError, match="'b=Q8_0'"):
        parse_tensor_type("a=b=Q8_0")  # split at the first '=': 'b=Q8_0' is no type


@pytest.mark.parametrize("body,message", [
    ('default = "Q4_K"\n[[rules]]\npattern = "x"\n', "needs pattern and type"),
    ('default = "Q4_K"\n[[rules]]\npattern = "x"\ntype = "Q4_K"\ncolour = 1\n', "unknown key 'colour'"),
    ('[[rules]]\npattern = "x"\ntype = "Q4_K"\n', "give `default"),
    ('base = "Q4_K_Z"\n', "unknown; choose one of"),
    ('default = "Q4_K"\n[[rules]]\npattern = "x"\ntype = "Q4_K"\nlayers = "every other"\n', "layer condition"),
    ('default = "Q4_K"\n[[rules]]\npattern = "("\ntype = "Q4_K"\n', "bad pattern"),
    ("default = \n", "invalid TOML"),
])
def test_recipe_file_errors(tmp_path, body, message):
    path = tmp_path / "mix.toml"
    path.write_text(body)
    with pytest.raises(PlanError, match=message) as err:
        load_recipe(path)
    assert "\n" not in str(err.value) and "mix.toml" in str(err.value)


def test_recipe_file_puts_its_rules_before_its_base(tmp_path):
    path = tmp_path / "down6.toml"
    path.write_text('base = "Q4_K_M"\n[[rules]]\npattern = "ffn_down_exps"\ntype = "Q6_K"\nlayers = "i < n/8"\n'
                    'why = "first blocks"\n')
    recipe = load_recipe(path)
    assert (recipe.name, recipe.default, recipe.file_type) == ("down6", "Q4_K", LlamaFileType.MOSTLY_Q4_K_M)
    assert recipe.rules[0].layers == "i < n/8" and recipe.rules[1:] == LLAMA_MIXES["Q4_K_M"].rules


def test_recipe_file_rules_may_look_at_the_imatrix_and_the_expert_count(tmp_path):
    path = tmp_path / "guard.toml"
    path.write_text('default = "Q4_K"\n[[rules]]\npattern = "ffn_down"\ntype = "Q6_K"\nimatrix = true\nmin_experts = 4\n')
    rule = load_recipe(path).rules[0]
    facts = ModelFacts(n_expert=8, n_gqa=2, n_blocks=8)
    cases = [(True, 8), (False, 8), (True, 2)]
    assert [rule.matches("blk.0.ffn_down_exps.weight", 0, 256, "Q4_K", replace(facts, has_imatrix=h, n_expert=e))
            for h, e in cases] == [True, False, False]


# ---------------------------------------------------------------------------------------------
# Decisions and bytes against llama_model_quantize


@pytest.fixture(scope="module")
def models(module_tmp) -> dict[str, tuple[Path, Path]]:
    """Each variant's checkpoint and llama.cpp's own BF16 conversion of it (llama-quantize's input)."""
    root = module_tmp("recipes")
    out = {}
    for name, spec in VARIANTS.items():
        src = build_checkpoint(spec, root / name)
        out[name] = src, run_reference_converter(src, root / f"{name}-bf16.gguf", "bf16")
    return out


def expected_bytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * type_bytes


def assert_same_decisions(plan, llama: dict[str, GGMLQuantizationType]) -> None:
    ours = {e.name: e for e in plan.entries}
    assert ours.keys() == llama.keys(), f"tensor sets differ: {sorted(ours.keys() ^ llama.keys())[:5]}"
    wrong = [f"{n}: ours {ours[n].qtype} ({ours[n].rule}), llama.cpp {t.name}" for n, t in llama.items()
             if ours[n].qtype != t.name]
    assert not wrong, f"{len(wrong)} tensors differ:\n" + "\n".join(wrong[:15])
    for name, qtype in llama.items():
        assert ours[name].nbytes == expected_bytes(qtype, ours[name].shape), name


def needs_imatrix(mix: str) -> bool:
    return recipe_needs_imatrix(LLAMA_MIXES[mix])


def looks_at_imatrix(mix: str) -> bool:
    return needs_imatrix(mix) or any(r.imatrix is not None for r in LLAMA_MIXES[mix].rules)


IMATRIX_PLACEHOLDER = Path("imatrix.gguf")  # `plan` looks only at whether an imatrix is given, as llama.cpp's rules


@pytest.mark.slow
@pytest.mark.parametrize("mix,imatrix", [(mix, imatrix) for mix in LLAMA_MIXES
                                         for imatrix in ((False, True) if looks_at_imatrix(mix) else (False,))])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mix_types_equal_llama_quantize(models, variant, mix, imatrix):
    """Every tensor's type; without an imatrix, `plan` refuses exactly when llama-quantize would."""
    src, bf16 = models[variant]
    llama = llama_dry_run(bf16, LLAMA_MIXES[mix].file_type, imatrix=imatrix)
    options = ConvertOptions(qtype=mix, imatrix=IMATRIX_PLACEHOLDER if imatrix else None)
    if llama.needs_imatrix:
        with pytest.raises(PlanError, match=r"needs an importance matrix.*give --imatrix FILE") as err:
            build_plan(src, options)
        assert "\n" not in str(err.value)
        return
    assert_same_decisions(build_plan(src, options), llama)


@pytest.mark.slow
def test_overrides_equal_llama_quantize(models):
    """--tensor-type (first match wins, regex search, over the mix), --output-tensor-type, --token-embedding-type."""
    src, bf16 = models["8-experts-mtp"]
    tensor_types = ("ffn_down_exps=Q8_0", r"BLK\.1\.=Q5_K", "attn_qkv=Q2_K", "^blk\\.[0-9]*[02468]\\.ffn_up=Q3_K")
    options = ConvertOptions(qtype="Q4_K_M", tensor_types=tensor_types, output_tensor_type="Q8_0",
                             token_embedding_type="Q6_K")
    plan = build_plan(src, options)
    as_llama_quantize_parses = [(t.split("=", 1)[0].lower(), t.split("=", 1)[1]) for t in tensor_types]
    llama = llama_dry_run(bf16, LlamaFileType.MOSTLY_Q4_K_M, as_llama_quantize_parses,
                          output_type="Q8_0", token_embd_type="Q6_K")
    assert_same_decisions(plan, llama)
    rules = {e.name: e.rule for e in plan.entries}
    assert rules["blk.1.ffn_down_exps.weight"] == "--tensor-type ffn_down_exps=Q8_0"
    assert rules["output.weight"] == "--output-tensor-type"


@pytest.mark.slow
def test_recipe_file_equals_llama_quantize_with_tensor_types(models, tmp_path):
    """A TOML recipe's unconditional rules in front of its base = llama-quantize --tensor-type over that mix."""
    src, bf16 = models["6-experts-gqa4-16-blocks"]
    recipe = tmp_path / "mine.toml"
    recipe.write_text('base = "Q3_K_M"\n'
                      '[[rules]]\npattern = "ssm_out"\ntype = "Q8_0"\nwhy = "most sensitive"\n'
                      '[[rules]]\npattern = "_shexp"\ntype = "Q6_K"\n')
    plan = build_plan(src, ConvertOptions(recipe=recipe))
    assert_same_decisions(plan, llama_dry_run(bf16, LlamaFileType.MOSTLY_Q3_K_M, [("ssm_out", "Q8_0"), ("_shexp", "Q6_K")]))
    assert {e.rule for e in plan.entries if "ssm_out" in e.name} == {"mine: most sensitive"}


def squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


# Bytes of every standard mix on the 8-expert model, plus the other expert count and the fallback rows
# (IQ2_XXS's: IQ4_NL, Q4_0, Q5_0). token_embd and output, the 248K-token vocabulary's rows, are 127 M of
# that model's 140 M weights, and the type a mix gives them is one it also gives other tensors of the same
# row length (test_vocabulary_rows_add_no_type): so Q4_K_M is compared whole and every other mix with
# those two pinned to Q8_0 on both sides (their types are held to llama.cpp's by the dry runs above).
WHOLE = "Q4_K_M"
BYTES_CASES = [
    *(("8-experts-mtp", mix) for mix in LLAMA_MIXES if not needs_imatrix(mix)),
    ("6-experts-gqa4-16-blocks", "Q4_K_M"),
    ("tiny-fallbacks-mtp", "Q3_K_M"),
    ("tiny-fallbacks-mtp", "IQ2_XXS"),
]
IMATRIX_BYTES_MIXES = ["Q4_K_M", "Q2_K", *(mix for mix in LLAMA_MIXES if needs_imatrix(mix))]
PINNED = {"output_type": "Q8_0", "token_embd_type": "Q8_0"}  # llama_quantize's names for the two overrides


def vocab_rows_pinned(mix: str) -> dict[str, str]:
    """The type overrides for token_embd and output of a mix not compared whole (the same on both sides)."""
    return {} if mix == WHOLE else PINNED


def convert_options(mix: str, pinned: dict[str, str], imatrix: Path | None = None) -> ConvertOptions:
    return ConvertOptions(qtype=mix, imatrix=imatrix, output_tensor_type=pinned.get("output_type"),
                          token_embedding_type=pinned.get("token_embd_type"))


@pytest.mark.slow
@pytest.mark.parametrize("imatrix", [False, True])
def test_vocabulary_rows_add_no_type(models, imatrix):
    """Pinning token_embd and output leaves no type any mix uses untested end to end: each mix's own
    types for them are among those its pinned file (or Q4_K_M's whole one) holds elsewhere."""
    src, _ = models["8-experts-mtp"]
    placeholder = IMATRIX_PLACEHOLDER if imatrix else None
    mixes = IMATRIX_BYTES_MIXES if imatrix else [m for m in LLAMA_MIXES if not needs_imatrix(m)]

    def types(mix: str, pinned: dict[str, str]) -> set[GGMLQuantizationType]:
        return {e.qtype for e in build_plan(src, convert_options(mix, pinned, placeholder)).entries}

    tested = set().union(types(WHOLE, {}), *(types(mix, PINNED) for mix in mixes))
    assert set().union(*(types(mix, {}) for mix in mixes)) <= tested


@pytest.mark.slow
@pytest.mark.parametrize("variant,mix", BYTES_CASES)
def test_mix_bytes_equal_llama_quantize(models, tmp_path, variant, mix):
    """Every tensor's type, shape and bytes, and general.file_type, as llama-quantize writes them; the file is
    exactly the size `rioquant plan` predicts."""
    src, bf16 = models[variant]
    pinned = vocab_rows_pinned(mix) if variant == "8-experts-mtp" else {}
    options = convert_options(mix, pinned)
    ref = scan(llama_quantize(bf16, tmp_path / "llama.gguf", LLAMA_MIXES[mix].file_type, **pinned))
    (out,) = convert(src, tmp_path / "ours.gguf", options, RunOptions(progress=False, report=False))
    ours = scan(out)
    assert ours.tensors.keys() == ref.tensors.keys()
    for name, r in ref.tensors.items():
        t = ours.tensors[name]
        # llama-quantize writes ggml's n_dims, dropping size-1 outer dims: ffn_gate_inp_shexp {H, 1} → {H}
        assert (t.qtype, squeeze(t.shape)) == (r.qtype, r.shape), f"{name}: ours {t.qtype.name} {t.shape}, llama.cpp {r.qtype.name} {r.shape}"
        assert t.data == r.data, f"{name} ({t.qtype.name}): bytes differ from llama_model_quantize's"
    assert ours.kv["general.file_type"] == ref.kv["general.file_type"]
    assert out.stat().st_size == describe_plan(build_plan(src, options))["file_bytes"]


def imatrix_entries(src: Path, with_mtp: bool) -> dict:
    """Statistics for llama-imatrix's set of tensors (one expert never routed), and the MTP block's if asked:
    llama-imatrix does not run that block, but the mixes that need an imatrix cannot do without them."""
    shapes = {e.name: e.shape for e in build_plan(src, ConvertOptions(qtype="F32")).entries
              if e.name.startswith("blk.") and (with_mtp or int(e.name.split(".")[1]) < 8) and len(e.shape) >= 2
              and "conv1d" not in e.name}
    return random_entries(shapes, seed=7, zero_counts={"blk.2.ffn_up_exps.weight": [5]})


@pytest.mark.slow
@pytest.mark.parametrize("mix", IMATRIX_BYTES_MIXES)
def test_mix_bytes_with_imatrix_equal_llama_quantize(models, tmp_path, mix):
    """With an imatrix (one expert never routed), every tensor's bytes equal llama_model_quantize's given
    the importance llama-quantize derives from the same file: the per-expert slices, the neutral
    weights of an expert without data, and which tensors get none."""
    src, bf16 = models["8-experts-mtp"]
    entries = imatrix_entries(src, with_mtp=needs_imatrix(mix))
    path = write_gguf_imatrix(tmp_path / "imatrix.gguf", entries, ["calibration.txt"], chunk_count=4)
    pinned = vocab_rows_pinned(mix)
    options = convert_options(mix, pinned, path)
    importance = {n: gguf_importance(e) for n, e in entries.items()}
    ref = scan(llama_quantize(bf16, tmp_path / "llama.gguf", LLAMA_MIXES[mix].file_type, importance=importance,
                              **pinned))
    (out,) = convert(src, tmp_path / "ours.gguf", options, RunOptions(progress=False, report=False))
    ours = scan(out)
    assert ours.tensors.keys() == ref.tensors.keys()
    differ = [n for n, r in ref.tensors.items() if (ours.tensors[n].qtype, ours.tensors[n].data) != (r.qtype, r.data)]
    assert not differ, f"{len(differ)} tensors differ from llama_model_quantize --imatrix: {differ[:5]}"


@pytest.mark.slow
def test_mix_needing_an_imatrix_refuses_one_without_the_mtp_block(models, tmp_path):
    """llama-imatrix does not run the MTP block; llama-quantize then refuses an IQ2_XXS of a model with one,
    naming the tensor, and so does `rioquant convert`, before writing anything."""
    src, bf16 = models["8-experts-mtp"]
    entries = imatrix_entries(src, with_mtp=False)
    path = write_gguf_imatrix(tmp_path / "imatrix.gguf", entries, ["calibration.txt"], chunk_count=4)
    importance = {n: gguf_importance(e) for n, e in entries.items()}
    with pytest.raises(RuntimeError, match=r"Missing importance matrix for tensor blk\.8\."):
        llama_quantize(bf16, tmp_path / "llama.gguf", LlamaFileType.MOSTLY_IQ2_XXS, importance=importance)
    options = ConvertOptions(qtype="IQ2_XXS", imatrix=path)
    with pytest.raises(ImatrixError, match=r"no entry for blk\.8\..*--no-mtp") as err:
        convert(src, tmp_path / "ours.gguf", options, RunOptions(progress=False, report=False))
    assert "\n" not in str(err.value) and not (tmp_path / "ours.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mix", list(XL_MIXES))
def test_xl_mixes_load_in_llama_cpp(models, tmp_path, mix):
    """Our own mixes: llama.cpp loads the file and computes finite logits. The K-quant ones on the model whose
    rows fall back (ssm_out and output rows of 64 → Q8_0); the i-quant ones, refused without an imatrix, on
    the model whose rows fit the 256-blocks, so that llama.cpp reads the lattice types themselves."""
    recipe = XL_MIXES[mix]
    needs = recipe_needs_imatrix(recipe)
    src, _ = models["8-experts-mtp" if needs else "tiny-fallbacks-mtp"]
    imatrix = None
    if needs:
        with pytest.raises(PlanError, match=r"needs an importance matrix.*give --imatrix FILE"):
            build_plan(src, ConvertOptions(qtype=mix))
        imatrix = write_gguf_imatrix(tmp_path / "imatrix.gguf", imatrix_entries(src, with_mtp=True), ["calibration.txt"],
                                     chunk_count=4)
    options = ConvertOptions(qtype=mix, imatrix=imatrix)
    (out,) = convert(src, tmp_path / f"{mix}.gguf", options, RunOptions(progress=False, report=False))
    types = {t.qtype.name for t in scan(out).tensors.values()}
    assert (recipe.default if needs else "Q8_0") in types
    logits = llama_logits(out, [248045, 846, 198, 9707])
    assert logits.shape[0] == 4 and bool((abs(logits) < 1e4).all())
