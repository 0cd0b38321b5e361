"""Q8_0: blocks of 32 weights, one fp16 scale and 32 int8 values (ggml quantize_row_q8_0_ref).

Block layout (34 bytes):  d: fp16 | qs: int8[32]
ggml ignores importance weights for Q8_0, so there is a single path.
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16, round_half_away, store_fp16

QK8_0 = 32
BLOCK_BYTES = 2 + QK8_0


@njit(cache=True)
def quantize_row_q8_0(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    for ib in range(x.size // QK8_0):
        xb = x[ib * QK8_0 : (ib + 1) * QK8_0]
        ob = out[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        amax = F32(0.0)
        for v in xb:
            amax = max(amax, abs(v))
        d = F32(amax / F32(127.0))
        inv_d = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
        store_fp16(ob, 0, d)
        for j in range(QK8_0):
            ob[2 + j] = np.uint8(np.int64(round_half_away(F32(xb[j] * inv_d))) & 0xFF)


@njit(cache=True)
def dequantize_row_q8_0(data: np.ndarray, out: np.ndarray) -> None:
    """Each byte as int8 (a wrapping cast) times d: block slices and no branch, so LLVM vectorises it
    (the error report dequantizes every row it measures)."""
    for ib in range(out.size // QK8_0):
        block = data[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        y = out[ib * QK8_0 : (ib + 1) * QK8_0]
        d = load_fp16(block, 0)
        qs = block[2:]
        for j in range(QK8_0):
            y[j] = F32(np.int8(qs[j])) * d
