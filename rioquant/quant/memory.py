"""The memory llama.cpp needs to run a qwen35moe GGUF: weights, KV cache, recurrent state, buffers.

Each term is llama.cpp's own arithmetic (the pinned 0.3.36 sources), so the first three equal, byte
for byte, what llama.cpp allocates on the CPU backend (tests/test_fit.py checks them against
`llama_get_memory_breakdown`; CUDA pads each weight to 128 bytes and quantized rows to 512 elements,
well under a MB on the 397B):

- Weights: llama.cpp maps each file of the model and hands the backend the range from the first
  loaded tensor's data to the end of the last one (`get_mapping_range`). The MTP (NextN) block is in
  the file but not loaded unless the context asks for MTP drafting (`load_mtp`, off by default): it
  is written last, so it falls outside that range.
- KV cache: only the full-attention blocks of the trunk hold one (the hybrid memory's attention
  filter `il < n_layer && !is_recr(il)`). The context is padded to 256 cells; with P sequences and a
  per-sequence cache (`kv_unified` off, llama.cpp's default) each of the P streams holds
  pad(pad(n_ctx, 256) / P, 256) cells. K and V are rows of n_embd_k_gqa = n_embd_v_gqa =
  head_dim × n_head_kv elements, stored in the cache type's blocks.
- Recurrent state (llama-memory-recurrent.cpp): every Gated DeltaNet block keeps, per sequence, an
  F32 conv state of n_embd_r = (d_conv - 1) × (d_inner + 2 × n_group × d_state) and an F32 delta
  state of n_embd_s = d_state × d_inner (hparams n_embd_r()/n_embd_s()).
- Output buffer: the logits of one token per sequence, F32 (`output_reserve(n_seq_max)`).
- Compute buffer: the peak of ggml-alloc's plan for the worst-case batch, T = min(n_ctx, n_ubatch)
  tokens all asking for logits. For Qwen3.5 shapes the peak is the LM head: the logits
  [n_vocab, T] F32 alive with about five hidden-state-sized F32 tensors [n_embd, T] (the last
  block's residual and output, the final norm, the rows selected for output). Fitted on the tiny
  test models (within 0.2 %) and checked on the 397B's shapes (llama.cpp's `no_alloc` reservation, ctx
  256 to 262144): within 3.1 %
  (tests/test_fit.py holds it within 10 %). Flash attention is assumed, as llama.cpp's `auto`
  resolves on CPU, CUDA and Metal: without it the attention scores [n_kv, T, n_head] would dominate.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rioquant.errors import PlanError
from rioquant.files.gguf_file import align_up, block_index, nbytes

T = GGMLQuantizationType

CTX_PAD = 256  # llama_context pads n_ctx (and n_ctx_seq) to a multiple of this
N_UBATCH = 512  # llama.cpp's default physical batch
BUFFER_ALIGNMENT = 32  # ggml's CPU buffer alignment (TENSOR_ALIGNMENT); each cache tensor is padded to it
HEAD_HIDDEN_TENSORS = 5  # hidden-state-sized F32 tensors alive beside the logits at the compute peak
CACHE_TYPES = ("f16", "q8_0")  # --cache-type: llama.cpp's -ctk/-ctv names


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters llama.cpp sizes its buffers from, by llama.cpp's names."""

    n_layer: int  # trunk blocks (block_count minus the NextN blocks)
    recurrent: tuple[bool, ...]  # per trunk block: Gated DeltaNet (True) or full attention
    n_embd: int
    n_head_kv: int
    head_dim: int  # n_embd_head_k = n_embd_head_v
    ssm_d_conv: int
    ssm_d_inner: int
    ssm_d_state: int
    ssm_n_group: int
    n_vocab: int  # tokens in the vocabulary: rows of the output buffer
    n_ctx_train: int

    @property
    def n_embd_kv_gqa(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def n_embd_r(self) -> int:
        return (self.ssm_d_conv - 1) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    @property
    def n_embd_s(self) -> int:
        return self.ssm_d_state * self.ssm_d_inner

    @property
    def n_attention_layers(self) -> int:
        return self.recurrent.count(False)

    @property
    def n_recurrent_layers(self) -> int:
        return self.recurrent.count(True)


@dataclass(frozen=True)
class RunSettings:
    """How llama.cpp is run: context (-c, all sequences together), KV cache type, parallel sequences."""

    ctx: int = 4096
    cache_type: str = "f16"
    parallel: int = 1
    kv_unified: bool = False
    n_ubatch: int = N_UBATCH

    def __post_init__(self) -> None:
        if self.cache_type not in CACHE_TYPES:
            raise PlanError(f"--cache-type {self.cache_type}: choose one of {', '.join(CACHE_TYPES)}")
        if self.ctx < 1 or self.parallel < 1:
            raise PlanError(f"--ctx {self.ctx} --parallel {self.parallel}: both must be at least 1")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes llama.cpp allocates for one model at one setting."""

    weights: int
    kv_cache: int
    recurrent: int
    compute: int
    output: int
    kv_cells: int  # cells per sequence stream (n_ctx_seq, or n_ctx when unified)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent + self.compute + self.output


def kv_layout(ctx: int, settings: RunSettings) -> tuple[int, int]:
    """(cells per stream, streams) as llama_context sets them up for -c ctx."""
    n_ctx = align_up(ctx, CTX_PAD)
    if settings.kv_unified:
        return n_ctx, 1
    return align_up(n_ctx // settings.parallel, CTX_PAD), settings.parallel


def kv_cache_bytes(shape: LlamaShape, ctx: int, settings: RunSettings) -> int:
    """K and V of every full-attention block: [n_embd_k_gqa, cells, streams] in the cache type each."""
    cells, streams = kv_layout(ctx, settings)
    cache_type = T[settings.cache_type.upper()]
    if shape.head_dim % GGML_QUANT_SIZES[cache_type][0]:
        raise PlanError(f"--cache-type {settings.cache_type}: its blocks do not divide the heads of {shape.head_dim} "
                        "(llama.cpp refuses it); use f16")
    row = nbytes(cache_type, (shape.n_embd_kv_gqa,))
    return shape.n_attention_layers * 2 * align_up(row * cells * streams, BUFFER_ALIGNMENT)


def recurrent_bytes(shape: LlamaShape, settings: RunSettings) -> int:
    """Conv and delta states of every Gated DeltaNet block, F32, one row per sequence."""
    rows = max(1, settings.parallel)
    per_layer = align_up(4 * shape.n_embd_r * rows, BUFFER_ALIGNMENT) + align_up(4 * shape.n_embd_s * rows, BUFFER_ALIGNMENT)
    return shape.n_recurrent_layers * per_layer


def compute_bytes(shape: LlamaShape, ctx: int, settings: RunSettings) -> int:
    """The compute buffer's estimate (see the module docstring): the LM head's peak for T tokens."""
    tokens = min(align_up(ctx, CTX_PAD), settings.n_ubatch)
    return 4 * tokens * (shape.n_vocab + HEAD_HIDDEN_TENSORS * shape.n_embd)


def output_bytes(shape: LlamaShape, settings: RunSettings) -> int:
    """The host buffer for one token's logits per sequence."""
    return 4 * shape.n_vocab * settings.parallel


def loaded_weight_bytes(
    files: Sequence[Sequence[tuple[str, int]]], is_loaded: Callable[[str], bool], alignment: int = 32,
) -> int:
    """The bytes llama.cpp maps: per file, from the first loaded tensor's data to the end of the last one.

    `files` lists each file's tensors (name, bytes) in file order; data is laid out back to back,
    each tensor padded to `alignment`.
    """
    total = 0
    for tensors in files:
        offset, first, last = 0, None, 0
        for name, size in tensors:
            if is_loaded(name):
                first = offset if first is None else first
                last = offset + size
            offset += align_up(size, alignment)
        total += 0 if first is None else last - first
    return total


def breakdown(shape: LlamaShape, weights: int, settings: RunSettings, ctx: int | None = None) -> MemoryBreakdown:
    """Every term at context `ctx` (default: the settings' own)."""
    ctx = settings.ctx if ctx is None else ctx
    return MemoryBreakdown(
        weights=weights, kv_cache=kv_cache_bytes(shape, ctx, settings), recurrent=recurrent_bytes(shape, settings),
        compute=compute_bytes(shape, ctx, settings), output=output_bytes(shape, settings),
        kv_cells=kv_layout(ctx, settings)[0],
    )


def max_context(shape: LlamaShape, weights: int, settings: RunSettings, memory: int) -> int:
    """The largest -c (a multiple of 256, each sequence at most the training context) that fits in
    `memory`; 0 when not even 256 tokens do. The need grows with the context, so a bisection finds it."""
    per_seq_cap = shape.n_ctx_train if settings.kv_unified else shape.n_ctx_train * settings.parallel
    if breakdown(shape, weights, settings, CTX_PAD).total > memory:
        return 0
    lo, hi = 1, max(1, per_seq_cap // CTX_PAD)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if breakdown(shape, weights, settings, mid * CTX_PAD).total <= memory:
            lo = mid
        else:
            hi = mid - 1
    return lo * CTX_PAD


def is_trunk_tensor(n_layer: int) -> Callable[[str], bool]:
    """Whether llama.cpp loads a tensor by default: everything but the NextN blocks (index ≥ n_layer)."""
    def loaded(name: str) -> bool:
        block = block_index(name)
        return block is None or block < n_layer

    return loaded


__all__ = [
    "CACHE_TYPES", "LlamaShape", "MemoryBreakdown", "RunSettings", "breakdown", "compute_bytes", "is_trunk_tensor",
    "kv_cache_bytes", "loaded_weight_bytes", "max_context", "output_bytes", "recurrent_bytes",
]
