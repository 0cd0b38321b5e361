"""The tokenizer as GGUF data: gpt2 BPE tokens, token types, merges, special ids and chat template.

tokenizer.json is parsed with the `tokenizers` library (data only, no remote code), the way llama.cpp's
converter sees it through transformers; merges, special ids and the chat template come from gguf-py's
SpecialVocab, the same reader the reference converter uses. The chat template is carried as data and
never rendered here.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
from tokenizers import Tokenizer

from rioquant.errors import CheckpointError, PlanError

log = logging.getLogger(__name__)

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
# The probe's ids change with the vocabulary, so a vocabulary retrained behind Qwen3.5's pre-tokenizer
# (distillation targets, test models) hashes to something unknown. What llama.cpp's "qwen35" stands for
# is the normalisation and splitting, so those sections of tokenizer.json are also matched as data.
QWEN35_PRE_TOKENIZATION = {
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
            r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]},
}

# Every `tokenizer.ggml.pre` the pinned llama.cpp loads (src/llama-vocab.cpp, checked by a test):
# `--pre-tokenizer` accepts only these, so an asserted name never makes a file llama.cpp refuses to load.
LLAMA_CPP_PRE_TOKENIZERS = frozenset("""
    a.x-4.0 afmoe bailingmoe bailingmoe2 bloom chameleon chatglm-bpe codeshell cohere2moe command-r dbrx
    deepseek-coder deepseek-llm deepseek-r1-qwen deepseek-v3 default exaone exaone-moe exaone4 f2llmv2 falcon
    falcon-h1 falcon3 gemma4 gigachat glm4 glm5 gpt-2 gpt-4o gpt3-finnish granite-docling
    granite-embed-multi-311m granite-embed-multi-97m grok-2 hunyuan hunyuan-dense hy_v4 jais jais-2 jina-de
    jina-es jina-v1-en jina-v2-code jina-v2-de jina-v2-es jina-v5-nano joyai-llm kanana2 kimi-k2 kormo laguna
    lfm2 llada-moe llama-bpe llama-v3 llama3 llama4 megrez mellum mellum2 midm-2.0 minerva-7b minicpm5
    minimax-m2 modern-bert mpt olmo phi-2 pixtral poro-chat qwen2 qwen35 refact roberta-bpe sarvam-moe
    seed-coder smaug-bpe smollm solar-open spark2_5 stablelm2 starcoder superbpe talkie tekken tiny_aya
    trillion ufakzeka viking whitespace youtu
""".split())
# Written only when `--pre-tokenizer` decided tokenizer.ggml.pre: whoever loads the file can see that
# the splitting was stated by the person converting, not recognised from the vocabulary.
ASSERTED_PRE_KEY = "rioquant.tokenizer.pre_asserted"


def check_pre_tokenizer(name: str) -> str:
    """`--pre-tokenizer NAME`, refused unless llama.cpp knows the name."""
    if name not in LLAMA_CPP_PRE_TOKENIZERS:
        raise PlanError(f"--pre-tokenizer {name!r}: llama.cpp knows no such pre-tokenizer "
                        "(Qwen3.5's is qwen35; others: qwen2, llama-bpe, deepseek-v3, … see src/llama-vocab.cpp)")
    return name


def _pre_tokenizer_name(tokenizer: Tokenizer, tokenizer_json: dict) -> tuple[str | None, str]:
    """llama.cpp's name for the pre-tokenizer (None if unknown) and the probe hash llama.cpp uses."""
    probe_ids = tokenizer.encode(PRE_TOKENIZER_PROBE).ids
    digest = hashlib.sha256(str(probe_ids).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest], digest
    sections = {key: tokenizer_json.get(key) for key in QWEN35_PRE_TOKENIZATION}
    model = tokenizer_json.get("model") or {}
    if sections == QWEN35_PRE_TOKENIZATION and model.get("type") == "BPE" and not model.get("byte_fallback"):
        return "qwen35", digest
    return None, digest


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab
    pre_asserted: str | None = None  # why `pre` was taken on the user's word (ASSERTED_PRE_KEY), if it was


