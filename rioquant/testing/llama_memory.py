"""What llama.cpp itself allocates for a model: the oracle `rioquant fit`'s predictions are checked against.

`llama_buffers(gguf, settings)` loads the GGUF with llama-cpp-python (CPU, plain buffers, mmap) and,
for each setting, creates a context and reads back:
- exact bytes from `llama_get_memory_breakdown` (llama-ext.h, llama.cpp's own accounting, the one its
  `--fit` uses): per buffer type, `model` (weights), `context` (KV cache + recurrent state) and
  `compute`. It is a C++ function returning a std::map, so it is called through the Itanium ABI
  (hidden return pointer) and the red-black tree is walked by libstdc++'s node layout;
- the MiB llama.cpp logs for each buffer ("KV buffer size", "RS buffer size", "output buffer size",
  "compute buffer size", "model buffer size"), which separate the KV cache from the recurrent state.
With `no_alloc` the model is only planned (no mmap, nothing read): a header-only sparse GGUF of a
397B model can be measured this way.
"""

import ctypes
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOG_LINE = re.compile(r"(?P<what>model|KV|RS|output|compute) buffer size =\s*(?P<mib>[\d.]+) MiB")
CACHE_TYPE_IDS = {"f16": 1, "q8_0": 8}  # ggml_type values for llama_context_params.type_k/type_v


@dataclass(frozen=True)
class LlamaRun:
    """One llama_context's buffers: exact bytes per role, and the logged MiB per buffer kind."""

    model: int
    context: int  # KV cache + recurrent state
    compute: int
    logged_mib: dict[str, float]  # "model", "KV", "RS", "output", "compute" (summed over buffer types)


class _Library:
    def __init__(self) -> None:
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        self.bindings = llama_cpp
        self.llama = ctypes.CDLL(str(lib_dir / "libllama.so"))
        self.ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        self.ggml.ggml_backend_buft_name.restype = ctypes.c_char_p
        self.ggml.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        # llama_memory_breakdown llama_get_memory_breakdown(const llama_context *)
        self.breakdown_fn = self.llama._Z26llama_get_memory_breakdownPK13llama_context
        self.breakdown_fn.restype = None
        self.breakdown_fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

    def breakdown(self, ctx) -> dict[str, tuple[int, int, int]]:
        """{buffer type name: (model, context, compute)} from llama.cpp's std::map.

        libstdc++'s std::map is 48 bytes: the (empty) comparator padded to 8, the header node
        (color, parent = root, leftmost, rightmost) and the node count. A node is the 32-byte
        base (color, parent, left, right) followed by the value: the key pointer, then the three
        size_t of llama_memory_breakdown_data. The map is leaked (a few nodes per call)."""
        out = (ctypes.c_uint64 * 6)()
        self.breakdown_fn(ctypes.addressof(out), ctx)
        found: dict[str, tuple[int, int, int]] = {}

        def walk(node: int) -> None:
            if node:
                words = (ctypes.c_uint64 * 8).from_address(node)
                walk(words[2])
                found[self.ggml.ggml_backend_buft_name(words[4]).decode()] = (words[5], words[6], words[7])
                walk(words[3])

        walk(out[2])
        if len(found) != out[5]:
            raise RuntimeError(f"llama_get_memory_breakdown: read {len(found)} entries of {out[5]}: ABI mismatch")
        return found


@contextmanager
def _captured_log(bindings) -> Iterator[list[str]]:
    lines: list[str] = []

    @bindings.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode(errors="replace"))

    bindings.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        bindings.llama_log_set(ctypes.cast(None, bindings.llama_log_callback), ctypes.c_void_p(0))


def _logged(lines: list[str]) -> dict[str, float]:
    mib: dict[str, float] = {}
    for match in LOG_LINE.finditer("".join(lines)):
        mib[match["what"]] = mib.get(match["what"], 0.0) + float(match["mib"])
    return mib


def llama_buffers(gguf: Path, settings: Sequence, no_alloc: bool = False) -> list[LlamaRun]:
    """llama.cpp's buffers for the GGUF under each setting (rioquant.quant.memory.RunSettings)."""
    lib = _Library()
    b = lib.bindings
    b.llama_backend_init()
    params = b.llama_model_default_params()
    params.use_extra_bufts = False  # no repacked copies (and no AMX crash: see oracles.plain_cpu_buffers)
    params.n_gpu_layers = 0
    if no_alloc:
        params.no_alloc, params.load_mode = True, 0  # LLAMA_LOAD_MODE_NONE: no_alloc cannot map
    runs = []
    with _captured_log(b) as lines:
        model = b.llama_model_load_from_file(str(gguf).encode(), params)
        if not model:
            raise RuntimeError(f"{gguf}: llama.cpp could not load it:\n{''.join(lines)[-2000:]}")
        model_lines = list(lines)
        try:
            for s in settings:
                lines.clear()
                cp = b.llama_context_default_params()
                cp.n_ctx, cp.n_seq_max, cp.kv_unified = s.ctx, s.parallel, s.kv_unified
                cp.n_ubatch = s.n_ubatch
                cp.type_k = cp.type_v = CACHE_TYPE_IDS[s.cache_type]
                cp.n_threads = cp.n_threads_batch = 1
                ctx = b.llama_init_from_model(model, cp)
                if not ctx:
                    raise RuntimeError(f"{gguf}: no context for {s}:\n{''.join(lines)[-2000:]}")
                try:
                    parts = lib.breakdown(ctx).values()
                    runs.append(LlamaRun(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts),
                                         _logged(model_lines + lines)))
                finally:
                    b.llama_free(ctx)
        finally:
            b.llama_model_free(model)
    return runs
