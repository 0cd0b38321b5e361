"""GGUF metadata of a text model: architecture keys as table rows that map a GGUF key ↔ a ModelArgs
field, and `general.*` with the lineage.

Each row of ARCH_KEYS says how its key is written from ModelArgs (and the NextN layer count) and how
the field is read back, so `convert` writes and the evaluator reads (`model_args_from_gguf`) through
the same rows: there is no second, hand-written reader. A new architecture adds its rows here.
`general.*` goes through gguf-py's Metadata, which reads the model card's YAML (base_model, license, …)
exactly as llama.cpp's converter does.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGUFValueType as V
from gguf import Keys

from rioquant.errors import CheckpointError
from rioquant.export.qwen35moe import ARCH, ModelArgs, default_layer_types
from rioquant.files.gguf_set import GGUFSet

REQUIRED = object()
Get = Callable[[str], object]  # another row's value, by key template (its default when absent)


@dataclass(frozen=True)
class ArchKey:
    """One key: `key` (gguf-py template) is written as `write(args, n_mtp)`; reading sets ModelArgs
    `field` to `read(value, get)`. A row without a field is written only (it repeats another's fact)."""

    key: str
    vtype: V
    write: Callable[[ModelArgs, int], object]
    field: str | None = None
    read: Callable[[object, Get], object] = lambda v, get: v
    default: object = REQUIRED  # the value read when the key is absent
    written: Callable[[int], bool] = lambda n_mtp: True  # whether the key is written, given n_mtp


_CAST: dict[V, Callable[[object], object]] = {V.UINT32: int, V.FLOAT32: float}


def _plain(key: str, field: str, vtype: V = V.UINT32, default: object = REQUIRED) -> ArchKey:
    """The common row: one ModelArgs field stored as is."""
    cast = _CAST[vtype]
    return ArchKey(key, vtype, lambda a, mtp: getattr(a, field), field, lambda v, get: cast(v), default)


def _n_layers(get: Get) -> int:
    """Decoder blocks: block_count counts the NextN blocks too."""
    return int(get(Keys.LLM.BLOCK_COUNT)) - int(get(Keys.LLM.NEXTN_PREDICT_LAYERS))  # type: ignore[call-overload]


def _layer_types(recurrent: object, get: Get) -> tuple[str, ...]:
    n_layers = _n_layers(get)
    if recurrent is None:  # older files: Qwen3.5's default layout
        return default_layer_types(n_layers, int(get(Keys.LLM.FULL_ATTENTION_INTERVAL)))  # type: ignore[call-overload]
    return tuple("linear_attention" if r else "full_attention" for r in list(recurrent)[:n_layers])  # type: ignore[call-overload]


# gguf 0.19 has no constant for this key yet (llama.cpp's newer gguf-py names it RECURRENT_LAYERS)
RECURRENT_LAYERS = "{arch}.attention.recurrent_layers"

# qwen35moe's keys, in the order written
ARCH_KEYS: tuple[ArchKey, ...] = (
    ArchKey(Keys.LLM.BLOCK_COUNT, V.UINT32, lambda a, mtp: a.num_hidden_layers + mtp, "num_hidden_layers",
            lambda v, get: _n_layers(get)),
    _plain(Keys.LLM.CONTEXT_LENGTH, "max_position_embeddings"),
    _plain(Keys.LLM.EMBEDDING_LENGTH, "hidden_size"),
    _plain(Keys.Attention.HEAD_COUNT, "num_attention_heads"),
    _plain(Keys.Attention.HEAD_COUNT_KV, "num_key_value_heads"),
    ArchKey(Keys.Rope.DIMENSION_SECTIONS, V.ARRAY, lambda a, mtp: [*a.mrope_section, 0, 0, 0, 0][:4], "mrope_section",
            lambda v, get: tuple(int(s) for s in v[:3])),  # type: ignore[index]
    _plain(Keys.Rope.FREQ_BASE, "rope_theta", V.FLOAT32),
    _plain(Keys.Attention.LAYERNORM_RMS_EPS, "rms_norm_eps", V.FLOAT32),
    _plain(Keys.LLM.EXPERT_COUNT, "num_experts"),
    _plain(Keys.LLM.EXPERT_USED_COUNT, "num_experts_per_tok"),
    _plain(Keys.Attention.KEY_LENGTH, "head_dim"),
    ArchKey(Keys.Attention.VALUE_LENGTH, V.UINT32, lambda a, mtp: a.head_dim),
    _plain(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, "moe_intermediate_size"),
    _plain(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, "shared_expert_intermediate_size", default=0),
    _plain(Keys.SSM.CONV_KERNEL, "linear_conv_kernel_dim"),
    _plain(Keys.SSM.STATE_SIZE, "linear_key_head_dim"),
    _plain(Keys.SSM.GROUP_COUNT, "linear_num_key_heads"),
    _plain(Keys.SSM.TIME_STEP_RANK, "linear_num_value_heads"),
    ArchKey(Keys.SSM.INNER_SIZE, V.UINT32, lambda a, mtp: a.value_dim, "linear_value_head_dim",
            lambda v, get: int(v) // int(get(Keys.SSM.TIME_STEP_RANK))),  # type: ignore[call-overload]
    _plain(Keys.LLM.FULL_ATTENTION_INTERVAL, "full_attention_interval", default=4),
    ArchKey(Keys.Rope.DIMENSION_COUNT, V.UINT32, lambda a, mtp: int(a.head_dim * a.partial_rotary_factor),
            "partial_rotary_factor", lambda v, get: int(v) / int(get(Keys.Attention.KEY_LENGTH))),  # type: ignore[call-overload]
    ArchKey(RECURRENT_LAYERS, V.ARRAY, lambda a, mtp: [t == "linear_attention" for t in a.layer_types] + [False] * mtp,
            "layer_types", _layer_types, default=None),
    ArchKey(Keys.LLM.NEXTN_PREDICT_LAYERS, V.UINT32, lambda a, mtp: mtp, "mtp_num_hidden_layers",
            lambda v, get: int(v), default=0, written=lambda mtp: mtp > 0),  # type: ignore[call-overload]
)


def add_arch_metadata(writer: gguf.GGUFWriter, a: ModelArgs, n_mtp_layers: int) -> None:
    for row in ARCH_KEYS:
        if not row.written(n_mtp_layers):
            continue
        value = row.write(a, n_mtp_layers)
        if row.vtype is V.ARRAY:
            writer.add_array(row.key.format(arch=ARCH), value)
        else:
            writer.add_key_value(row.key.format(arch=ARCH), value, row.vtype)


def model_args_from_gguf(meta: Mapping[str, object], where: Path, vocab_size: int, tied: bool) -> ModelArgs:
    """ModelArgs from a GGUF's metadata, through the rows that wrote it. The vocabulary size and tied
    embeddings are not keys: the caller reads them from the tensors (token_embd's rows, no output.weight)."""
    rows = {row.key: row for row in ARCH_KEYS}

    def get(key: str) -> object:
        row = rows[key]
        value = meta.get(key.format(arch=ARCH), row.default)
        if value is REQUIRED:
            raise CheckpointError(f"{where}: metadata {key.format(arch=ARCH)} missing")
        return value

    fields = {row.field: row.read(get(row.key), get) for row in ARCH_KEYS if row.field is not None}
    return ModelArgs(**fields, vocab_size=vocab_size, tie_word_embeddings=tied)  # type: ignore[arg-type]



def gguf_model_args(model: GGUFSet) -> ModelArgs:
    """ModelArgs of a GGUF model (the evaluator's and lineage's): its metadata rows, token_embd's rows
    for the vocabulary, and whether it has an output.weight (untied) or not (tied)."""
    embd = model.tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{model.path}: no token_embd.weight tensor")
    return model_args_from_gguf(model.meta, model.path, embd.shape[0], "output.weight" not in model.tensors)


def general_metadata(
    src: Path, total_params: int, shared_params: int, expert_params: int, expert_count: int,
    base_models: Sequence[str], name: str | None,
) -> gguf.Metadata:
    """`general.*` from the model card and config, plus the lineage the user names with --base-model.

    A merge's parents are often missing from its card; `base_models` ("org/repo" ids or URLs) replace
    the card's list when given, parsed by the same heuristic gguf-py applies to a card's base_model.
    """
    metadata = gguf.Metadata.load(None, src, name, total_params)
    if base_models:
        lineage = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), model_card={"base_model": list(base_models)})
        metadata.base_models = lineage.base_models
    if metadata.size_label is None and total_params > 0:
        metadata.size_label = gguf.size_label(total_params, shared_params, expert_params, expert_count)
    if metadata.name is None:
        metadata.name = src.name
    return metadata
