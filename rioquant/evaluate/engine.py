"""Layer-major streaming: every evaluation chunk goes through a layer before the next layer is loaded.

Each layer's weights are read once, so memory is one layer's weights plus the activations of all
chunks (float32, n_chunks × ctx × hidden), which live in RAM or, when `max_memory` says they do not
fit, in a file that is read and written one group of chunks at a time. Chunks are independent
sequences (llama-perplexity clears the KV cache per chunk), so a group of chunks is simply a batch.

`whole_model_states` is the same computation in the usual order (all layers resident, one group at a
time through the whole model); the tests check that streaming gives exactly the same numbers.
"""

import contextlib
import logging
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rioquant.errors import EvaluationError
from rioquant.evaluate.forward import NO_OBSERVER, Observer, Rope, decoder_layer, rms_norm
from rioquant.evaluate.numerics import EXACT, NUMERICS, GgmlNumerics, Numerics
from rioquant.evaluate.source import ExpertStack, LayerWeights, ModelSource
from rioquant.export.qwen35moe import is_linear_block
from rioquant.progress import progress_bar
from rioquant.quant.api import numba_threads

log = logging.getLogger(__name__)

MIN_WORK_BYTES = 1 << 30  # the working set of a group when no better figure is known


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:N")
    threads: int | None = None  # CPU threads for torch and Numba (None: torch's default)
    max_memory: int = 0  # bytes of host memory for activations + one layer + work; 0: no limit
    tmp_dir: Path | None = None  # where spilled activations go (default: the system temp dir)
    group_chunks: int | None = None  # chunks per batch (None: as many as the working set allows)
    numerics: str = "auto"  # "exact", "ggml" (llama.cpp CPU roundings), "auto": ggml for a GGUF, exact otherwise
    progress: bool = True
    ray: str | None = None  # a Ray cluster's address: chunk groups run there (evaluate.distributed)


@dataclass
class LayerProfile:
    """Measured cost of one layer: what docs/evaluation.md extrapolates from."""

    layer: int
    kind: str  # "linear" / "full" / "head"
    weight_bytes: int
    load_s: float
    compute_s: float
    peak_bytes: int  # CUDA: peak allocated during the layer; CPU: process peak RSS so far


@dataclass
class Profile:
    tokens: int = 0
    layers: list[LayerProfile] = field(default_factory=list)
    activations_on_disk: bool = False
    group_chunks: int = 0
    wall_s: float = 0.0


def default_work_bytes(device: torch.device) -> int:
    """A quarter of the free memory where the groups run (host RAM, or the GPU), at least MIN_WORK_BYTES."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 0
    return max(MIN_WORK_BYTES, free // 4)


def resolve_numerics(mode: str, source: ModelSource) -> str:
    """--numerics: "auto" is ggml's roundings for a GGUF (what llama.cpp computes), exact float32 otherwise."""
    if mode == "auto":
        return "ggml" if source.kind == "gguf" else "exact"
    if mode not in NUMERICS:
        raise EvaluationError(f"--numerics {mode}: choose auto, {' or '.join(NUMERICS)}")
    return mode


def numerics_for(source: ModelSource, mode: str, il: int | None) -> Numerics:
    return GgmlNumerics(source.weight_types(il)) if mode == "ggml" else EXACT


def resolve_device(name: str) -> torch.device:
    """torch.device for --device, failing loudly when CUDA is asked for and absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvaluationError(f"--device {name}: expected cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvaluationError(
                f"--device {name}: torch {torch.__version__} sees no CUDA device (install a CUDA build of torch, "
                "or use --device cpu)"
            )
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: results comparable with CPU
        torch.backends.cudnn.allow_tf32 = False
    elif device.type != "cpu":
        raise EvaluationError(f"--device {name}: expected cpu or cuda")
    return device


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch and Numba on `threads` threads inside the block (None: as they are), and subnormal floats flushed
    to zero; restored after.

    Subnormals: the DeltaNet's decays e^Γ fall below 1e-38 on fast-decaying heads, and every product or sum
    that touches one takes a slow microcode path (the layers ran 10 % faster flushed, on the bench model,
    with bit-identical activations: such values weigh nothing against the float32 values they meet).
    """
    if threads is not None and threads < 1:
        raise EvaluationError(f"--threads {threads}: must be at least 1")
    previous = torch.get_num_threads()
    torch.set_flush_denormal(True)
    try:
        if threads is None:
            yield
            return
        torch.set_num_threads(threads)
        with numba_threads(min(threads, os.cpu_count() or threads)):
            yield
    finally:
        torch.set_num_threads(previous)
        torch.set_flush_denormal(False)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(weights: LayerWeights) -> int:
    return sum(w.nbytes if isinstance(w, ExpertStack) else w.numel() * w.element_size() for w in weights.values())


def bytes_per_token(source: ModelSource, ctx: int) -> int:
    """Rough float32 working set of one token inside a layer (activations, attention, delta-net chunks)."""
    a = source.args
    qkv = a.conv_dim + 2 * a.value_dim + 4 * a.num_attention_heads * a.head_dim
    delta = a.linear_num_value_heads * 64 * 6  # chunk matrices (decay, A, QKᵀ, float64 differences)
    moe = a.num_experts * 2 + a.num_experts_per_tok * a.moe_intermediate_size * 3 + 3 * a.shared_expert_intermediate_size
    return 4 * (12 * a.hidden_size + 3 * qkv + delta + moe + a.num_attention_heads * min(ctx, 1024))


