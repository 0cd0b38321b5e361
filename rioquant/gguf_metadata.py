"""What an output GGUF says besides its tensors: `general.*`, the architecture's keys, the vocabulary and
the imatrix's keys, or, from a GGUF source, that file's own keys as llama-quantize carries them.

Apart from convert.py so the conversion's steps stay one screen each; it reads only the plan.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from rioquant.export.metadata import add_arch_metadata, general_metadata
from rioquant.export.vocab import Vocab, add_vocab, read_vocab, vocab_digest
from rioquant.quant.imatrix import Imatrix

if TYPE_CHECKING:
    from rioquant.convert import ConversionPlan


_VOCABS: OrderedDict[tuple[str, int, str | None], Vocab] = OrderedDict()  # least recently used first
VOCABS_KEPT = 4


def _read_vocab_cached(src: Path, vocab_size: int, pre_tokenizer: str | None) -> Vocab:
    """The tokenizer takes seconds to read; planning sizes and writing the file both need it, and every
    checkpoint of a family (a test suite's, a release's) has the same one: kept by content, not path."""
    key = (vocab_digest(src), vocab_size, pre_tokenizer)
    if key not in _VOCABS:
        _VOCABS[key] = read_vocab(src, vocab_size, pre_tokenizer)
        if len(_VOCABS) > VOCABS_KEPT:
            _VOCABS.popitem(last=False)
    _VOCABS.move_to_end(key)
    return _VOCABS[key]


def parameter_counts(plan: ConversionPlan) -> dict[str, int]:
    """Weights of the output: total, text model, MTP (NextN) layers, and those in expert stacks."""
    counts = {"total": 0, "text": 0, "mtp": 0, "experts": 0}
    for spec in plan.specs:
        n = int(np.prod(spec.shape, dtype=np.int64))
        counts["total"] += n
        counts["mtp" if spec.layer is not None and spec.layer >= plan.args.num_hidden_layers else "text"] += n
        counts["experts"] += n if spec.is_expert_stack else 0
    return counts


def imatrix_metadata(imatrix: Imatrix, given_as: str) -> dict:
    """The keys llama-quantize records (strings cut to 127 bytes as it does; chunks only when known)."""
    meta = {"file": given_as[:127], "dataset": imatrix.dataset[:127] if imatrix.datasets else None,
            "entries_count": len(imatrix.entries), "chunks_count": imatrix.chunk_count or None}
    return {k: v for k, v in meta.items() if v is not None}


def metadata_writer(plan: ConversionPlan, imatrix_meta: dict | None = None):
    if plan.source.carried is not None:
        return _carried_metadata_writer(plan, imatrix_meta)
    meta = plan.options.metadata
    vocab = _read_vocab_cached(plan.src, plan.args.vocab_size, meta.pre_tokenizer)
    n = parameter_counts(plan)
    general = general_metadata(plan.src, n["total"], n["total"] - n["experts"], n["experts"], plan.args.num_experts,
                               meta.base_models, meta.name)

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        general.set_gguf_meta_model(writer)
        if meta.quantized_by:
            writer.add_quantized_by(meta.quantized_by)
        add_arch_metadata(writer, plan.args, plan.n_mtp_layers)
        writer.add_file_type(plan.recipe.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_imatrix_metadata(writer, imatrix_meta)
        add_vocab(writer, vocab)

    return add


def _add_imatrix_metadata(writer: gguf.GGUFWriter, imatrix_meta: dict | None) -> None:
    for key, value in (imatrix_meta or {}).items():  # quantize.imatrix.*: strings and u32, as llama-quantize
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(f"quantize.imatrix.{key}", value)


def _carried_metadata_writer(plan: ConversionPlan, imatrix_meta: dict | None = None):
    """A GGUF source's keys as llama-quantize writes them: copied in order, then the quantization version
    and file type set again (appended), then the imatrix keys llama-quantize's tool adds."""
    def add(writer: gguf.GGUFWriter) -> None:
        plan.source.carried(writer)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(plan.recipe.file_type)
        _add_imatrix_metadata(writer, imatrix_meta)

    return add
