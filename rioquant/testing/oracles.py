"""Independent references that rioquant is measured against.

- `GgmlOracle`: ggml's C quantizers via ctypes, from llama-cpp-python's own `libggml-base.so` (the
  pinned 0.3.36 build). If it cannot be loaded, `GgmlOracle()` raises: tests that need it fail
  loudly instead of skipping.
- `run_reference_converter`: llama.cpp's own convert_hf_to_gguf.py (from `rioquant.testing.llama_src`);
  `run_reference_mmproj`: the same with `--mmproj` (the vision projector). Image oracles: testing/vision.py.
- `llama_logits` / `transformers_logits`: a model's logits through llama.cpp and through transformers;
  `llama_tensors`: llama.cpp's intermediate tensors (what each op of its graph computed).
"""

import contextlib
import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def _ggml_lib_dir() -> Path:
    import llama_cpp  # the oracle's package; a missing install is a test failure, not a skip

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if not (lib_dir / "libggml-base.so").exists():
        raise RuntimeError(f"ggml oracle missing: {lib_dir / 'libggml-base.so'} (run `make install`)")
    return lib_dir


class GgmlOracle:
    """ctypes bindings to ggml_quantize_chunk and friends."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(str(_ggml_lib_dir() / "libggml-base.so"))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        self.lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml's bytes for x (rows, n_per_row) float32, one row of output per input row.

        A type ggml requires an imatrix for raises here: ggml would abort the whole test process.
        ggml_quantize_init builds the i-quants' grids and neighbour maps (ggml_quantize_chunk calls it
        too; calling it first keeps that one-time cost out of timed calls).
        """
        if imatrix is None and self.requires_imatrix(qtype):
            raise ValueError(f"ggml aborts on {qtype.name} without an imatrix")
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n_per_row = x.shape
        row_bytes = self.lib.ggml_row_size(int(qtype), n_per_row)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        assert row_bytes == n_per_row // block * type_bytes
        out = np.zeros((rows, row_bytes), dtype=np.uint8)
        qw = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            qw = imatrix.ctypes.data
        self.lib.ggml_quantize_init(int(qtype))
        written = self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n_per_row, qw)
        assert written == out.nbytes
        return out

    def requires_imatrix(self, qtype: GGMLQuantizationType) -> bool:
        """ggml_quantize_requires_imatrix: the types ggml_quantize_chunk asserts an imatrix for."""
        return bool(self.lib.ggml_quantize_requires_imatrix(int(qtype)))


# ---------------------------------------------------------------------------------------------
# Model-level oracles: llama.cpp's own converter, llama.cpp's forward pass, transformers' forward pass.
# They check a whole GGUF end to end; none of them imports rioquant.


def run_reference_converter(
    src_dir: Path | str,
    out_path: Path | str,
    outtype: str = "f16",
    extra_args: Sequence[str] = (),
    mtp: bool | None = None,
    timeout_s: float = 600,
) -> Path:
    """Convert an HF checkpoint with llama.cpp's own `convert_hf_to_gguf.py`; return the GGUF path.

    Runs in a subprocess with the venv's Python and PYTHONPATH set to that tree's `gguf-py`, so the
    converter uses its own gguf package (gguf 0.19.0 on PyPI lacks the qwen35moe NEXTN tensors).
    mtp: None adds `--no-mtp` when the checkpoint has no `mtp.*` tensors (without it the reference
    converter asserts on such a checkpoint), False always adds it (drop the MTP layer), True never.
    The text GGUF only: the vision tower is skipped (`run_reference_mmproj` writes the projector).
    """
    from rioquant.testing.llama_src import llama_cpp_source

    src_dir, out_path = Path(src_dir), Path(out_path)
    tree = llama_cpp_source()
    script = tree / "convert_hf_to_gguf.py"
    args = [sys.executable, str(script), "--outtype", outtype, "--outfile", str(out_path)]
    if mtp is False or (mtp is None and not _has_mtp_tensors(src_dir)):
        args.append("--no-mtp")
    args += [*extra_args, str(src_dir)]
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must import the tree's gguf-py, not the venv's
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"reference converter failed on {src_dir} (exit {proc.returncode}):\n{tail}")
    return out_path


