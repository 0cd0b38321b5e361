"""`rioquant fit`: which mix runs in this much memory, at what context — and `plan`'s memory breakdown.

For every mix in the recipe table the plan gives the exact tensor bytes and file layout; from those,
rioquant.quant.memory gives what llama.cpp allocates to run it (weights it loads, KV cache,
recurrent state, output and compute buffers). SRC is a checkpoint, a directory with only config.json
and the tokenizer, or a GGUF (whose tensors are re-planned at each mix, as llama-quantize would
requantize them; the file itself is measured too).

"Best" is the highest quality that fits, from the recipe table's bits: a mix ranks by its bits per
weight on this model, except that a rioquant dynamic mix ranks with the llama.cpp mix it stands in
for (same `general.file_type`, e.g. Q4_K_XL with Q4_K_M) and just above it — each is no larger than the
llama.cpp mix it replaces (that one, or for IQ1_XL the next one up, IQ2_XXS) and is measured against
llama.cpp's frontier on the nano model (docs/recipes.md, docs/fidelity.md). Bits above 16 rank as 16:
wider than the checkpoint's BF16 buys nothing, so F32 never beats the smaller BF16/F16. The legacy
mixes (Q4_0, Q4_1, Q5_0, Q5_1: one scale or scale+min per 32 weights) come after every other mix that
fits: llama.cpp keeps them for old runtimes, and a K- or i-quant mix of the same size is better.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

from rioquant.convert import ConversionPlan, ConvertOptions, build_plan, model_facts, planned_sizes
from rioquant.errors import PlanError
from rioquant.export.gguf_out import OutputTensor, layout_writer
from rioquant.export.qwen35moe import KEEP_F32, ModelArgs
from rioquant.files.gguf_file import align_up
from rioquant.files.gguf_set import GGUFSet, open_set
from rioquant.quant.memory import (
    LlamaShape,
    MemoryBreakdown,
    RunSettings,
    breakdown,
    is_trunk_tensor,
    loaded_weight_bytes,
    max_context,
)
from rioquant.quant.plan import recipe_entries
from rioquant.quant.recipes import RECIPES
from rioquant.quant.rules import ModelFacts, Recipe
from rioquant.quant.types import LEGACY_TYPES

T = GGMLQuantizationType
MAX_USEFUL_BITS = 16.0  # the checkpoint's own BF16


@dataclass(frozen=True)
class MixSize:
    """One mix of one model: its file, the bytes llama.cpp loads from it, its bits per weight."""

    mix: str
    file_bytes: int
    weights: int
    bpw: float


def shape_from_args(args: ModelArgs) -> LlamaShape:
    """llama.cpp's hparams from config.json, as the converter writes them (rioquant.export.metadata)."""
    return LlamaShape(
        n_layer=args.num_hidden_layers,
        recurrent=tuple(t == "linear_attention" for t in args.layer_types),
        n_embd=args.hidden_size, n_head_kv=args.num_key_value_heads, head_dim=args.head_dim,
        ssm_d_conv=args.linear_conv_kernel_dim, ssm_d_inner=args.value_dim, ssm_d_state=args.linear_key_head_dim,
        ssm_n_group=args.linear_num_key_heads, n_vocab=args.vocab_size, n_ctx_train=args.max_position_embeddings,
    )


