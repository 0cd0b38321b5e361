"""Small GGUFs for the modelfile and publish tests.

- `tiny_release(base)`: the real thing, `rioquant convert` of the TINY checkpoint to Q8_0 with its
  error report (about 15 s), built once per test session under pytest's base temp folder.
- `write_gguf(path, ...)`: a hand-made qwen35moe GGUF (or split set) from gguf-py's GGUFWriter with a
  few tiny tensors and just the metadata publishing reads, for the edge cases: licences, missing or
  foreign chat templates, split sets, corrupt headers. Milliseconds each.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from rioquant.testing.checkpoints import TINY, build_checkpoint
from rioquant.testing.tokenizer import tokenizer_files

BASE_MODEL = "Qwen/Qwen3.5-35B-A3B"
TOKENS = ["a", "b", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 4


def qwen35_template() -> str:
    """The real Qwen3.5 chat template (llama.cpp's Qwen3.5-4B.jinja), as the tiny checkpoints carry it."""
    return (tokenizer_files() / "chat_template.jinja").read_text(encoding="utf-8")


def tiny_release(base: Path) -> Path:
    """`base/publish-tiny/tiny-Q8_0.gguf` (+ tiny-Q8_0.report.json), converted once per session."""
    from rioquant.convert import ConvertOptions, MetadataOptions, RunOptions, convert

    out = base / "publish-tiny" / "tiny-Q8_0.gguf"
    if not out.is_file():
        ckpt = build_checkpoint(TINY, base / "publish-tiny-ckpt")
        convert(ckpt, out, ConvertOptions(qtype="Q8_0", metadata=MetadataOptions(base_models=(BASE_MODEL,))), RunOptions(progress=False))
    return out


def write_gguf(
    path: Path,
    *,
    chat_template: str | None = None,
    license: str | None = None,
    license_link: str | None = None,
    sampling: dict[str, float] | None = None,
    context_length: int = 4096,
    n_tensors: int = 4,
    split_max_tensors: int = 0,
    arch: str = "qwen35moe",
) -> list[Path]:
    """Write a small GGUF (split when split_max_tensors) and return its files in shard order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("Hand Made")
    if license:
        writer.add_license(license)
    if license_link:
        writer.add_license_link(license_link)
    for key, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{key}")(value)
    writer.add_context_length(context_length)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_eos_token_id(EOS_ID)
    if chat_template:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    for i in range(n_tensors):
        shape = (3, 32) if i % 2 else (5,)
        writer.add_tensor(f"blk.{i}.ffn_down_exps.weight" if i % 2 else f"blk.{i}.attn_norm.weight",
                          rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path) if split_max_tensors else [path]


def patch_scalar(path: Path, key: str, vtype: gguf.GGUFValueType, value: int) -> None:
    """Overwrite one integer metadata value in place (the bytes after its key and type)."""
    fmt = {gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i"}[vtype]
    data = bytearray(path.read_bytes())
    needle = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype)
    at = data.index(needle) + len(needle)
    data[at: at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))
