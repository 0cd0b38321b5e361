"""ggml blocks → float32 torch tensors: torch kernels for CUDA, the Numba kernels on CPU.

On CPU the validated Numba dequantizers (`rioquant.quant.dequantize`) do the work; types they do not
know (the IQ family of a GGUF made elsewhere) go through gguf-py's numpy dequantizer. On CUDA the
block is unpacked by the torch kernels below, one per type, vectorised over blocks, each with its
block layout in one comment and the same float32 operation order as ggml's `dequantize_row_*` (a
multiply and an add are separate kernels in eager torch, so nothing is contracted into an FMA):
they are bit-identical to the Numba kernels, which the tests check on CPU tensors.
"""

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf import quants as gguf_quants

from rioquant.files.gguf_file import nbytes
from rioquant.quant import dequantize as numba_dequantize
from rioquant.quant.types import BLOCK_KERNELS, FLOAT_TYPES

T = GGMLQuantizationType


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes [start, start+2) of every block, as float32 (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _fields(blocks: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Split each block's bytes into consecutive fields of the given sizes."""
    return list(torch.split(blocks, sizes, dim=1))


def _shifted(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(x >> s) & mask for each s, stacked on a new axis before the last: (..., len(shifts), n)."""
    return torch.stack([(x >> s) & mask for s in shifts], dim=-2)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """Bit i of a little-endian uint32 stored as 4 bytes, for i in 0..31: uint8 (n, 32)."""
    return _shifted(qh, tuple(range(8)), 1).transpose(-1, -2).reshape(qh.shape[0], 32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # d:f16 | qs:int8[32]                                                   y = q·d
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # d:f16 | qs:u8[16] (elem j: low nibble of qs[j], elem j+16: high)      y = (q-8)·d
    q = _shifted(b[:, 2:], (0, 4), 0x0F).reshape(-1, 32)
    return (q.to(torch.int8) - 8).float() * _f16(b, 0)


def _q5_low_high(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # 5-bit values: nibbles as in Q4_0, bit 4 of element i is bit i of qh (u32)
    return _shifted(qs, (0, 4), 0x0F).reshape(-1, 32) | (_bits32(qh) << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # d:f16 | qh:u32 | qs:u8[16]                                             y = (q-16)·d
    q = _q5_low_high(b[:, 2:6], b[:, 6:])
    return (q.to(torch.int8) - 16).float() * _f16(b, 0)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # d:f16 | m:f16 | qh:u32 | qs:u8[16]                                     y = q·d + m
    q = _q5_low_high(b[:, 4:8], b[:, 8:])
    return q.float() * _f16(b, 0) + _f16(b, 2)


def _two_bit_groups(qs: torch.Tensor) -> torch.Tensor:
    # qs:u8[64] as 2 halves of 32 bytes; each half gives 4 groups of 32 2-bit values (shifts 0,2,4,6)
    return _shifted(qs.reshape(-1, 2, 32), (0, 2, 4, 6), 3).reshape(-1, QK_K)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales:u8[16] (low nibble scale, high nibble min) | qs:u8[64] | d:f16 | dmin:f16
    scales, qs, _, _ = _fields(b, (QK_K // 16, QK_K // 4, 2, 2))
    dl = (_f16(b, 80) * (scales & 0xF).float()).unsqueeze(-1)  # (n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).unsqueeze(-1)
    q = _two_bit_groups(qs).reshape(-1, 16, 16).float()
    return (dl * q - ml).reshape(-1, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask:u8[32] | qs:u8[64] | scales:u8[12] (16 × 6-bit, packed as below) | d:f16
    hmask, qs, scales, _ = _fields(b, (QK_K // 8, QK_K // 4, 12, 2))
    # scale i: low 4 bits = nibble (i // 8) of byte i % 8, high 2 bits = bits 2·(i // 4) of byte 8 + i % 4
    low = _shifted(scales[:, :8], (0, 4), 0x0F).reshape(-1, 16)
    high = _shifted(scales[:, 8:], (0, 2, 4, 6), 0x03).reshape(-1, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * sc).unsqueeze(-1)  # (n, 16, 1)
    # element e: 2 low bits from qs as in Q2_K; its high bit is bit e // 32 of hmask[e % 32], set means +0
    hbit = _shifted(hmask, tuple(range(8)), 1).reshape(-1, QK_K)
    q = _two_bit_groups(qs).to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)
    return (dl * q.reshape(-1, 16, 16).float()).reshape(-1, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 12 bytes → 8 6-bit scales and 8 6-bit mins:
    #  bytes 0-3: scale j low 6 bits (2 high bits: scale j+4 bits 4-5); bytes 4-7 likewise for mins;
    #  bytes 8-11: low nibble = scale j+4 bits 0-3, high nibble = min j+4 bits 0-3
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # d:f16 | dmin:f16 | scales:u8[12] | qs:u8[128] (4 × 32 bytes: low nibbles sub-block 2c, high 2c+1)
    _, _, scales, qs = _fields(b, (2, 2, 12, QK_K // 2))
    sc, mn = _scale_min_k4(scales)
    d1 = (_f16(b, 0) * sc).unsqueeze(-1)  # (n, 8, 1)
    m1 = (_f16(b, 2) * mn).unsqueeze(-1)
    q = _shifted(qs.reshape(-1, 4, 32), (0, 4), 0x0F).reshape(-1, 8, 32).float()
    return (d1 * q - m1).reshape(-1, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # d:f16 | dmin:f16 | scales:u8[12] | qh:u8[32] (bit s: sub-block s) | qs:u8[128] as in Q4_K
    _, _, scales, qh, qs = _fields(b, (2, 2, 12, QK_K // 8, QK_K // 2))
    sc, mn = _scale_min_k4(scales)
    d1 = (_f16(b, 0) * sc).unsqueeze(-1)
    m1 = (_f16(b, 2) * mn).unsqueeze(-1)
    low = _shifted(qs.reshape(-1, 4, 32), (0, 4), 0x0F).reshape(-1, 8, 32)
    high = _shifted(qh, tuple(range(8)), 1)  # (n, 8, 32)
    q = (low | (high << 4)).float()
    return (d1 * q - m1).reshape(-1, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql:u8[128] (2 halves × 64: low nibbles groups 0-1, high 2-3) | qh:u8[64] (2 halves × 32, 2 bits
    # per group at shifts 0,2,4,6) | scales:int8[16] | d:f16                    y = d·scale·(q-32)
    ql, qh, scales, _ = _fields(b, (QK_K // 2, QK_K // 4, QK_K // 16, 2))
    low = _shifted(ql.reshape(-1, 2, 64), (0, 4), 0x0F).reshape(-1, 8, 32)
    high = _shifted(qh.reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
    d1 = (_f16(b, 208) * scales.contiguous().view(torch.int8).float()).unsqueeze(-1)  # (n, 16, 1)
    return (d1 * q).reshape(-1, QK_K)


TORCH_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q8_0: _q8_0,
    T.Q4_0: _q4_0,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}
TORCH_FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def dequantize_torch(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 bytes (on any device) → float32 tensor of `shape` on the same device, with torch ops only."""
    if qtype in TORCH_FLOATS:
        return raw.view(TORCH_FLOATS[qtype]).float().reshape(shape)
    return TORCH_KERNELS[qtype](raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])).reshape(shape)  # (blocks, type bytes)


def dequantize_to(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Bytes read from a GGUF → float32 tensor on `device`: Numba on CPU, torch kernels on CUDA."""
    if device.type != "cpu" and (qtype in TORCH_KERNELS or qtype in TORCH_FLOATS):
        return dequantize_torch(torch.from_numpy(raw).to(device), qtype, shape)
    if qtype in BLOCK_KERNELS or qtype in FLOAT_TYPES:
        values = numba_dequantize(raw, qtype, shape)
    else:  # a type rioquant does not write (IQ*, TQ*): gguf-py's reference dequantizer
        values = gguf_quants.dequantize(raw.reshape(-1), qtype).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)


def dequantize_rows(raw: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int, rows: np.ndarray) -> np.ndarray:
    """Only the given rows of a 2-D tensor (the token embedding: the rows of the tokens seen)."""
    picked = raw.reshape(-1, nbytes(qtype, (n_per_row,)))[rows]
    return dequantize_to(np.ascontiguousarray(picked).reshape(-1), qtype, (len(rows), n_per_row), torch.device("cpu")).numpy()
