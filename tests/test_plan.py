"""`rioquant plan`: the dry run. Exact file sizes, the 397B model's shapes, and `--target-size`.

- The 397B plan is built from tests/data/rio-3.5-open-397b/config.json alone (published dimensions, no
  weights) plus the real Qwen3.5 tokenizer files; it must reproduce the published parameter counts, and
  llama_model_quantize, run (dry) on a sparse BF16 GGUF with exactly those tensors, must choose the same
  type for every one of its 1,118 tensors in every llama.cpp mix.
- The predicted size is the written size, byte for byte, on tiny models, whole and split.
- `--target-size` / `--target-bpw` stay within budget and leave no upgrade that would still fit.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rioquant.cli import main
from rioquant.convert import ConvertOptions, RunOptions, SplitOptions, build_plan, convert, describe_plan
from rioquant.errors import PlanError
from rioquant.export.metadata import add_arch_metadata
from rioquant.files.gguf_file import align_up, nbytes
from rioquant.quant import budget
from rioquant.quant.plan import recipe_needs_imatrix
from rioquant.quant.recipes import LLAMA_MIXES, RECIPES, XL_MIXES
from rioquant.testing.checkpoints import TINY, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.llama_quantize import llama_dry_run
from rioquant.testing.oracles import run_reference_converter
from rioquant.testing.tokenizer import tokenizer_files

T = GGMLQuantizationType
CONFIG_397B = Path(__file__).parent / "data" / "rio-3.5-open-397b" / "config.json"

# The exact size of the single-file GGUF `rioquant plan` predicts for the 397B model (MTP included,
# directory named Rio-3.5-Open-397B, no model card, --imatrix given). README.md and docs/recipes.md quote these.
SIZES_397B = {
    "F32": 1_611_783_856_128,  # 1611.8 GB 32.00 bpw
    "F16": 806_161_866_752,  # 806.2 GB 16.01 bpw
    "BF16": 806_161_866_752,  # 806.2 GB 16.01 bpw
    "Q5_K": 277_472_436_224,  # 277.5 GB 5.51 bpw
    "Q4_K": 227_121_061_888,  # 227.1 GB 4.51 bpw
    "Q3_K": 173_622_726_656,  # 173.6 GB 3.45 bpw
    "Q8_0": 428_526_559_232,  # 428.5 GB 8.51 bpw
    "Q6_K": 330_970_771_456,  # 331.0 GB 6.57 bpw
    "Q5_K_M": 286_329_905_152,  # 286.3 GB 5.68 bpw
    "Q5_K_S": 277_607_522_304,  # 277.6 GB 5.51 bpw
    "Q4_K_M": 244_314_972_160,  # 244.3 GB 4.85 bpw
    "Q4_K_S": 229_285_142_528,  # 229.3 GB 4.55 bpw
    "Q3_K_L": 208_589_524_992,  # 208.6 GB 4.14 bpw
    "Q3_K_M": 192_648_024_064,  # 192.6 GB 3.82 bpw
    "Q3_K_S": 174_020_038_656,  # 174.0 GB 3.45 bpw
    "Q2_K": 147_136_397_312,  # 147.1 GB 2.92 bpw
    "Q5_1": 302_719_639_552,  # 302.7 GB 6.01 bpw
    "Q5_0": 278_548_881_408,  # 278.5 GB 5.53 bpw (without an imatrix 277.6 GB)
    "Q4_1": 252_495_405_056,  # 252.5 GB 5.01 bpw
    "Q4_0": 228_324_646_912,  # 228.3 GB 4.53 bpw (without an imatrix 227.4 GB)
    "IQ4_XS": 215_186_366_464,  # 215.2 GB 4.27 bpw (without an imatrix 217.5 GB)
    "IQ4_NL": 227_670_597_632,  # 227.7 GB 4.52 bpw (without an imatrix 229.6 GB)
    "IQ3_M": 176_396_996_608,  # 176.4 GB 3.50 bpw
    "IQ3_S": 174_325_305_344,  # 174.3 GB 3.46 bpw
    "IQ3_XS": 164_994_289_664,  # 165.0 GB 3.28 bpw
    "IQ3_XXS": 155_467_509_760,  # 155.5 GB 3.09 bpw
    "IQ2_M": 131_606_278_144,  # 131.6 GB 2.61 bpw
    "IQ2_S": 119_439_437_824,  # 119.4 GB 2.37 bpw
    "IQ2_XS": 118_386_946_048,  # 118.4 GB 2.35 bpw
    "IQ2_XXS": 106_203_328_512,  # 106.2 GB 2.11 bpw
    "IQ1_M": 90_994_778_112,  # 91.0 GB 1.81 bpw
    "IQ1_S": 81_869_647_872,  # 81.9 GB 1.63 bpw
    "Q4_K_XL": 241_453_604_864,  # 241.5 GB 4.79 bpw
    "Q3_K_XL": 187_998_138_368,  # 188.0 GB 3.73 bpw
    "Q2_K_XL": 146_189_316_096,  # 146.2 GB 2.90 bpw
    "IQ3_XL": 163_687_952_384,  # 163.7 GB 3.25 bpw
    "IQ2_XL": 117_768_712_192,  # 117.8 GB 2.34 bpw
    "IQ1_XL": 99_992_477_696,  # 100.0 GB 1.99 bpw
}


@pytest.fixture(scope="module")
def rio_397b(module_tmp) -> Path:
    """config.json of the 397B model and the real Qwen3.5 tokenizer files; no weights."""
    folder = module_tmp("shapes") / "Rio-3.5-Open-397B"
    folder.mkdir()
    shutil.copyfile(CONFIG_397B, folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tokenizer_files() / name, folder / name)
    return folder


def test_397b_plan_reproduces_the_published_parameter_counts(rio_397b):
    def count(with_mtp: bool, mtp_only: bool = False) -> int:
        plan = build_plan(rio_397b, ConvertOptions(qtype="BF16", with_mtp=with_mtp), weights_optional=True)
        return sum(int(np.prod(s.shape)) for s in plan.specs if not mtp_only or (s.layer or 0) >= 60)

    assert count(with_mtp=False) == 396_346_350_336
    assert count(with_mtp=True, mtp_only=True) == 6_595_568_128
    assert len(build_plan(rio_397b, ConvertOptions(), weights_optional=True).entries) == 1118


IMATRIX_PLACEHOLDER = Path("imatrix.gguf")  # `plan` looks only at whether an imatrix is given


def test_397b_predicted_sizes(rio_397b):
    """With an imatrix: the IQ1/IQ2/IQ3_XXS/IQ3_XS mixes need one, the K mixes ignore it (and IQ4_*, Q4_0,
    Q5_0 keep the default type on the first ffn_down blocks, as they are made in practice). The header
    (metadata, tensor infos) has the same bytes in every mix, so it is laid out twice, not once per mix."""
    def plan(mix: str):
        return build_plan(rio_397b, ConvertOptions(qtype=mix, imatrix=IMATRIX_PLACEHOLDER), weights_optional=True)

    def data_bytes(mix: str) -> int:
        return sum(align_up(e.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for e in plan(mix).entries)

    header = describe_plan(plan("Q4_K_M"))["file_bytes"] - data_bytes("Q4_K_M")
    assert describe_plan(plan("IQ1_XL"))["file_bytes"] == header + data_bytes("IQ1_XL")
    assert {mix: header + data_bytes(mix) for mix in RECIPES} == SIZES_397B


# Each dynamic mix and the llama.cpp mix it replaces (docs/recipes.md): the one named by its
# general.file_type, but for IQ1_XL, which fills the gap between IQ1_M (91.0 GB, its file type) and IQ2_XXS
XL_REPLACES = {"Q4_K_XL": "Q4_K_M", "Q3_K_XL": "Q3_K_M", "Q2_K_XL": "Q2_K", "IQ3_XL": "IQ3_XS", "IQ2_XL": "IQ2_S",
               "IQ1_XL": "IQ2_XXS"}


@pytest.mark.parametrize("xl", list(XL_MIXES))
def test_397b_xl_mix_is_no_larger_than_the_llama_cpp_mix_it_replaces(xl):
    """The XL mixes' promise (docs/recipes.md): at most the size of the llama.cpp mix they replace (sizes as
    pinned above, with an imatrix); `fit` ranks each just above the llama.cpp mix of its file type."""
    stand_in = next(m for m, r in LLAMA_MIXES.items() if r.file_type == XL_MIXES[xl].file_type)
    assert SIZES_397B[stand_in] <= SIZES_397B[XL_REPLACES[xl]]
    assert SIZES_397B[xl] <= SIZES_397B[XL_REPLACES[xl]]


@pytest.fixture(scope="module")
def sparse_397b_bf16(rio_397b, module_tmp) -> Path:
    """A BF16 GGUF of the 397B's exact tensor list and architecture keys, its data a sparse hole (806 GB
    apparent, a few MB on disk): llama_model_quantize --dry-run reads only the header."""
    plan = build_plan(rio_397b, ConvertOptions(qtype="BF16"), weights_optional=True)
    path = module_tmp("sparse") / "rio-397b-bf16.gguf"
    writer = gguf.GGUFWriter(path, "qwen35moe")
    add_arch_metadata(writer, plan.args, plan.n_mtp_layers)
    for e in plan.entries:
        writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=T[e.qtype])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    header = writer.fout[0].tell()
    writer.close()
    pad = lambda n: -(-n // 32) * 32  # noqa: E731
    os.truncate(path, pad(header) + sum(pad(e.nbytes) for e in plan.entries))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mix", list(LLAMA_MIXES))
def test_397b_types_equal_llama_quantize(rio_397b, sparse_397b_bf16, mix):
    """Without an imatrix, except where the mix needs one (tests/test_recipes.py tries both on tiny models)."""
    recipe = LLAMA_MIXES[mix]
    imatrix = recipe_needs_imatrix(recipe)
    options = ConvertOptions(qtype=mix, imatrix=IMATRIX_PLACEHOLDER if imatrix else None)
    plan = build_plan(rio_397b, options, weights_optional=True)
    llama = llama_dry_run(sparse_397b_bf16, recipe.file_type, imatrix=imatrix)
    ours = {e.name: e for e in plan.entries}
    assert ours.keys() == llama.keys()
    wrong = [f"{n}: ours {ours[n].qtype} ({ours[n].rule}), llama.cpp {t.name}" for n, t in llama.items()
             if ours[n].qtype != t.name]
    assert not wrong, f"{len(wrong)} tensors differ:\n" + "\n".join(wrong[:15])
    block = {t: GGML_QUANT_SIZES[t] for t in set(llama.values())}
    llama_bytes = sum(int(np.prod(ours[n].shape)) // block[t][0] * block[t][1] for n, t in llama.items())
    assert plan.total_bytes == llama_bytes


# ---------------------------------------------------------------------------------------------
# Exact sizes, the CLI, budgets: on a tiny checkpoint


@pytest.fixture(scope="module")
def tiny(module_tmp) -> Path:
    return build_checkpoint(replace(TINY, mtp=True), module_tmp("plan") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("split", [{}, {"split": SplitOptions(max_size=6_000_000)}, {"split": SplitOptions(max_tensors=40)}])
def test_predicted_size_is_written_size(tiny, tmp_path, split):
    options = ConvertOptions(qtype="Q5_K_M", **split)
    predicted = describe_plan(build_plan(tiny, options))["shard_bytes"]
    files = convert(tiny, tmp_path / "m.gguf", options, RunOptions(progress=False, report=False))
    assert [f.stat().st_size for f in files] == predicted
    assert (len(files) > 1) == bool(split)


def test_plan_command_prints_rules_and_sizes(tiny, capsys):
    main(["plan", str(tiny), "--type", "Q4_K_M", "--tensor-type", "ffn_up_exps=Q8_0", "--json"])
    summary = json.loads(capsys.readouterr().out)
    rules = {t["name"]: (t["type"], t["rule"]) for t in summary["tensors"]}
    assert rules["blk.0.ffn_up_exps.weight"] == ("Q8_0", "--tensor-type ffn_up_exps=Q8_0")
    assert rules["output.weight"] == ("Q8_0", "Q4_K_M: output: row does not fit the mix's block → Q8_0")
    assert rules["blk.1.ffn_down_exps.weight"][1].endswith("→ Q5_0")  # Q4_K's row fallback is named
    assert summary["file_bytes"] == sum(summary["shard_bytes"]) > summary["tensor_bytes"]
    main(["plan", str(tiny), "--type", "Q2_K_XL"])
    text = capsys.readouterr().out
    assert "ssm_out → Q8_0" in text and "file size" in text and "MTP" in text


@pytest.mark.parametrize("argv,message", [
    (["--type", "Q4_K_M", "--recipe", "x.toml"], "error: --recipe and --type: give one"),
    (["--type", "Q4_K_Q"], "error: --type Q4_K_Q: unknown; choose one of"),
    (["--tensor-type", "ffn_down"], "error: --tensor-type 'ffn_down': expected REGEX=TYPE"),
    (["--output-tensor-type", "Q7_K"], "error: --output-tensor-type: unsupported tensor type 'Q7_K'"),
    (["--token-embedding-type", "Q4_K"], "error: --token-embedding-type Q4_K: token_embd.weight has rows of 64"),
    (["--type", "Q8_0", "--target-size", "1M"], "error: --target-size 1,000,000: the Q8_0 mix alone is"),
])
def test_plan_errors_are_one_line_naming_the_option(tiny, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(tiny), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith(message) and err.count("\n") == 1, err


def test_relative_error_is_ggmls(ggml):
    """The budget's error measure: quantize with ggml's bytes and dequantize with gguf-py's, independently."""
    rows = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    for qtype in ("Q4_K", "Q8_0"):
        restored = gguf.quants.dequantize(ggml.quantize(rows, T[qtype]), T[qtype]).reshape(rows.shape)
        expected = np.linalg.norm(restored.astype(np.float64) - rows) / np.linalg.norm(rows.astype(np.float64))
        assert budget.relative_rmse(rows, qtype) == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_sampled_rows_are_rows_of_the_written_tensors(tiny, tmp_path):
    """What the error measure quantizes are rows of llama.cpp's F32 tensors (column transforms applied)."""
    from rioquant.export.checkpoint import read_rows_float32
    from rioquant.export.qwen35moe import load_rows

    ref = scan(run_reference_converter(tiny, tmp_path / "ref-f32.gguf", "f32")).tensors
    plan = build_plan(tiny, ConvertOptions(qtype="F32"))
    for spec in plan.specs:
        if spec.transform in (None, "cols_tile_v") and len(spec.shape) >= 2 and spec.shape[-2] > 1:
            values = np.frombuffer(ref[spec.name].data, np.float32).reshape(spec.shape)
            for expert, rows in budget.sample_rows(spec.shape):
                got = load_rows(spec, plan.args, expert, rows, read_rows_float32)
                np.testing.assert_array_equal(got, values[expert][rows] if expert is not None else values[rows],
                                              err_msg=spec.name)


