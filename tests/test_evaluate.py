"""`rioquant ppl / kld / imatrix` end to end on a tiny Qwen3.5-MoE, against transformers and llama.cpp.

The model is TINY in float32 (3 Gated DeltaNet layers + 1 gated full-attention layer, 4 experts
top-2, logits far from uniform), converted by rioquant to F32 and Q8_0 GGUFs. The text is Python's
own documentation (pydoc_data.topics, PSF licence), read from the interpreter: nothing is downloaded.

- HF checkpoint: logits equal transformers' float32 forward; F32 GGUF: logits equal llama.cpp's over
  the same chunks; Q8_0 GGUF: perplexity within 1 % of llama.cpp's (random tiny MoE models are
  chaotic, so quantized paths are compared on perplexity, float32 paths on logits).
- `--numerics ggml`, product by product, on KQUANT with logits N(0, 40²) as F16, BF16, Q8_0 and Q4_K_M
  GGUFs (one per rounding ggml applies): every weight's product (dense, each routed expert, the output head), fed llama.cpp's
  own input (its graph callback), equals llama.cpp's to float32 summation order.
- Layer-major streaming (activations spilled to disk) equals whole-model evaluation bit for bit.
- KL divergence equals a direct full-vocabulary computation from both models' logits.
- The imatrix equals Σx² gathered by hooks on transformers' modules, and reads back in llama.cpp's format.
- Bad input fails with one line: short text, missing base, --device cuda without CUDA.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from rioquant.cli import main
from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.evaluate.engine import Engine, EngineOptions, numerics_for, whole_model_states
from rioquant.evaluate.numerics import VEC_DOT_TYPE, Numerics
from rioquant.evaluate.pipelines import chunk_logits, collect_imatrix, kl_divergence, perplexity
from rioquant.evaluate.source import ExpertStack, ModelSource, open_source
from rioquant.evaluate.text import load_tokenizer, tokenize_text
from rioquant.export.qwen35moe import cols_tile_v
from rioquant.quant.imatrix import read_imatrix
from rioquant.testing.checkpoints import KQUANT, TINY, build_checkpoint
from rioquant.testing.gguf_scan import scan
from rioquant.testing.oracles import llama_chunk_logits, llama_tensors, plain_cpu_buffers, transformers_logits

SPEC = replace(TINY, dtype="float32")  # float32 weights: the HF path is transformers' float32 path
CTX = 64
FIRST = CTX // 2
QUIET = EngineOptions(progress=False)


def evaluation_text(n_chars: int) -> str:
    """Python's documentation topics (pydoc_data, PSF licence), always on the machine."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:n_chars]


@pytest.fixture(scope="module")
def m(module_tmp) -> SimpleNamespace:
    root = module_tmp("check")
    hf = build_checkpoint(SPEC, root / "hf")
    (f32,) = convert(hf, root / "tiny-F32.gguf", ConvertOptions(qtype="F32"), RunOptions(progress=False))
    (q8,) = convert(hf, root / "tiny-Q8_0.gguf", ConvertOptions(qtype="Q8_0"), RunOptions(progress=False))
    text = root / "topics.txt"
    text.write_text(evaluation_text(40_000))
    chunks = tokenize_text(open_source(hf), text, CTX, 4)
    return SimpleNamespace(root=root, hf=hf, f32=f32, q8=q8, text=text, chunks=chunks)


def nll_from_logits(logits: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """llama-perplexity's NLL of positions FIRST..CTX-2 from logits (n, CTX - FIRST, vocab), in float64."""
    z = logits[:, :-1].astype(np.float64)
    top = z.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(z - top).sum(-1))
    target = np.take_along_axis(z, chunks[:, FIRST + 1 :, None].astype(np.int64), -1)[..., 0]
    return (lse - target).reshape(-1)


