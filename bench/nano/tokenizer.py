"""The nano model's tokenizer: a BPE vocabulary trained on the corpus, behind Qwen3.5's own
normalizer, pre-tokenizer (the Split regex + ByteLevel), decoder, special tokens and chat template.

Only the vocabulary and merges are new: the files are Qwen3.5's tokenizer files with the model
section replaced and the 33 added tokens renumbered to follow the BPE ranks. So the converter and
llama.cpp treat the nano tokenizer as the `qwen35` pre-tokenizer, and everything downstream of the
ids (GGUF vocab, token types, chat template) is exercised as on the real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from rioquant.testing.tokenizer import tokenizer_files

BPE_VOCAB = 4096  # byte alphabet (256) + merges
TRAIN_CHARS = 4_000_000  # the BPE statistics settle long before the whole 10 MB


def _renumber_added(tokens: list[dict], first_id: int) -> dict[int, int]:
    """Old id → new id for the added tokens, in their original order."""
    return {t["id"]: first_id + k for k, t in enumerate(sorted(tokens, key=lambda t: t["id"]))}


def train_bpe(text: str, vocab_size: int = BPE_VOCAB) -> dict:
    """The trained BPE model section (`{"vocab": ..., "merges": ...}`) of a tokenizer.json."""
    real = Tokenizer.from_file(str(tokenizer_files() / "tokenizer.json"))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = real.normalizer
    tokenizer.pre_tokenizer = real.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(text[:TRAIN_CHARS].splitlines(keepends=True), trainer)
    return json.loads(tokenizer.to_str())["model"]


def write_tokenizer(text: str, out: Path, vocab_size: int = BPE_VOCAB) -> int:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out`; returns the
    number of token ids (BPE ranks + added tokens)."""
    source = tokenizer_files()
    full = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = train_bpe(text, vocab_size)
    n_bpe = len(model["vocab"])
    remap = _renumber_added(full["added_tokens"], n_bpe)
    full["model"]["vocab"] = model["vocab"]
    full["model"]["merges"] = model["merges"]
    for token in full["added_tokens"]:
        token["id"] = remap[token["id"]]
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in config["added_tokens_decoder"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(full, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(source / "chat_template.jinja", out / "chat_template.jinja")
    Tokenizer.from_file(str(out / "tokenizer.json"))  # fails here, not in the converter, if the surgery broke it
    return n_bpe + len(remap)


def special_id(tokenizer_dir: Path, content: str) -> int:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(content)