def _no_upgrade_fits(entries, errors, budget_left: int, alignment: int) -> bool:
    pad = lambda n: -(-n // alignment) * alignment  # noqa: E731
    for e in entries:
        if e.name not in errors or not budget.can_raise(e):
            continue
        for t in budget.upgrade_types(e):
            grows = pad(nbytes(T[t], e.shape)) - pad(e.nbytes)
            if errors[e.name][t] < errors[e.name][e.qtype] and grows <= budget_left:
                return False
    return True


@pytest.mark.slow
def test_target_size_raises_the_worst_tensors_within_budget(tiny, tmp_path):
    base = describe_plan(build_plan(tiny, ConvertOptions(qtype="Q3_K_M")))
    target = base["file_bytes"] + 2_000_000
    options = ConvertOptions(qtype="Q3_K_M", target_size=target)
    plan = build_plan(tiny, options)
    summary = describe_plan(plan)
    raised = [e for e in plan.entries if e.rule.startswith("target-size: raised from")]
    assert raised and summary["file_bytes"] <= target
    # greedy to the end: no single further upgrade fits what is left of the budget
    errors = budget.measure_errors(
        ((n, r) for n, r in _samples(plan)), {e.name: [e.qtype, *budget.upgrade_types(e)] for e in plan.entries
                                             if budget.can_raise(e)})
    assert _no_upgrade_fits(plan.entries, errors, target - summary["file_bytes"], 32)
    assert build_plan(tiny, options).entries == plan.entries  # deterministic
    (out,) = convert(tiny, tmp_path / "budget.gguf", options, RunOptions(progress=False, report=False))
    assert out.stat().st_size == summary["file_bytes"]

    bpw = ConvertOptions(qtype="Q3_K_M", target_bpw=base["bpw"] + 0.5)
    summary = describe_plan(build_plan(tiny, bpw))
    assert base["bpw"] < summary["bpw"] <= base["bpw"] + 0.5


def _samples(plan):
    from rioquant.convert import error_samples

    return error_samples(plan, {e.name for e in plan.entries if budget.can_raise(e)})


def test_target_size_needs_weights(rio_397b):
    with pytest.raises(PlanError, match="no weights to measure"):
        build_plan(rio_397b, ConvertOptions(qtype="Q4_K_M", target_size=300 * 10**9), weights_optional=True)
