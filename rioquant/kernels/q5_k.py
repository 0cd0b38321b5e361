"""Q5_K: Q4_K's super-block (8 sub-blocks of 32, 6-bit scales and mins) with 5-bit levels.

Block layout (176 bytes):  d: fp16 | dmin: fp16 | scales: u8[12] | qh: u8[32] | qs: u8[128]
  weight = d·sc[j]·q − dmin·m[j], q in 0..31; scales packed as in Q4_K. The low 4 bits of q sit in
  qs exactly as Q4_K's levels; bit 4 of element l of sub-block j is bit j of qh[l].
The searches are Q4_K's with nmax 31: make_qkx2_quants(-0.5, 0.1, 15) without importance,
make_qkx3_quants + make_qp_quants with it (quantize_row_q5_K_ref / quantize_row_q5_K_impl).
"""

import numpy as np
from numba import njit

from rioquant.kernels.common import F32, load_fp16
from rioquant.kernels.q4_k import (
    K_SCALE_SIZE,
    NSUB,
    QK_K,
    SCALES_AT,
    SUB,
    choose_levels_impl,
    choose_levels_ref,
    get_scale_min_k4,
    new_work,
)
from rioquant.kernels.search_affine import new_scratch

QH_AT = SCALES_AT + K_SCALE_SIZE
QS_AT = QH_AT + QK_K // 8
BLOCK_BYTES = QS_AT + QK_K // 2


@njit(cache=True)
def quantize_row_q5_k(x: np.ndarray, importance: np.ndarray, out: np.ndarray) -> None:
    L = np.empty(QK_K, dtype=np.uint8)
    work = new_work()
    scratch = new_scratch()
    for ib in range(x.size // QK_K):
        xb = x[ib * QK_K : (ib + 1) * QK_K]
        block = out[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        if importance.size == 0:
            choose_levels_ref(xb, 31, F32(-0.5), F32(0.1), 15, block, L, work, scratch)
        else:
            qw = importance[ib * QK_K : (ib + 1) * QK_K]
            choose_levels_impl(xb, qw, 31, True, block, L, work, scratch)
        for i in range(SUB):  # qs as Q4_K's nibbles; bit 4 of sub-block j's element i → bit j of qh[i]
            high = 0
            for j in range(0, NSUB, 2):
                l1 = np.int64(L[SUB * j + i])
                l2 = np.int64(L[SUB * (j + 1) + i])
                block[QS_AT + SUB * (j // 2) + i] = (l1 & 0xF) | ((l2 & 0xF) << 4)
                high |= ((l1 >> 4) << j) | ((l2 >> 4) << (j + 1))
            block[QH_AT + i] = high


@njit(cache=True)
def dequantize_row_q5_k(data: np.ndarray, out: np.ndarray) -> None:
    for ib in range(out.size // QK_K):
        block = data[ib * BLOCK_BYTES : (ib + 1) * BLOCK_BYTES]
        y = out[ib * QK_K : (ib + 1) * QK_K]
        d = load_fp16(block, 0)
        dmin = load_fp16(block, 2)
        for j in range(NSUB):
            sc, m = get_scale_min_k4(j, block)
            d1 = F32(d * F32(sc))
            m1 = F32(dmin * F32(m))
            shift = 4 * (j % 2)
            for i in range(SUB):
                low = (np.int64(block[QS_AT + (j // 2) * SUB + i]) >> shift) & 0xF
                q = low | (((np.int64(block[QH_AT + i]) >> j) & 1) << 4)
                y[j * SUB + i] = F32(F32(d1 * F32(q)) - m1)