@pytest.mark.slow
def test_tokenization_matches_llama_cpp(m):
    from llama_cpp import Llama

    text = m.text.read_text()
    with plain_cpu_buffers():
        vocab = Llama(model_path=str(m.q8), vocab_only=True, verbose=False)
    ref = vocab.tokenize(text.encode(), add_bos=False, special=False)
    vocab.close()
    for source in (open_source(m.hf), open_source(m.q8)):  # tokenizer.json, and the one rebuilt from the GGUF
        ids = load_tokenizer(source).encode(text, add_special_tokens=False).ids
        first_diff = next((i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b), min(len(ids), len(ref)))
        assert ids == ref, f"{source.describe()}: {len(ids)} tokens, llama.cpp {len(ref)}; first difference at {first_diff}"


@pytest.mark.slow
def test_hf_logits_equal_transformers(m):
    ours = chunk_logits(m.hf, m.chunks[:2], QUIET)
    for c in range(2):
        ref = transformers_logits(m.hf, m.chunks[c])
        diff = np.abs(ours[c] - ref)
        assert diff.max() < 2e-3, f"chunk {c}: max |Δlogit| {diff.max():.2e} at {np.unravel_index(diff.argmax(), diff.shape)}"
        assert np.array_equal(ours[c].argmax(-1), ref.argmax(-1))
    ppl = perplexity(m.hf, m.text, CTX, 2, QUIET)["ppl"]
    ref_nll = nll_from_logits(np.stack([transformers_logits(m.hf, c)[FIRST:] for c in m.chunks[:2]]), m.chunks[:2])
    assert ppl == pytest.approx(np.exp(ref_nll.mean()), rel=1e-4)


@pytest.mark.slow
def test_f32_gguf_logits_and_ppl_equal_llama_cpp(m):
    ref = llama_chunk_logits(m.f32, m.chunks, FIRST)
    ours = chunk_logits(m.f32, m.chunks, QUIET)[:, FIRST:]
    diff = np.abs(ours - ref)
    assert diff.max() < 2e-3, f"max |Δlogit| {diff.max():.2e} at {np.unravel_index(diff.argmax(), diff.shape)}"
    result = perplexity(m.f32, m.text, CTX, 4, QUIET)
    assert result["tokens_scored"] == 4 * (CTX - FIRST - 1)
    assert result["ppl"] == pytest.approx(np.exp(nll_from_logits(ref, m.chunks).mean()), rel=1e-4)


@pytest.mark.slow
def test_quantized_ppl_within_one_percent_of_llama_cpp(m):
    ref = np.exp(nll_from_logits(llama_chunk_logits(m.q8, m.chunks, FIRST), m.chunks).mean())
    ours = perplexity(m.q8, m.text, CTX, 4, QUIET)  # numerics auto: ggml's roundings for a GGUF
    assert ours["ppl"] == pytest.approx(ref, rel=0.01), f"rioquant {ours['ppl']:.6g}, llama.cpp {ref:.6g}"


# ---------------------------------------------------------------------------------------------
# --numerics ggml, product by product: every weight's product, fed llama.cpp's own input, gives llama.cpp's
# output. Perplexity cannot show this on a random model with logits far from uniform: there a float32
# summation order alone moves it by 0.1-7 % (docs/evaluation.md), so each product is checked instead.