def shape_from_gguf(gguf: GGUFSet) -> LlamaShape:
    """llama.cpp's hparams from a qwen35moe GGUF's metadata, read as its loader reads them."""
    arch = gguf.get("general.architecture")
    if arch != "qwen35moe":
        raise PlanError(f"{gguf.path}: architecture {arch!r}; rioquant fit sizes qwen35moe models")

    def key(name: str, default: object = None) -> object:
        value = gguf.get(f"{arch}.{name}", default)
        if value is None:
            raise PlanError(f"{gguf.path}: metadata {arch}.{name} is missing")
        return value

    n_layer = int(key("block_count")) - int(key("nextn_predict_layers", 0))
    flags = gguf.get(f"{arch}.attention.recurrent_layers")
    interval = int(key("full_attention_interval", 4))
    recurrent = tuple(bool(f) for f in flags)[:n_layer] if flags is not None else \
        tuple((i + 1) % interval != 0 for i in range(n_layer))
    return LlamaShape(
        n_layer=n_layer, recurrent=recurrent, n_embd=int(key("embedding_length")),
        n_head_kv=int(key("attention.head_count_kv")), head_dim=int(key("attention.key_length")),
        ssm_d_conv=int(key("ssm.conv_kernel")), ssm_d_inner=int(key("ssm.inner_size")),
        ssm_d_state=int(key("ssm.state_size")), ssm_n_group=int(key("ssm.group_count")),
        n_vocab=len(gguf.get("tokenizer.ggml.tokens", ())), n_ctx_train=int(key("context_length")),
    )


def plan_weights(plan: ConversionPlan) -> int:
    """The bytes llama.cpp loads from the plan's file (or split set), MTP block left out."""
    tensors = [OutputTensor(e.name, e.shape, T[e.qtype], e.nbytes) for e in plan.entries]
    writer = layout_writer(Path("plan.gguf"), tensors, lambda _: None, plan.options.split)
    files = [[(name, info.nbytes) for name, info in shard.items()] for shard in writer.tensors]
    return loaded_weight_bytes(files, is_trunk_tensor(plan.args.num_hidden_layers), writer.data_alignment)


def plan_memory(plan: ConversionPlan, settings: RunSettings) -> dict:
    """`rioquant plan`'s memory section: the breakdown at the settings, and the context limit is for fit."""
    shape = shape_from_args(plan.args)
    return _report(breakdown(shape, plan_weights(plan), settings), settings)


def _report(memory: MemoryBreakdown, settings: RunSettings) -> dict:
    return {"settings": asdict(settings), **asdict(memory), "total": memory.total}


def _mixes(tensors: list[tuple[str, tuple[int, ...]]], facts: ModelFacts, header_bytes: int, n_layer: int,
           alignment: int = 32) -> list[MixSize]:
    """Every mix of the table for these tensors (GGUF names, numpy shapes, file order), in one file."""
    n_params = sum(math.prod(shape) for _, shape in tensors)
    loaded = is_trunk_tensor(n_layer)
    sizes = []
    for name, recipe in RECIPES.items():
        entries = recipe_entries(tensors, recipe, facts)
        weights = loaded_weight_bytes([[(e.name, e.nbytes) for e in entries]], loaded, alignment)
        sizes.append(MixSize(name, header_bytes + sum(align_up(e.nbytes, alignment) for e in entries), weights,
                             8 * sum(e.nbytes for e in entries) / n_params))
    return sizes


def _checkpoint_mixes(src: Path) -> tuple[LlamaShape, list[MixSize]]:
    """Every mix of a checkpoint (or config-only directory), as `convert` would write it (one file).

    The plan is built once; its header (metadata, vocabulary, tensor infos) is the same size for
    every mix, which differ only in general.file_type's value and the tensor types."""
    plan = build_plan(src, ConvertOptions(qtype=next(iter(RECIPES))), weights_optional=True)
    header = sum(planned_sizes(plan)) - sum(align_up(e.nbytes, GGUF_DEFAULT_ALIGNMENT) for e in plan.entries)
    args = plan.args
    facts = model_facts(args, plan.n_mtp_layers, has_imatrix=True)  # as published: the i-quants need one
    tensors = [(e.name, e.shape) for e in plan.entries]
    return shape_from_args(args), _mixes(tensors, facts, header, args.num_hidden_layers)


