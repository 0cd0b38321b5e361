"""Evaluation text → token chunks, tokenized as llama-perplexity tokenizes it.

The tokenizer is the model's: `tokenizer.json` of a Hugging Face checkpoint, or one built from a GGUF's
own vocabulary (tokens, merges, and the pre-tokenizer regex llama.cpp uses for `tokenizer.ggml.pre`),
or any tokenizer.json given with --tokenizer. Special tokens written in the text are read as plain
text (llama-perplexity does not parse them), and the text is cut into floor(n / ctx) chunks of ctx
tokens; a BOS replaces each chunk's first token only where the vocabulary asks for one (not Qwen3.5).
"""

import json
from pathlib import Path

import numpy as np
from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from rioquant.errors import EvaluationError
from rioquant.evaluate.source import GGUFSource, ModelSource

# tokenizer.ggml.pre → the split regex llama.cpp applies before byte-level BPE (src/llama-vocab.cpp)
PRE_TOKENIZER_REGEX: dict[str, str] = {
    "qwen35": (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
        r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def gguf_tokenizer(source: GGUFSource) -> Tokenizer:
    """A `tokenizers` BPE from the GGUF's tokenizer.ggml.* metadata."""
    kv = source.model.meta
    model, pre = kv.get(Keys.Tokenizer.MODEL), kv.get(Keys.Tokenizer.PRE)
    if model != "gpt2" or pre not in PRE_TOKENIZER_REGEX:
        raise EvaluationError(
            f"{source.path}: tokenizer {model}/{pre} cannot be rebuilt from the GGUF; pass --tokenizer tokenizer.json"
        )
    tokens: list[str] = kv[Keys.Tokenizer.LIST]
    types = np.asarray(kv.get(Keys.Tokenizer.TOKEN_TYPE, np.ones(len(tokens), np.int32)))
    merges = [tuple(m.split(" ", 1)) for m in kv[Keys.Tokenizer.MERGES]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(tokens[i], special=True, normalized=False) for i in np.flatnonzero(types == TokenType.CONTROL)]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in np.flatnonzero(types == TokenType.USER_DEFINED)]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok


def load_tokenizer(source: ModelSource, override: Path | None = None) -> Tokenizer:
    if override is not None:
        path = Path(override)
    elif isinstance(source, GGUFSource):
        tok = gguf_tokenizer(source)
        tok.encode_special_tokens = True
        return tok
    else:
        path = source.path / "tokenizer.json"
    if not path.is_file():
        raise EvaluationError(f"{path}: no tokenizer.json (pass --tokenizer PATH)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise EvaluationError(f"{path}: not a tokenizer.json ({str(err).splitlines()[0]})") from None
    tok.encode_special_tokens = True  # special tokens in the text are text, as llama-perplexity reads them
    return tok


def bos_to_add(source: ModelSource) -> int | None:
    """The BOS id llama-perplexity would put at the start of each chunk, or None (Qwen3.5: none)."""
    if isinstance(source, GGUFSource):
        kv = source.model.meta
        return int(kv[Keys.Tokenizer.BOS_ID]) if kv.get(Keys.Tokenizer.ADD_BOS) else None
    config_path = source.path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not config.get("add_bos_token"):
        return None
    model_config = json.loads((source.path / "config.json").read_text())
    bos = model_config.get("bos_token_id", model_config.get("text_config", {}).get("bos_token_id"))
    return int(bos) if bos is not None else None


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvaluationError(f"{path}: text file not found") from None
    except UnicodeDecodeError as err:
        raise EvaluationError(f"{path}: not UTF-8 text (byte {err.start})") from None


def token_chunks(tokens: np.ndarray, ctx: int, n_chunks: int | None, text_path: Path, bos: int | None = None) -> np.ndarray:
    """int32 (n, ctx): floor(len / ctx) non-overlapping chunks (at most n_chunks), as llama-perplexity cuts them."""
    if ctx < 8:
        raise EvaluationError(f"--ctx {ctx}: too small (at least 8; llama-perplexity's default is 512)")
    if len(tokens) < 2 * ctx:
        raise EvaluationError(
            f"{text_path}: {len(tokens)} tokens, but --ctx {ctx} needs at least {2 * ctx} (2 × ctx); "
            "use a longer text or a smaller --ctx"
        )
    n = len(tokens) // ctx if n_chunks is None else min(n_chunks, len(tokens) // ctx)
    if n < 1:
        raise EvaluationError(f"--chunks {n_chunks}: must be at least 1")
    chunks = np.asarray(tokens[: n * ctx], dtype=np.int32).reshape(n, ctx).copy()
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def tokenize_text(source: ModelSource, text_path: Path, ctx: int, n_chunks: int | None,
                  tokenizer: Path | None = None) -> np.ndarray:
    tok = load_tokenizer(source, tokenizer)
    ids = np.asarray(tok.encode(read_text(text_path), add_special_tokens=False).ids, dtype=np.int32)
    if ids.size and int(ids.max()) >= source.n_vocab:
        raise EvaluationError(f"{text_path}: token id {int(ids.max())} outside the model's {source.n_vocab} (wrong tokenizer?)")
    return token_chunks(ids, ctx, n_chunks, text_path, bos_to_add(source))