WIDE = replace(KQUANT, weight_scale=40.0)  # rows of 256 (the K types apply); logits N(0, 40²)
# one GGUF per rounding ggml applies to a product's input: F16, BF16, Q8_0 and Q8_K (Q4_K_M's Q4_K/Q6_K; Q2_K
# rounds the same); F32 rounds nothing and is held to llama.cpp's logits by test_f32_gguf_logits_and_ppl_equal_llama_cpp
NUMERICS_TYPES = ["F16", "BF16", "Q8_0", "Q4_K_M"]
PRODUCT_TOL = 4e-6  # float32 summation order (llama.cpp's kernels add in another order than torch): ≤ 1.0e-6 seen
DENSE_PRODUCTS = {  # weight kind → llama.cpp's names of its input and its product (src/models/qwen35moe.cpp)
    "attn_qkv": ("attn_norm", "linear_attn_qkv_mixed"), "attn_gate": ("attn_norm", "z"),
    "ssm_beta": ("attn_norm", "beta"), "ssm_alpha": ("attn_norm", "alpha"), "ssm_out": ("final_output", "linear_attn_out"),
    "attn_q": ("attn_norm", "Qcur_full"), "attn_k": ("attn_norm", "Kcur"), "attn_v": ("attn_norm", "Vcur"),
    "attn_output": ("attn_gated", "attn_output"), "ffn_gate_inp": ("attn_post_norm", "ffn_moe_logits"),
    "ffn_gate_inp_shexp": ("attn_post_norm", "shared_expert_gate"), "ffn_gate_shexp": ("attn_post_norm", "ffn_gate"),
    "ffn_up_shexp": ("attn_post_norm", "ffn_up"), "ffn_down_shexp": ("ffn_swiglu", "ffn_shexp"),
}
EXPERT_PRODUCTS = {"ffn_gate_exps": ("attn_post_norm", "ffn_moe_gate"), "ffn_up_exps": ("attn_post_norm", "ffn_moe_up"),
                   "ffn_down_exps": ("ffn_moe_swiglu", "ffn_moe_down")}
GRAPH_NAMES = {n for pair in (*DENSE_PRODUCTS.values(), *EXPERT_PRODUCTS.values()) for n in pair} | {"ffn_moe_argsort"}


@pytest.fixture(scope="module")
def wide(module_tmp) -> SimpleNamespace:
    root = module_tmp("wide")
    hf = build_checkpoint(WIDE, root / "hf")
    text = root / "topics.txt"
    text.write_text(evaluation_text(4_000))
    return SimpleNamespace(hf=hf, tokens=tokenize_text(open_source(hf), text, CTX, 1)[0])


def _expert_products(stack: ExpertStack, kind: str, x: torch.Tensor, chosen: torch.Tensor, num: Numerics) -> torch.Tensor:
    """(T, k, out): each token's product with each of its k chosen experts; x is (T, k, in)."""
    out = torch.empty(*chosen.shape, stack.expert(0).shape[0])
    for e in chosen.unique().tolist():
        rows = chosen == e
        out[rows] = torch.nn.functional.linear(num.input(kind, x[rows]), stack.expert(e))
    return out