def _gguf_mixes(gguf: GGUFSet, shape: LlamaShape) -> list[MixSize]:
    """Every mix of the GGUF's tensors, laid out in one file after the source's own header."""
    arch = gguf.get("general.architecture")
    facts = ModelFacts(
        n_expert=int(gguf.get(f"{arch}.expert_count", 0)),
        n_gqa=int(gguf.get(f"{arch}.attention.head_count", 0)) // max(1, shape.n_head_kv),
        n_blocks=int(gguf.get(f"{arch}.block_count", shape.n_layer)),
        keep_f32=KEEP_F32,
        has_imatrix=True,
    )
    tensors = [(t.name, t.shape) for h in gguf.headers for t in h.tensors]
    alignment = gguf.first.alignment
    return _mixes(tensors, facts, align_up(gguf.first.data_offset, alignment), shape.n_layer, alignment)


def _gguf_itself(gguf: GGUFSet, shape: LlamaShape) -> MixSize:
    files = [[(t.name, t.nbytes) for t in h.tensors] for h in gguf.headers]
    weights = loaded_weight_bytes(files, is_trunk_tensor(shape.n_layer), gguf.first.alignment)
    return MixSize(gguf.path.name, gguf.size, weights, gguf.bits_per_weight)


def quality_order(sizes: list[MixSize]) -> list[MixSize]:
    """Best first (see the module docstring): bits of the mix or of the llama.cpp mix it stands in for."""
    bpw = {s.mix: s.bpw for s in sizes}
    index = {name: i for i, name in enumerate(RECIPES)}

    def key(size: MixSize):
        recipe: Recipe = RECIPES[size.mix]
        stand_in = next((r.name for r in RECIPES.values() if r.source == "llama.cpp" and r.file_type == recipe.file_type),
                        None) if recipe.source == "rioquant" else None
        bits = min(bpw.get(stand_in, size.bpw), MAX_USEFUL_BITS)
        legacy = T[recipe.default] in LEGACY_TYPES
        return (legacy, -bits, stand_in is None, size.file_bytes, index[size.mix])

    return sorted(sizes, key=key)


def _entry(size: MixSize, shape: LlamaShape, settings: RunSettings, memory: int) -> dict:
    need = breakdown(shape, size.weights, settings)
    return {
        "mix": size.mix, "file_bytes": size.file_bytes, "bpw": size.bpw, "memory_bytes": need.total,
        "headroom_bytes": memory - need.total, "max_ctx": max_context(shape, size.weights, settings, memory),
        "breakdown": _report(need, settings),
    }


def model_mixes(src: Path) -> tuple[LlamaShape, list[MixSize], MixSize | None]:
    """The model's shape, every mix's sizes, and (for a GGUF) the file itself."""
    src = Path(src)
    if src.is_file():
        gguf = open_set(src)
        shape = shape_from_gguf(gguf)
        return shape, _gguf_mixes(gguf, shape), _gguf_itself(gguf, shape)
    return (*_checkpoint_mixes(src), None)


def rank(shape: LlamaShape, sizes: list[MixSize], memory: int, settings: RunSettings,
         source_file: MixSize | None = None) -> dict:
    """The mixes that run in `memory` bytes at the settings' context, best first, each with the largest
    context it allows; `too_big` lists the others, smallest need first."""
    entries = [_entry(s, shape, settings, memory) for s in quality_order(sizes)]
    return {
        "memory": memory, "settings": asdict(settings),
        "fits": [e for e in entries if e["headroom_bytes"] >= 0],
        "too_big": sorted((e for e in entries if e["headroom_bytes"] < 0), key=lambda e: e["memory_bytes"]),
        "source_file": source_file and _entry(source_file, shape, settings, memory),
    }


def fit(src: Path, memory: int, settings: RunSettings) -> dict:
    """`rioquant fit` as data (`--json`): SRC's mixes ranked for `memory` bytes at the settings."""
    shape, sizes, source_file = model_mixes(src)
    return {"source": str(src), **rank(shape, sizes, memory, settings, source_file)}
