"""Independent references that rioquant is measured against: ggml's C quantizers via ctypes.

The library is llama-cpp-python's own `libggml-base.so` (the pinned 0.3.36 build). If it cannot be
loaded, `GgmlOracle()` raises: tests that need it fail loudly instead of skipping.
"""

import ctypes
from pathlib import Path

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
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml's bytes for x (rows, n_per_row) float32, one row of output per input row."""
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