def ggml_product_errors(source: ModelSource, ref: dict[str, np.ndarray], mode: str) -> dict[tuple[str, int | None], float]:
    """max |ours − llama.cpp| / max |llama.cpp| of every weight's product, each fed llama.cpp's input,
    by (weight kind, layer; None: the head)."""
    cpu, a = torch.device("cpu"), source.args
    errors = {}

    def check(label: tuple[str, int | None], ours: torch.Tensor, theirs: np.ndarray) -> None:
        errors[label] = float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max())

    for il in range(a.num_hidden_layers):
        weights, num = source.layer(il, cpu), numerics_for(source, mode, il)
        for kind, (x_name, y_name) in DENSE_PRODUCTS.items():
            if kind in weights:
                w = weights[kind].reshape(-1, weights[kind].shape[-1])
                x = torch.from_numpy(ref[f"{x_name}-{il}"]).reshape(-1, w.shape[1])
                check((kind, il), torch.nn.functional.linear(num.input(kind, x), w),
                      ref[f"{y_name}-{il}"].reshape(x.shape[0], -1))
        chosen = torch.from_numpy(ref[f"ffn_moe_argsort-{il}"]).reshape(CTX, -1)[:, : a.num_experts_per_tok]
        for kind, (x_name, y_name) in EXPERT_PRODUCTS.items():
            x = torch.from_numpy(ref[f"{x_name}-{il}"]).reshape(CTX, -1, weights[kind].expert(0).shape[1])
            ours = _expert_products(weights[kind], kind, x.expand(-1, chosen.shape[1], -1), chosen, num)
            check((kind, il), ours, ref[f"{y_name}-{il}"].reshape(ours.shape))
    stored = source.head(cpu).output
    head = stored.rows(0, stored.shape[0])
    x = torch.from_numpy(ref["result_norm"]).reshape(CTX, -1)
    check(("output", None), torch.nn.functional.linear(numerics_for(source, mode, None).input("output", x), head),
          ref["result_output"].reshape(CTX, -1))
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("qtype", NUMERICS_TYPES)
def test_ggml_numerics_reproduce_each_llama_cpp_product(wide, tmp_path, qtype):
    path = tmp_path / f"wide-{qtype}.gguf"
    (path,) = convert(wide.hf, path, ConvertOptions(qtype=qtype), RunOptions(progress=False, report=False))
    try:
        ref = llama_tensors(path, wide.tokens, lambda name: name.rsplit("-", 1)[0] in GRAPH_NAMES
                            or name in ("model.input_embed", "result_norm", "result_output"))
        source = open_source(path)
        assert np.array_equal(source.embedding_rows(wide.tokens), ref["model.input_embed"].reshape(CTX, -1))
        ggml, exact = ggml_product_errors(source, ref, "ggml"), ggml_product_errors(source, ref, "exact")
    finally:
        path.unlink()
    worst = max(ggml, key=ggml.get)
    assert ggml[worst] <= PRODUCT_TOL, f"{qtype}: {worst} differs from llama.cpp's by {ggml[worst]:.2e} (relative)"
    # the check sees a missing rounding: without it, every product with a rounding weight type is far off
    rounded = [(kind, il) for kind, il in exact if VEC_DOT_TYPE.get(source.weight_types(il)[kind].name, "F32") != "F32"]
    assert rounded
    assert all(exact[label] > 10 * PRODUCT_TOL for label in rounded), min(rounded, key=exact.get)


STREAMING_CASES = {  # source, chunks per group, activations on disk
    "hf-disk": ("hf", 1, True),
    "q8-disk": ("q8", 1, True),
    "q8-ram-experts-kept": ("q8", 2, False),  # two groups: each layer's experts dequantized once, kept
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STREAMING_CASES))
def test_layer_streaming_equals_whole_model(m, tmp_path, case):
    which, group, on_disk = STREAMING_CASES[case]
    source = open_source(getattr(m, which))
    options = EngineOptions(progress=False, group_chunks=group, max_memory=1 if on_disk else 0, tmp_dir=tmp_path)
    engine = Engine(source, m.chunks, options)
    acts = engine.run_layers()
    assert engine.profile.activations_on_disk == on_disk
    head = source.head(engine.device)
    streamed = np.concatenate([s.numpy() for _, s in engine.final_states(acts, head.output_norm)])
    acts.close()
    whole = whole_model_states(source, m.chunks, EngineOptions(progress=False, group_chunks=group))
    assert np.array_equal(streamed, whole), f"max |Δ| {np.abs(streamed - whole).max()}"


def direct_kld(base: np.ndarray, quant: np.ndarray, chunks: np.ndarray) -> dict[str, np.ndarray]:
    """llama.cpp's per-token quantities straight from full logits, in float64."""
    targets = chunks[:, FIRST + 1 :].reshape(-1).astype(np.int64)

    def log_softmax(z):
        z = z[:, :-1].reshape(-1, z.shape[-1]).astype(np.float64)
        top = z.max(-1, keepdims=True)
        return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))

    lp, lq = log_softmax(base), log_softmax(quant)
    rows = np.arange(len(targets))
    kld = np.where(lp > -16, np.exp(lp) * (lp - lq), 0.0).sum(-1)
    return {"kld": kld, "p_diff": np.exp(lq[rows, targets]) - np.exp(lp[rows, targets]),
            "nll_q": -lq[rows, targets], "nll_base": -lp[rows, targets], "same_top": lp.argmax(-1) == lq.argmax(-1)}


