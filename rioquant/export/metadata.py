"""GGUF metadata for a qwen35moe text model: architecture keys, and `general.*` with the lineage.

Architecture keys are one table of (gguf-py key template, value from ModelArgs, GGUF value type) so the
whole header reads at a glance; `general.*` goes through gguf-py's Metadata, which reads the model
card's YAML (base_model, license, …) exactly as llama.cpp's converter does.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
from gguf import GGUFValueType as V
from gguf import Keys

from rioquant.export.qwen35moe import ModelArgs

ARCH = "qwen35moe"

ArchKey = tuple[str, Callable[[ModelArgs, int], object], V]

# (key template, value of (args, n_mtp_layers), type)
ARCH_KEYS: tuple[ArchKey, ...] = (
    (Keys.LLM.BLOCK_COUNT, lambda a, mtp: a.num_hidden_layers + mtp, V.UINT32),
    (Keys.LLM.CONTEXT_LENGTH, lambda a, mtp: a.max_position_embeddings, V.UINT32),
    (Keys.LLM.EMBEDDING_LENGTH, lambda a, mtp: a.hidden_size, V.UINT32),
    (Keys.Attention.HEAD_COUNT, lambda a, mtp: a.num_attention_heads, V.UINT32),
    (Keys.Attention.HEAD_COUNT_KV, lambda a, mtp: a.num_key_value_heads, V.UINT32),
    (Keys.Rope.DIMENSION_SECTIONS, lambda a, mtp: [*a.mrope_section, 0, 0, 0, 0][:4], V.ARRAY),
    (Keys.Rope.FREQ_BASE, lambda a, mtp: a.rope_theta, V.FLOAT32),
    (Keys.Attention.LAYERNORM_RMS_EPS, lambda a, mtp: a.rms_norm_eps, V.FLOAT32),
    (Keys.LLM.EXPERT_COUNT, lambda a, mtp: a.num_experts, V.UINT32),
    (Keys.LLM.EXPERT_USED_COUNT, lambda a, mtp: a.num_experts_per_tok, V.UINT32),
    (Keys.Attention.KEY_LENGTH, lambda a, mtp: a.head_dim, V.UINT32),
    (Keys.Attention.VALUE_LENGTH, lambda a, mtp: a.head_dim, V.UINT32),
    (Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, lambda a, mtp: a.moe_intermediate_size, V.UINT32),
    (Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, lambda a, mtp: a.shared_expert_intermediate_size, V.UINT32),
    (Keys.SSM.CONV_KERNEL, lambda a, mtp: a.linear_conv_kernel_dim, V.UINT32),
    (Keys.SSM.STATE_SIZE, lambda a, mtp: a.linear_key_head_dim, V.UINT32),
    (Keys.SSM.GROUP_COUNT, lambda a, mtp: a.linear_num_key_heads, V.UINT32),
    (Keys.SSM.TIME_STEP_RANK, lambda a, mtp: a.linear_num_value_heads, V.UINT32),
    (Keys.SSM.INNER_SIZE, lambda a, mtp: a.value_dim, V.UINT32),
    (Keys.LLM.FULL_ATTENTION_INTERVAL, lambda a, mtp: a.full_attention_interval, V.UINT32),
    (Keys.Rope.DIMENSION_COUNT, lambda a, mtp: int(a.head_dim * a.partial_rotary_factor), V.UINT32),
)
# gguf 0.19 has no constant for this key yet (llama.cpp's newer gguf-py names it RECURRENT_LAYERS)
RECURRENT_LAYERS_KEY: ArchKey = (
    "{arch}.attention.recurrent_layers",
    lambda a, mtp: [t == "linear_attention" for t in a.layer_types] + [False] * mtp,
    V.ARRAY,
)
NEXTN_KEY: ArchKey = (Keys.LLM.NEXTN_PREDICT_LAYERS, lambda a, mtp: mtp, V.UINT32)


def add_arch_metadata(writer: gguf.GGUFWriter, a: ModelArgs, n_mtp_layers: int) -> None:
    keys = ARCH_KEYS + (RECURRENT_LAYERS_KEY,) + ((NEXTN_KEY,) if n_mtp_layers else ())
    for template, value, vtype in keys:
        v = value(a, n_mtp_layers)
        if vtype is V.ARRAY:
            writer.add_array(template.format(arch=ARCH), v)
        else:
            writer.add_key_value(template.format(arch=ARCH), v, vtype)


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