class Activations:
    """float32 (n_chunks, ctx, hidden) residual stream, in RAM or in a temporary file in --tmp-dir."""

    def __init__(self, n_chunks: int, ctx: int, hidden: int, on_disk: bool, tmp_dir: Path | None) -> None:
        self.shape = (n_chunks, ctx, hidden)
        self.on_disk = on_disk
        self._file = None
        if on_disk:
            self._file = tempfile.NamedTemporaryFile(prefix="rioquant-acts-", suffix=".f32", dir=tmp_dir)
            self.data = np.memmap(self._file.name, dtype=np.float32, mode="w+", shape=self.shape)
        else:
            self.data = np.zeros(self.shape, dtype=np.float32)

    def read(self, chunks: slice, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[chunks])).to(device)

    def write(self, chunks: slice, values: torch.Tensor) -> None:
        self.data[chunks] = values.detach().to("cpu").numpy()

    def close(self) -> None:
        if self._file is not None:
            del self.data
            self._file.close()
            self._file = None


class Engine:
    """Runs a ModelSource over token chunks (n_chunks, ctx), layer by layer."""

    def __init__(self, source: ModelSource, chunks: np.ndarray, options: EngineOptions) -> None:
        self.source, self.chunks, self.options = source, chunks, options
        self.device = resolve_device(options.device)
        n_chunks, ctx = chunks.shape
        a = source.args
        self.work_bytes = options.max_memory // 4 if options.max_memory else default_work_bytes(self.device)
        per_chunk = ctx * bytes_per_token(source, ctx)
        self.group = options.group_chunks or max(1, min(n_chunks, self.work_bytes // per_chunk))
        act_bytes = n_chunks * ctx * a.hidden_size * 4
        self.spill = bool(options.max_memory) and act_bytes > options.max_memory // 2
        self.profile = Profile(tokens=int(chunks.size), activations_on_disk=self.spill, group_chunks=self.group)
        self.rope = Rope(ctx, a, source.rope_sections, self.device)
        self.numerics = resolve_numerics(options.numerics, source)

    def layer_numerics(self, il: int | None) -> Numerics:
        """The roundings for layer il (None: the output head)."""
        return numerics_for(self.source, self.numerics, il)

    def groups(self) -> Iterator[slice]:
        n = self.chunks.shape[0]
        for start in range(0, n, self.group):
            yield slice(start, min(n, start + self.group))

    def embed(self, acts: Activations) -> None:
        ids, inverse = np.unique(self.chunks, return_inverse=True)
        table = self.source.embedding_rows(ids)  # only the rows of tokens in the text
        for g in self.groups():
            rows = inverse.reshape(self.chunks.shape)[g]
            acts.write(g, torch.from_numpy(table[rows]))

    def run_layers(self, observer_for_layer=None) -> Activations:
        """Embed, then stream every layer over all chunks; returns the residual stream after the last layer.

        observer_for_layer(il) gives the Observer that sees layer il's matrix inputs (imatrix).
        """
        start = time.perf_counter()
        acts = Activations(*self.chunks.shape, self.source.args.hidden_size, self.spill, self.options.tmp_dir)
        try:
            self.embed(acts)
            a = self.source.args
            bar = progress_bar(self.options.progress, iterable=range(a.num_hidden_layers), desc="layers", unit="layer")
            for il in bar:
                observer = observer_for_layer(il) if observer_for_layer else NO_OBSERVER
                self._run_layer(acts, il, observer)
        except BaseException:
            acts.close()
            raise
        self.profile.wall_s += time.perf_counter() - start
        return acts

    def _run_layer(self, acts: Activations, il: int, observer: Observer) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        weights = self.source.layer(il, self.device)
        stacks = [w for w in weights.values() if isinstance(w, ExpertStack)]
        if len(range(0, self.chunks.shape[0], self.group)) > 1 and sum(s.float_bytes for s in stacks) <= self.work_bytes:
            for stack in stacks:  # several groups will meet this layer: dequantize each expert once
                stack.keep_dequantized()
        num = self.layer_numerics(il)
        _sync(self.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            for g in self.groups():
                x = acts.read(g, self.device)
                acts.write(g, decoder_layer(x, weights, self.source.args, il, self.rope, observer, num))
        _sync(self.device)
        t2 = time.perf_counter()
        kind = "linear" if is_linear_block(self.source.args, il) else "full"
        self.profile.layers.append(LayerProfile(il, kind, weight_bytes(weights), t1 - t0, t2 - t1, _peak_bytes(self.device)))
        del weights

    def final_states(self, acts: Activations, norm: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(chunk slice, output-normed states (B, ctx, H)) for each group, on the device."""
        with torch.inference_mode():
            for g in self.groups():
                yield g, rms_norm(acts.read(g, self.device), norm, self.source.args.rms_norm_eps)

    def head_profile(self, weights_bytes: int, load_s: float, compute_s: float) -> None:
        self.profile.layers.append(LayerProfile(-1, "head", weights_bytes, load_s, compute_s, _peak_bytes(self.device)))


def whole_model_states(source: ModelSource, chunks: np.ndarray, options: EngineOptions) -> np.ndarray:
    """Reference order: all layers resident, each group of chunks through the whole model; final normed states."""
    engine = Engine(source, chunks, options)
    a = source.args
    layers = [(source.layer(il, engine.device), engine.layer_numerics(il)) for il in range(a.num_hidden_layers)]
    head = source.head(engine.device)
    acts = Activations(*chunks.shape, a.hidden_size, False, None)
    engine.embed(acts)
    out = np.empty(acts.shape, dtype=np.float32)
    with torch.inference_mode():
        for g in engine.groups():
            x = acts.read(g, engine.device)
            for il, (weights, num) in enumerate(layers):
                x = decoder_layer(x, weights, a, il, engine.rope, NO_OBSERVER, num)
            out[g] = rms_norm(x, head.output_norm, a.rms_norm_eps).cpu().numpy()
    return out