@pytest.mark.slow
def test_kld_equals_direct_full_vocabulary_computation(m, tmp_path):
    from rioquant.evaluate.stats import kld_summary

    states, per_token = tmp_path / "base-states.npy", tmp_path / "kld.npy"
    result = kl_divergence(m.hf, m.q8, m.text, CTX, 4, QUIET, base_states=states, tokens_out=per_token)
    base = chunk_logits(m.hf, m.chunks, QUIET)[:, FIRST:]
    quant = chunk_logits(m.q8, m.chunks, QUIET)[:, FIRST:]
    ref = kld_summary(**direct_kld(base, quant, m.chunks))
    assert result["tokens_scored"] == ref["tokens_scored"] == 4 * (CTX - FIRST - 1)
    for key in ("kld", "kld_stderr", "ppl_q", "ppl_base", "ppl_ratio", "rms_delta_p", "delta_p", "same_top_p", "cor_ln_ppl"):
        assert result[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-9), key
    for label, value in ref["kld_percentiles"].items():
        assert result["kld_percentiles"][label] == pytest.approx(value, rel=1e-3, abs=1e-7), label
    direct = direct_kld(base, quant, m.chunks)["kld"]  # --tokens-out: every scored token's KLD, in text order
    assert np.load(per_token) == pytest.approx(direct, rel=1e-3, abs=1e-7)
    assert states.stat().st_size < 4 * (CTX - FIRST - 1) * SPEC.hidden_size * 4 + 1024  # hidden × 4 bytes per token
    again = kl_divergence(m.hf, m.q8, m.text, CTX, 4, QUIET, base_states=states)  # reuses the stored base run
    assert again["kld"] == result["kld"]


def transformers_imatrix(src: Path, chunks: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Σx² and counts per GGUF weight name from forward hooks on transformers' float32 modules."""
    import transformers

    model = transformers.Qwen3_5MoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    a = model.config
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "linear_attn.in_proj_qkv": "attn_qkv",
             "linear_attn.in_proj_z": "attn_gate", "linear_attn.in_proj_b": "ssm_beta",
             "linear_attn.in_proj_a": "ssm_alpha", "linear_attn.out_proj": "ssm_out", "mlp.gate": "ffn_gate_inp",
             "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
             "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp"}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def add(name, x, e=0, n_mat=1):
        x = x.reshape(-1, x.shape[-1]).double()
        sums.setdefault(name, np.zeros((n_mat, x.shape[-1])))[e] += (x * x).sum(0).numpy()
        counts.setdefault(name, np.zeros(n_mat, np.int64))[e] += x.shape[0]

    hooks = []
    for module_name, module in model.named_modules():
        parts = module_name.split(".")
        if len(parts) < 4 or parts[1] != "layers":
            continue
        il, rest = int(parts[2]), ".".join(parts[3:])
        if rest in names:
            gguf = f"blk.{il}.{names[rest]}.weight"

            def hook(mod, args, gguf=gguf, rest=rest):
                x = args[0]
                if rest == "linear_attn.out_proj":  # input columns in the GGUF's tiled V-head order
                    x = torch.from_numpy(cols_tile_v(x.reshape(-1, x.shape[-1]).numpy(), open_source(src).args))
                add(gguf, x)

            hooks.append(module.register_forward_pre_hook(hook))
        elif rest == "mlp.experts":
            def expert_hook(mod, args, il=il):
                x, top_e = args[0], args[1]
                for e in range(a.num_experts):
                    rows = (top_e == e).nonzero()[:, 0]
                    xe = x[rows]
                    gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                    add(f"blk.{il}.ffn_gate_exps.weight", xe, e, a.num_experts)
                    add(f"blk.{il}.ffn_up_exps.weight", xe, e, a.num_experts)
                    add(f"blk.{il}.ffn_down_exps.weight", torch.nn.functional.silu(gate) * up, e, a.num_experts)

            hooks.append(module.register_forward_pre_hook(expert_hook))
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk.tolist()]), use_cache=False)
    for h in hooks:
        h.remove()
    return sums, counts