def run_reference_mmproj(src_dir: Path | str, out_path: Path | str, outtype: str = "f16") -> Path:
    """llama.cpp's converter with `--mmproj`: the vision projector (Qwen3VLVisionModel) as it writes it.

    It reads the tower under `model.visual.` or `visual.` only (one under `model.language_model.visual.`
    gives it an empty file); MTP flags do not apply to the projector, so none is passed.
    """
    return run_reference_converter(src_dir, out_path, outtype, extra_args=["--mmproj"], mtp=True)


def _has_mtp_tensors(src_dir: Path) -> bool:
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"]
    else:
        from safetensors import safe_open

        names = []
        for f in sorted(src_dir.glob("*.safetensors")):
            with safe_open(str(f), "np") as st:
                names += list(st.keys())
    return any(n.startswith(("mtp.", "model.mtp.")) for n in names)


@contextlib.contextmanager
def plain_cpu_buffers() -> Iterator[None]:
    """Load models without llama.cpp's "extra" CPU buffer types (AMX / repacked weights).

    On this machine's AMX-capable CPUs, llama.cpp 0.3.36's AMX matmul segfaults on the quantized
    expert tensors of tiny models (seen with its own llama_model_quantize output as well as ours);
    the plain CPU kernels compute the same model, so the oracle uses them.
    """
    import llama_cpp.llama_cpp as bindings  # the module Llama() takes its default params from

    default_params = bindings.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        bindings.llama_model_default_params = default_params


def llama_logits(gguf_path: Path | str, token_ids: Sequence[int], n_threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits for every position: float32 (n_tokens, n_vocab).

    Loads the GGUF with llama-cpp-python (the pinned build, CPU), evaluates the tokens in one batch
    and returns the scores of all positions. Loading it at all is the first check: llama.cpp's
    loader validates names, shapes and required metadata.
    """
    from llama_cpp import Llama

    tokens = [int(t) for t in token_ids]
    with plain_cpu_buffers():
        llm = Llama(
            model_path=str(gguf_path), logits_all=True, n_ctx=max(64, len(tokens)), n_batch=max(64, len(tokens)),
            n_gpu_layers=0, n_threads=n_threads, verbose=False,
        )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)
    finally:
        llm.close()


def transformers_logits(
    src_dir: Path | str, token_ids: Sequence[int], adjust: Callable[[Any], None] | None = None
) -> np.ndarray:
    """transformers' float32 logits for every position: float32 (n_tokens, n_vocab).

    Loads the checkpoint with the class its config names (`Qwen3_5MoeForCausalLM` or
    `Qwen3_5MoeForConditionalGeneration`, text input only) in float32 on the CPU; MTP tensors are
    ignored by transformers. Rows beyond the tokenizer (the padded vocabulary) are included, as in
    llama.cpp's output. `adjust(model)` may edit the loaded float32 weights in place first (to
    mirror a known rounding of the reference converter, say).
    """
    import torch
    import transformers

    src_dir = Path(src_dir)
    arch = json.loads((src_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(src_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        if adjust is not None:
            adjust(model)
        out = model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def _decode_sequence(llama_cpp: Any, ctx: Any, batch: Any, tokens: Sequence[int], first: int) -> None:
    """Decode `tokens` as sequence 0 at positions 0.., logits requested from position `first` on."""
    batch.n_tokens = len(tokens)
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i >= first
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


class LlamaChunks:
    """llama-perplexity's loop on a loaded model: one sequence of ctx tokens per chunk, the memory
    cleared between chunks, logits requested only from position `first` on (llama-cpp-python's default
    context: no flash attention, F16 KV cache)."""

    def __init__(self, gguf_path: Path | str, ctx: int, n_threads: int | None = None) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.bindings, self.ctx = llama_cpp, ctx
        with plain_cpu_buffers():
            self.llm = Llama(model_path=str(gguf_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_gpu_layers=0,
                             n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        self.batch = llama_cpp.llama_batch_init(ctx, 0, 1)
        self.n_vocab = self.llm.n_vocab()

    def logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 (ctx - first, n_vocab) for one chunk of ctx tokens (a view: copy before the next call)."""
        llama_cpp = self.bindings
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        _decode_sequence(llama_cpp, self.llm.ctx, self.batch, tokens, first)
        n_out = len(tokens) - first
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(n_out * self.n_vocab,)).reshape(
            n_out, self.n_vocab)

    def close(self) -> None:
        self.bindings.llama_batch_free(self.batch)
        self.llm.close()


