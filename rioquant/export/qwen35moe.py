"""Qwen3.5-MoE (HF `qwen3_5_moe`) → llama.cpp `qwen35moe`: every fact about the architecture in one place.

Its names (ARCH, MODEL_TYPES), hyper-parameters (ModelArgs from config.json), block layout (linear or
full attention), which tensors stay F32, the name patterns rioquant's mixes use, the transforms and the
tensor table; its GGUF metadata rows are in export/metadata.py. The tables are the whole mapping;
`tensor_specs` walks them to produce the GGUF tensor list (names, shapes, where each piece of data
comes from, which transform applies) from the headers alone.
Names come from gguf-py's TENSOR_NAMES so there is no second spelling of them here; NEXTN (MTP) names
exist in gguf-py but are not listed for QWEN35MOE in gguf 0.19, which is why we map by MODEL_TENSOR
and not through `get_tensor_name_map`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES

from rioquant.errors import CheckpointError
from rioquant.export.checkpoint import SourceTensor
from rioquant.export.tensor_map import Piece, SourceNames, TensorRule, TensorSpec, gguf_name

M = MODEL_TENSOR

ARCH = "qwen35moe"  # llama.cpp's general.architecture
MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")  # Hugging Face config.json model_type

# Substrings of the names llama.cpp never quantizes for this architecture (tensor_allows_quantization;
# the converter keeps them F32): norms, the routers and the linear-attention conv kernel.
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d")

# Tensor-name patterns (regexes searched in GGUF names) that rioquant's mixes for this architecture
# name (rioquant.quant.recipes XL mixes, docs/recipes.md).
ATTENTION = r"\.attn_(q|k|v|output|qkv|gate)\.weight$"  # full attention and the linear-attention projections
SSM_GATES = r"\.ssm_(alpha|beta)\.weight$"  # the 64-row decay/beta projections: tiny, kept with attention
SSM_OUT = r"\.ssm_out\.weight$"  # the worst tensor to quantize in Unsloth's Qwen3.5 study, and small
SHARED_EXPERT = r"_shexp\.weight$"  # used by every token
MTP_PROJ = r"nextn\.eh_proj\.weight$"  # the MTP block's input projection
DOWN_EXPS = r"ffn_down_exps\.weight$"


def default_layer_types(n_layers: int, full_attention_interval: int) -> tuple[str, ...]:
    """Qwen3.5's layout when config.json (or the GGUF) lists none: every interval-th block is full attention."""
    return tuple("full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                 for i in range(n_layers))


@dataclass(frozen=True)
class ModelArgs:
    """The text model's hyper-parameters, read from config.json (top level or `text_config`)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, ...]
    full_attention_interval: int
    layer_types: tuple[str, ...]
    mtp_num_hidden_layers: int
    tie_word_embeddings: bool

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


# ModelArgs fields config.json holds as they are (integers, required)
CONFIG_INTS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "vocab_size", "max_position_embeddings",
)


def model_args(config: dict, source: str) -> ModelArgs:
    """Build ModelArgs from a parsed config.json; `source` names the file in errors."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (rioquant converts qwen3_5_moe)")
    text = config.get("text_config", config)
    rope = {**text.get("rope_parameters", {}), **{k: text[k] for k in ("rope_theta", "partial_rotary_factor") if k in text}}
    try:
        n_layers = int(text["num_hidden_layers"])
        interval = int(text.get("full_attention_interval", 4))
        layer_types = tuple(text.get("layer_types") or default_layer_types(n_layers, interval))
        return ModelArgs(
            **{name: int(text[name]) for name in CONFIG_INTS},
            num_hidden_layers=n_layers,
            head_dim=int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]),
            rms_norm_eps=float(text["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.25)),
            mrope_section=tuple(int(v) for v in rope.get("mrope_section", (11, 11, 10))),
            full_attention_interval=interval,
            layer_types=layer_types,
            mtp_num_hidden_layers=int(text.get("mtp_num_hidden_layers", 0)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )
    except KeyError as err:
        raise CheckpointError(f"{source}: config is missing {err.args[0]!r}") from None


# ---------------------------------------------------------------------------------------------
# Transforms: small named functions of (float32 array, args). Names are recorded in the plan.

def _tile_v_heads(x: np.ndarray, axis: int, a: ModelArgs, head_dim: int) -> np.ndarray:
    """V heads grouped by K head → tiled order, along `axis` (what ggml's broadcast expects)."""
    r = a.linear_num_value_heads // a.linear_num_key_heads
    if r == 1:
        return x
    moved = np.moveaxis(x, axis, 0)
    rest = moved.shape[1:]
    grouped = moved.reshape(a.linear_num_key_heads, r, head_dim, *rest)  # (num_k, r, d, ...)
    tiled = grouped.swapaxes(0, 1).reshape(moved.shape)  # (r, num_k, d, ...) flattened
    return np.ascontiguousarray(np.moveaxis(tiled, 0, axis))


def plus_one(x: np.ndarray, a: ModelArgs) -> np.ndarray:
    """Qwen3.5 RMSNorm computes x·(1+w); llama.cpp multiplies by the stored weight."""
    return x + np.float32(1.0)


def qkv_tile_v(x: np.ndarray, a: ModelArgs) -> np.ndarray:
    qk = 2 * a.key_dim
    return np.concatenate([x[:qk], _tile_v_heads(x[qk:], 0, a, a.linear_value_head_dim)])


def rows_tile_v(x: np.ndarray, a: ModelArgs) -> np.ndarray:
    return _tile_v_heads(x, 0, a, a.linear_value_head_dim)


def heads_tile_v(x: np.ndarray, a: ModelArgs) -> np.ndarray:
    return _tile_v_heads(x, 0, a, 1)


def conv_squeeze_tile_v(x: np.ndarray, a: ModelArgs) -> np.ndarray:
    x = x.reshape(x.shape[0], x.shape[-1])  # (conv_dim, 1, K) → (conv_dim, K)
    return qkv_tile_v(x, a)


def a_log_to_a(x: np.ndarray, a: ModelArgs) -> np.ndarray:
    """ggml's delta-net takes A = -exp(A_log) directly.

    torch's float32 exp, not numpy's: the two differ in the last ulp on some inputs, and llama.cpp's
    converter (the reference our F32/F16 output must equal) computes it with torch (imported here, so
    the recipes can read this module's facts without loading torch).
    """
    import torch

    return -torch.exp(torch.from_numpy(heads_tile_v(x, a))).numpy()


def cols_tile_v(x: np.ndarray, a: ModelArgs) -> np.ndarray:
    return _tile_v_heads(x, 1, a, a.linear_value_head_dim)


TRANSFORMS: dict[str, Callable[[np.ndarray, ModelArgs], np.ndarray]] = {
    f.__name__: f for f in (plus_one, qkv_tile_v, rows_tile_v, heads_tile_v, conv_squeeze_tile_v, a_log_to_a, cols_tile_v)
}

# ---------------------------------------------------------------------------------------------
# Tables. Shapes are HF (torch) shapes as functions of ModelArgs; GGUF numpy shape = transform output.

LAYER_RULES: tuple[TensorRule, ...] = (
    TensorRule("input_layernorm.weight", M.ATTN_NORM, ".weight", lambda a: (a.hidden_size,), "plus_one"),
    TensorRule("post_attention_layernorm.weight", M.ATTN_POST_NORM, ".weight", lambda a: (a.hidden_size,), "plus_one"),
    # gated full attention: q_proj holds query and gate interleaved per head
    TensorRule("self_attn.q_proj.weight", M.ATTN_Q, ".weight", lambda a: (2 * a.num_attention_heads * a.head_dim, a.hidden_size)),
    TensorRule("self_attn.k_proj.weight", M.ATTN_K, ".weight", lambda a: (a.num_key_value_heads * a.head_dim, a.hidden_size)),
    TensorRule("self_attn.v_proj.weight", M.ATTN_V, ".weight", lambda a: (a.num_key_value_heads * a.head_dim, a.hidden_size)),
    TensorRule("self_attn.o_proj.weight", M.ATTN_OUT, ".weight", lambda a: (a.hidden_size, a.num_attention_heads * a.head_dim)),
    TensorRule("self_attn.q_norm.weight", M.ATTN_Q_NORM, ".weight", lambda a: (a.head_dim,), "plus_one"),
    TensorRule("self_attn.k_norm.weight", M.ATTN_K_NORM, ".weight", lambda a: (a.head_dim,), "plus_one"),
    # Gated DeltaNet linear attention (V heads reordered to tiled order)
    TensorRule("linear_attn.in_proj_qkv.weight", M.ATTN_QKV, ".weight", lambda a: (a.conv_dim, a.hidden_size), "qkv_tile_v"),
    TensorRule("linear_attn.in_proj_z.weight", M.ATTN_GATE, ".weight", lambda a: (a.value_dim, a.hidden_size), "rows_tile_v"),
    TensorRule("linear_attn.in_proj_b.weight", M.SSM_BETA, ".weight", lambda a: (a.linear_num_value_heads, a.hidden_size), "heads_tile_v"),
    TensorRule("linear_attn.in_proj_a.weight", M.SSM_ALPHA, ".weight", lambda a: (a.linear_num_value_heads, a.hidden_size), "heads_tile_v"),
    TensorRule("linear_attn.conv1d.weight", M.SSM_CONV1D, ".weight", lambda a: (a.conv_dim, 1, a.linear_conv_kernel_dim), "conv_squeeze_tile_v"),
    TensorRule("linear_attn.dt_bias", M.SSM_DT, ".bias", lambda a: (a.linear_num_value_heads,), "heads_tile_v"),
    TensorRule("linear_attn.A_log", M.SSM_A, "", lambda a: (a.linear_num_value_heads,), "a_log_to_a"),
    TensorRule("linear_attn.norm.weight", M.SSM_NORM, ".weight", lambda a: (a.linear_value_head_dim,)),  # plain weight: no +1
    TensorRule("linear_attn.out_proj.weight", M.SSM_OUT, ".weight", lambda a: (a.hidden_size, a.value_dim), "cols_tile_v"),
    # MoE router and shared expert
    TensorRule("mlp.gate.weight", M.FFN_GATE_INP, ".weight", lambda a: (a.num_experts, a.hidden_size)),
    TensorRule("mlp.shared_expert_gate.weight", M.FFN_GATE_INP_SHEXP, ".weight", lambda a: (1, a.hidden_size)),
    TensorRule("mlp.shared_expert.gate_proj.weight", M.FFN_GATE_SHEXP, ".weight", lambda a: (a.shared_expert_intermediate_size, a.hidden_size)),
    TensorRule("mlp.shared_expert.up_proj.weight", M.FFN_UP_SHEXP, ".weight", lambda a: (a.shared_expert_intermediate_size, a.hidden_size)),
    TensorRule("mlp.shared_expert.down_proj.weight", M.FFN_DOWN_SHEXP, ".weight", lambda a: (a.hidden_size, a.shared_expert_intermediate_size)),
)

# MTP head tensors outside `mtp.layers.*`, written into the NextN block (index n_layers + 0)
MTP_RULES: tuple[TensorRule, ...] = (
    TensorRule("mtp.fc.weight", M.NEXTN_EH_PROJ, ".weight", lambda a: (a.hidden_size, 2 * a.hidden_size)),
    TensorRule("mtp.pre_fc_norm_embedding.weight", M.NEXTN_ENORM, ".weight", lambda a: (a.hidden_size,), "plus_one"),
    TensorRule("mtp.pre_fc_norm_hidden.weight", M.NEXTN_HNORM, ".weight", lambda a: (a.hidden_size,), "plus_one"),
    TensorRule("mtp.norm.weight", M.NEXTN_SHARED_HEAD_NORM, ".weight", lambda a: (a.hidden_size,), "plus_one"),
)

TOP_RULES: tuple[TensorRule, ...] = (
    TensorRule("embed_tokens.weight", M.TOKEN_EMBD, ".weight", lambda a: (a.vocab_size, a.hidden_size)),
    TensorRule("norm.weight", M.OUTPUT_NORM, ".weight", lambda a: (a.hidden_size,), "plus_one"),
)
OUTPUT_RULE = TensorRule("lm_head.weight", M.OUTPUT, ".weight", lambda a: (a.vocab_size, a.hidden_size))

# (GGUF expert tensor, per-expert HF projection, half of fused gate_up_proj or None for down_proj)
EXPERT_RULES: tuple[tuple[MODEL_TENSOR, str, int | None], ...] = (
    (M.FFN_GATE_EXP, "gate_proj", 0),
    (M.FFN_UP_EXP, "up_proj", 1),
    (M.FFN_DOWN_EXP, "down_proj", None),
)


def _gguf_shape(rule: TensorRule, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.transform == "conv_squeeze_tile_v":
        return (hf_shape[0], hf_shape[2])
    return hf_shape


def is_linear_block(a: ModelArgs, layer: int) -> bool:
    """Whether block `layer` is Gated DeltaNet linear attention (the NextN block is full attention)."""
    return layer < a.num_hidden_layers and a.layer_types[layer] == "linear_attention"


def _layer_specs(ns: SourceNames, a: ModelArgs, hf_prefix: str, layer: int) -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    linear = is_linear_block(a, layer)
    for rule in LAYER_RULES:
        if rule.hf.startswith("linear_attn." if not linear else "self_attn."):
            continue
        tensor = ns.take(hf_prefix + rule.hf, rule.shape(a))
        specs.append(TensorSpec(gguf_name(rule, layer), _gguf_shape(rule, tensor.shape), (Piece(tensor),), rule.transform, layer))
    specs.extend(_expert_specs(ns, a, hf_prefix, layer))
    return specs


def _expert_specs(ns: SourceNames, a: ModelArgs, hf_prefix: str, layer: int) -> list[TensorSpec]:
    """Expert stacks [E, rows, cols] from either on-disk layout, one piece per expert slab."""
    E, I, Hd = a.num_experts, a.moe_intermediate_size, a.hidden_size
    fused = ns.has(hf_prefix + "mlp.experts.gate_up_proj")
    specs = []
    for expert_tensor, proj, half in EXPERT_RULES:
        rows, cols = (Hd, I) if proj == "down_proj" else (I, Hd)
        if fused:
            if half is None:
                src = ns.take(hf_prefix + "mlp.experts.down_proj", (E, Hd, I))
                pieces = tuple(Piece(src, e) for e in range(E))
            else:
                src = ns.take(hf_prefix + "mlp.experts.gate_up_proj", (E, 2 * I, Hd))
                pieces = tuple(Piece(src, e, (half * I, (half + 1) * I)) for e in range(E))
        else:
            pieces = tuple(
                Piece(ns.take(f"{hf_prefix}mlp.experts.{e}.{proj}.weight", (rows, cols))) for e in range(E)
            )
        name = TENSOR_NAMES[expert_tensor].format(bid=layer) + ".weight"
        specs.append(TensorSpec(name, (E, rows, cols), pieces, None, layer))
    return specs


def tensor_specs(tensors: dict[str, SourceTensor], a: ModelArgs, with_mtp: bool) -> list[TensorSpec]:
    """The GGUF tensor list in llama.cpp's order, from headers only; unknown source tensors are errors."""
    ns = SourceNames(tensors)
    specs: list[TensorSpec] = []
    for rule in TOP_RULES:
        tensor = ns.take(rule.hf, rule.shape(a))
        specs.append(TensorSpec(gguf_name(rule, None), tensor.shape, (Piece(tensor),), rule.transform, None))
    if ns.has(OUTPUT_RULE.hf) or not a.tie_word_embeddings:
        tensor = ns.take(OUTPUT_RULE.hf, OUTPUT_RULE.shape(a))
        specs.append(TensorSpec(gguf_name(OUTPUT_RULE, None), tensor.shape, (Piece(tensor),), None, None))
    for layer in range(a.num_hidden_layers):
        specs.extend(_layer_specs(ns, a, f"layers.{layer}.", layer))
    has_mtp = any(name.startswith("mtp.") for name in ns.by_name)
    if with_mtp and has_mtp:
        for i in range(max(a.mtp_num_hidden_layers, 1)):
            layer = a.num_hidden_layers + i
            specs.extend(_layer_specs(ns, a, f"mtp.layers.{i}.", layer))
            for rule in MTP_RULES:
                tensor = ns.take(rule.hf, rule.shape(a))
                specs.append(TensorSpec(gguf_name(rule, layer), tensor.shape, (Piece(tensor),), rule.transform, layer))
    ignored = {n for n in ns.by_name if n.startswith("mtp.")} if not (with_mtp and has_mtp) else set()
    unknown = sorted(set(ns.by_name) - ns.used - ignored)
    if unknown:
        raise CheckpointError(f"{ns.by_name[unknown[0]].file.name}: unexpected tensor {ns.by_name[unknown[0]].name}")
    return specs


def config_tensors(a: ModelArgs, config_path: Path) -> dict[str, SourceTensor]:
    """The source tensors config.json implies (fused experts, BF16), for planning without the weights.

    Walks the same tables as `tensor_specs`, so a plan from config.json alone has exactly the tensors
    and shapes of a plan from the real headers. The tensors point at config.json and hold no data:
    only `rioquant plan` uses them; `convert` always reads the safetensors headers.
    """
    def source(name: str, shape: tuple[int, ...]) -> tuple[str, SourceTensor]:
        return name, SourceTensor(name, config_path, "BF16", shape, 0)

    E, I, H = a.num_experts, a.moe_intermediate_size, a.hidden_size
    experts = (("mlp.experts.gate_up_proj", (E, 2 * I, H)), ("mlp.experts.down_proj", (E, H, I)))
    tensors = dict(source("model." + r.hf, r.shape(a)) for r in TOP_RULES)
    if not a.tie_word_embeddings:
        tensors |= dict([source(OUTPUT_RULE.hf, OUTPUT_RULE.shape(a))])
    n_mtp = a.mtp_num_hidden_layers
    prefixes = [f"model.layers.{i}." for i in range(a.num_hidden_layers)] + [f"mtp.layers.{i}." for i in range(n_mtp)]
    for layer, prefix in enumerate(prefixes):
        skip = "self_attn." if is_linear_block(a, layer) else "linear_attn."
        tensors |= dict(source(prefix + r.hf, r.shape(a)) for r in LAYER_RULES if not r.hf.startswith(skip))
        tensors |= dict(source(prefix + name, shape) for name, shape in experts)
    if n_mtp:
        tensors |= dict(source(r.hf, r.shape(a)) for r in MTP_RULES)
    return tensors


def load_tensor(spec: TensorSpec, a: ModelArgs, read: Callable[[SourceTensor, int | None], np.ndarray]) -> np.ndarray:
    """The whole transformed tensor as float32 (non-expert tensors only; experts go piece by piece)."""
    (piece,) = spec.pieces
    values = read(piece.source, piece.index)
    return TRANSFORMS[spec.transform](values, a) if spec.transform else values


# Transforms that only reorder rows: a sampled row keeps its values, so samples skip them.
ROW_ORDER_TRANSFORMS = frozenset({"qkv_tile_v", "rows_tile_v", "heads_tile_v"})


def load_rows(
    spec: TensorSpec, a: ModelArgs, expert: int | None, rows: list[int],
    read_rows: Callable[[SourceTensor, int | None, list[int]], np.ndarray],
) -> np.ndarray:
    """Some rows of a tensor (of one expert's slab for an expert stack) as float32, for error sampling.

    Rows are read straight from the source: the V-head reorders only permute rows, so the sample is a
    set of the tensor's rows, though not the GGUF rows with those indices; a column transform
    (`cols_tile_v`) is applied to the rows read, so each sampled row is exactly a row of the GGUF tensor.
    """
    piece = spec.pieces[expert if expert is not None else 0]
    offset = piece.rows[0] if piece.rows else 0
    values = read_rows(piece.source, piece.index, [offset + r for r in rows])
    if spec.transform and spec.transform not in ROW_ORDER_TRANSFORMS:
        values = TRANSFORMS[spec.transform](values, a)
    return values