@pytest.mark.slow
def test_imatrix_equals_transformers_hooks_and_reads_back(m, tmp_path):
    out = tmp_path / "imatrix.gguf"
    result = collect_imatrix(m.hf, m.text, out, CTX, 2, QUIET)
    ref_sums, ref_counts = transformers_imatrix(m.hf, m.chunks[:2])
    assert result["entries"] == len(ref_sums)
    imatrix = read_imatrix(out)  # the recipes' reader
    assert (imatrix.chunk_count, imatrix.chunk_size, imatrix.datasets) == (2, CTX, (str(m.text),))
    for name, sums in ref_sums.items():
        entry = imatrix.entries[name]
        assert np.array_equal(entry.counts, ref_counts[name]), f"{name}: counts {entry.counts} != {ref_counts[name]}"
        np.testing.assert_allclose(entry.sums.reshape(sums.shape), sums, rtol=2e-4, atol=1e-4, err_msg=name)
    raw = scan(out)  # an independent parser: llama-imatrix's keys and tensor shapes
    assert set(raw.kv) == {"general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"}
    assert raw.tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape == (SPEC.num_experts, SPEC.moe_intermediate_size)
    assert raw.tensors["blk.0.ffn_down_exps.weight.counts"].shape == (SPEC.num_experts, 1)


# ---------------------------------------------------------------------------------------------
# the command line


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_cli_ppl_json(m, capsys):
    code, out, err = run_cli(capsys, "ppl", m.q8, "--text", m.text, "--ctx", CTX, "--chunks", 2, "--json",
                             "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"ppl", "ppl_stderr", "tokens_scored", "chunks", "ctx"}
    assert (result["chunks"], result["ctx"], result["tokens_scored"]) == (2, CTX, 2 * (CTX - FIRST - 1))


@pytest.mark.slow
def test_cli_errors_are_one_line(m, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    llama = tmp_path / "llama.gguf"  # a GGUF of another architecture
    writer = gguf.GGUFWriter(llama, arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    cases = [
        (["ppl", m.q8, "--text", short], "needs at least"),
        (["ppl", llama, "--text", m.text], "architecture 'llama'; rioquant evaluates qwen35moe models only"),
        (["kld", "--base", m.hf, "--quant", llama, "--text", m.text], "architecture 'llama'"),
        (["kld", "--base", tmp_path / "missing", "--quant", m.q8, "--text", m.text], "no such model"),
        (["ppl", tmp_path / "missing.gguf", "--text", m.text], "no such model"),
    ]
    if not torch.cuda.is_available():
        cases.append((["ppl", m.q8, "--text", m.text, "--device", "cuda"], "sees no CUDA device"))
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv, "--no-progress")
        assert code == 1 and err.startswith("error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-specific: runs only where torch sees a GPU")
def test_cuda_path_equals_cpu(m):
    from rioquant.evaluate.dequant import TORCH_KERNELS, dequantize_torch
    from rioquant.quant import dequantize, quantize

    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    for qtype in TORCH_KERNELS:
        raw = quantize(x, qtype)
        gpu = dequantize_torch(torch.from_numpy(raw.reshape(-1)).cuda(), qtype, x.shape).cpu().numpy()
        assert np.array_equal(gpu, dequantize(raw, qtype, x.shape)), qtype.name
    for model in (m.hf, m.q8):  # float32 sums in another order: 1e-6 unless a near-tied routing flips
        cpu = perplexity(model, m.text, CTX, 4, QUIET)["ppl"]
        gpu = perplexity(model, m.text, CTX, 4, EngineOptions(device="cuda", progress=False))["ppl"]
        assert gpu == pytest.approx(cpu, rel=1e-2)
    out = m.root / "imatrix-cuda.gguf"
    collect_imatrix(m.hf, m.text, out, CTX, 2, EngineOptions(device="cuda", progress=False))
    assert read_imatrix(out).chunk_count == 2
