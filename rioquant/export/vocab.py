"""The tokenizer as GGUF data: gpt2 BPE tokens, token types, merges, special ids and chat template.

tokenizer.json is parsed with the `tokenizers` library (data only, no remote code), the way llama.cpp's
converter sees it through transformers; merges, special ids and the chat template come from gguf-py's
SpecialVocab, the same reader the reference converter uses. The chat template is carried as data and
never rendered here.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
from tokenizers import Tokenizer

from rioquant.errors import CheckpointError

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids of this text (convert_hf_to_gguf.py)
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333"
    " 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure"
    " I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen3.5
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",  # MiniCPM-V 4.6 (Qwen3.5 vocab)
}


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab


def _looks_special(token: str) -> bool:
    """Added tokens that behave as control tokens even when not flagged special (llama.cpp's heuristic)."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def read_vocab(src: Path, vocab_size: int) -> Vocab:
    path = src / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no tokenizer.json (rioquant needs the fast tokenizer file)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        added = {t["id"]: t for t in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])}
    except Exception as err:  # the tokenizers library raises plain Exceptions on malformed files
        raise CheckpointError(f"{path}: cannot be read as a tokenizer ({err})") from None
    probe_ids = tokenizer.encode(PRE_TOKENIZER_PROBE).ids
    digest = hashlib.sha256(str(probe_ids).encode()).hexdigest()
    pre = KNOWN_PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise CheckpointError(f"{path}: pre-tokenizer hash {digest} is not Qwen3.5's; llama.cpp would not know it")
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(by_id)} is beyond the model's vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        info = added.get(i)
        if info is None:
            types.append(gguf.TokenType.NORMAL)
        else:
            if not info.get("normalized", True):
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if info.get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        tokens.append(token)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    return Vocab(tokens, types, pre, special)


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(writer)