def _looks_special(token: str) -> bool:
    """Added tokens that behave as control tokens even when not flagged special (llama.cpp's heuristic)."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _added_tokens(src: Path, tokenizer_json: dict) -> dict[int, dict]:
    """Added tokens by id; tokenizer_config.json's `added_tokens_decoder` overrides tokenizer.json's
    flags, as in transformers (Qwen marks <think>, <tool_call>, … "special": false only there)."""
    added = {int(t["id"]): dict(t) for t in tokenizer_json.get("added_tokens", [])}
    config_path = src / "tokenizer_config.json"
    if config_path.is_file():
        for token_id, info in json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items():
            added.setdefault(int(token_id), {}).update(info)
    return added


def _byte_level_adds_nothing(special: gguf.SpecialVocab, tokenizer_json: dict) -> None:
    """A ByteLevel post-processor adds neither BOS nor EOS. llama.cpp's newer gguf-py records that as
    add_bos/add_eos = false; gguf 0.19 leaves the keys out, so we set the defaults it would."""
    processor = tokenizer_json.get("post_processor") or {}
    processors = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    if any(p.get("type") == "ByteLevel" for p in processors):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)


# The files read_vocab and gguf-py's SpecialVocab read whole; of config.json they read only the special
# token ids, at the top level or under text_config
VOCAB_FILES = ("tokenizer.json", "tokenizer_config.json", "merges.txt", "chat_template.json", "chat_template.jinja")


def vocab_digest(src: Path) -> str:
    """sha256 of everything the vocabulary is made from: two checkpoints with the same digest have the same
    vocabulary, so a process reads it once (seconds for Qwen3.5's 248K tokens) however many it converts."""
    digest = hashlib.sha256()
    for path in [*(src / name for name in VOCAB_FILES), *sorted((src / "additional_chat_templates").glob("*.jinja"))]:
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{path.relative_to(src)}\0{len(data)}\0".encode() + data)
    config_path = src / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        ids = {k: v for part in (config, config.get("text_config") or {}) for k, v in part.items() if k.endswith("_token_id")}
        digest.update(json.dumps(ids, sort_keys=True).encode())
    return digest.hexdigest()


def read_vocab(src: Path, vocab_size: int, asserted_pre: str | None = None) -> Vocab:
    """The vocabulary; `asserted_pre` (`--pre-tokenizer`) names the pre-tokenizer when the probe hash and
    the tokenizer.json sections do not (a warning, and ASSERTED_PRE_KEY in the file, say so)."""
    if asserted_pre is not None:
        check_pre_tokenizer(asserted_pre)
    path = src / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no tokenizer.json (rioquant needs the fast tokenizer file)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        added = _added_tokens(src, tokenizer_json)
    except Exception as err:  # the tokenizers library raises plain Exceptions on malformed files
        raise CheckpointError(f"{path}: cannot be read as a tokenizer ({err})") from None
    pre, digest = _pre_tokenizer_name(tokenizer, tokenizer_json)
    note = None
    if asserted_pre is not None and asserted_pre != pre:
        recognised = f"recognised as {pre}" if pre else "not recognised"
        note = f"{asserted_pre}: asserted with --pre-tokenizer; the vocabulary (probe hash {digest}) is {recognised}"
        log.warning("%s: pre-tokenizer %s", path, note)
        pre = asserted_pre
    if pre is None:
        raise CheckpointError(f"{path}: pre-tokenizer hash {digest} is not Qwen3.5's, nor are its normalizer and "
                              "pre_tokenizer; llama.cpp would not know it (if you know its splitting, state it "
                              "with --pre-tokenizer NAME)")
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
    _byte_level_adds_nothing(special, tokenizer_json)
    return Vocab(tokens, types, pre, special, note)


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    if vocab.pre_asserted:
        writer.add_string(ASSERTED_PRE_KEY, vocab.pre_asserted)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(writer)
