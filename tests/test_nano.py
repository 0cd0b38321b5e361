"""The fidelity bench's nano model (bench/nano): deterministic training, and a retrained vocabulary
behind Qwen3.5's pre-tokenizer that the converter accepts and llama.cpp tokenizes as transformers does.

The model here is a shrunken nano (hidden 64, 4 experts, 2 steps): the code path is the real one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from bench.nano.corpus import load_corpus
from bench.nano.train import NanoShape, TrainSettings, train
from rioquant.convert import ConvertOptions, RunOptions, convert
from rioquant.files.gguf_file import read_header
from rioquant.testing.oracles import plain_cpu_buffers

SMALL = NanoShape(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, linear_key_head_dim=16,
                  linear_value_head_dim=16, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                  num_hidden_layers=4)
QUICK = TrainSettings(steps=2, batch=2, seq_len=64, bpe_vocab=1024)


@pytest.fixture(scope="module")
def nano(module_tmp) -> Path:
    return train(module_tmp("nano") / "model", QUICK, SMALL, log=lambda _: None)


def test_corpus_splits_are_disjoint_and_nonempty():
    corpus = load_corpus()
    sizes = corpus.sizes
    assert min(sizes.values()) > 50_000 and sizes["train"] > 10 * sizes["evaluation"]
    assert corpus.evaluation[:2000] not in corpus.train and corpus.calibration[:2000] not in corpus.train


@pytest.mark.slow
def test_training_is_deterministic_from_the_seed(nano, tmp_path):
    again = train(tmp_path / "again", QUICK, SMALL, log=lambda _: None)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (nano / name).read_bytes(), name


@pytest.mark.slow
def test_retrained_vocabulary_converts_and_tokenizes_like_llama_cpp(nano, tmp_path):
    """The probe hash of a new vocabulary is unknown to llama.cpp's table; the tokenizer.json sections are
    Qwen3.5's, so the file says `qwen35`, and llama.cpp's tokenizer then splits text exactly as transformers."""
    from llama_cpp import Llama

    (out,) = convert(nano, tmp_path / "nano-f32.gguf", ConvertOptions(qtype="F32"), RunOptions(progress=False, report=False))
    assert read_header(out).metadata["tokenizer.ggml.pre"] == "qwen35"
    text = load_corpus().evaluation[:20_000] + " Olá, 你好 🚀 3.14159 '\n\n\t x"
    with plain_cpu_buffers():
        vocab = Llama(model_path=str(out), vocab_only=True, verbose=False)
    ref = vocab.tokenize(text.encode(), add_bos=False, special=False)
    vocab.close()
    ids = Tokenizer.from_file(str(nano / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ids == ref


def test_other_pre_tokenizers_are_still_refused(nano, tmp_path):
    import json
    import shutil

    from rioquant.errors import CheckpointError

    copy = tmp_path / "gpt2-split"
    shutil.copytree(nano, copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(CheckpointError, match="pre-tokenizer hash .* is not Qwen3.5's"):
        convert(copy, tmp_path / "x.gguf", ConvertOptions(qtype="F32"), RunOptions(progress=False, report=False))


def test_frontier_is_the_lower_envelope_of_llama_cpps_menu_interpolated_in_log_kld():
    from bench.fidelity import frontier_log_kld, frontier_points, verdicts

    def row(mix, bpw, kld, producer="llama.cpp", imatrix=True):
        return {"mix": mix, "bpw": bpw, "kld": kld, "kld_99_9": 10 * kld, "kld_99_9_halves": [9 * kld, 11 * kld],
                "producer": producer, "imatrix": imatrix, "label": mix}

    rows = [row("Q2_K", 2.0, 1.0), row("Q3_K_M", 3.0, 0.1), row("Q4_K_M", 4.0, 0.01), row("Q5_K_M", 5.0, 0.001),
            row("Q6_K", 7.0, 0.0001),
            row("Q3_K_S", 3.5, 0.5), row("IQ4_XS", 4.25, 0.02),  # beaten by a smaller mix: not on the frontier
            row("Q4_K_M", 5.0, 1e-9, imatrix=False)]  # other imatrix setting: ignored
    assert [bpw for bpw, _ in frontier_points(rows, True, "kld")] == [2.0, 3.0, 4.0, 5.0, 7.0]
    assert math.exp(frontier_log_kld(rows, True, "kld", 4.5)) == pytest.approx(10 ** -2.5)
    assert math.exp(frontier_log_kld(rows, True, "kld", 6.0)) == pytest.approx(10 ** -3.5)
    assert math.exp(frontier_log_kld(rows, True, "kld", 2.5)) == pytest.approx(10 ** -0.5)
    assert math.exp(frontier_log_kld(rows, True, "kld", 1.5)) == pytest.approx(10 ** 0.5)  # below the smallest mix
    assert math.exp(frontier_log_kld(rows, True, "kld", 8.0)) == pytest.approx(10 ** -4.5)  # above the largest
    xl = [row("Q4_K_XL", 4.5, 0.002, "rioquant"), row("Q3_K_XL", 4.0, 0.02, "rioquant")]
    (a, b) = verdicts(rows + xl)
    assert a["below"] and a["kld_ratio"] == pytest.approx(0.002 / 10 ** -2.5)
    assert a["kld_99_9_halves_ratio"] == pytest.approx([0.018 / 10 ** -1.5, 0.022 / 10 ** -1.5])
    assert not b["below"] and b["kld_99_9_ratio"] == pytest.approx(2.0)