def llama_chunk_logits(gguf_path: Path | str, chunks: np.ndarray, first: int, n_threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits for positions first..ctx-1 of each chunk: float32 (n_chunks, ctx - first, n_vocab)."""
    runner = LlamaChunks(gguf_path, chunks.shape[1], n_threads)
    try:
        return np.stack([runner.logits(tokens, first).copy() for tokens in chunks])
    finally:
        runner.close()


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml.h's `struct ggml_tensor` (its layout is part of ggml's public header)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


_READABLE = {GGMLQuantizationType.F32: ctypes.c_float, GGMLQuantizationType.I32: ctypes.c_int32}


def llama_tensors(gguf_path: Path | str, tokens: Sequence[int], names: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """llama.cpp's intermediate tensors for one sequence, from its graph-evaluation callback.

    Every contiguous F32 / I32 tensor whose name (as llama.cpp's graph names it, e.g. "attn_norm-0",
    "ffn_moe_logits-3", "result_output") passes `names`, with ggml's axes reversed (row-major). A name
    the graph uses twice keeps its first value. Logits are requested for every position, so no layer
    drops rows; same context as LlamaChunks otherwise (no flash attention, F16 KV cache).
    """
    import llama_cpp

    base = ctypes.CDLL(str(_ggml_lib_dir() / "libggml-base.so"))
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_data.restype = ctypes.c_void_p
    base.ggml_is_contiguous.restype = ctypes.c_bool
    for fn in (base.ggml_get_name, base.ggml_get_data, base.ggml_is_contiguous):
        fn.argtypes = [ctypes.c_void_p]
    found: dict[str, np.ndarray] = {}

    def on_tensor(tensor: int, ask: bool, _user: int) -> bool:
        name = base.ggml_get_name(tensor).decode()
        if ask:
            return names(name)
        head = _TensorHead.from_address(tensor)
        if name not in found and head.type in _READABLE and base.ggml_is_contiguous(tensor):
            shape = tuple(head.ne)[::-1]
            data = (_READABLE[head.type] * int(np.prod(shape))).from_address(base.ggml_get_data(tensor))
            found[name] = np.ctypeslib.as_array(data).reshape(shape).copy()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)  # referenced until the decode returns
    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = False  # as plain_cpu_buffers()
    model_params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = len(tokens)
    params.cb_eval = callback
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        _decode_sequence(llama_cpp, ctx, batch, tokens, 0)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return found


def ggml_activation_rounding(x: np.ndarray, vec_dot_type: str) -> np.ndarray:
    """What ggml-cpu turns float32 activations into before a product with a quantized weight.

    Calls the CPU backend's own `quantize_row_q8_0` / `quantize_row_q8_K` (the runtime, SIMD versions
    in libggml-cpu.so, not the reference ones behind ggml_quantize_chunk) and reads the blocks back:
    Q8_0 = F16 d + 32 int8; Q8_K = F32 d + 256 int8 + 16 int16 block sums. float32 of x's shape.
    """
    lib = ctypes.CDLL(str(_ggml_lib_dir() / "libggml-cpu.so"))
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if vec_dot_type == "Q8_0":
        out = np.zeros(x.size // 32 * 34, dtype=np.uint8)
        lib.quantize_row_q8_0(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        blocks = out.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(-1)
    if vec_dot_type == "Q8_K":
        out = np.zeros(x.size // 256 * 292, dtype=np.uint8)
        lib.quantize_row_q8_K(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        blocks = out.reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        return (blocks[:, 4:260].view(np.int8).astype(np.float32) * d).reshape(-1)
    raise ValueError(vec_dot_type)
