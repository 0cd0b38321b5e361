"""F32 / F16 / BF16 element conversions, vectorised with numpy.

numpy's float32→float16 cast rounds to nearest even exactly like ggml's fp32_to_fp16; BF16 follows
ggml_compute_fp32_to_bf16 (round to nearest even on the top 16 bits, NaN forced quiet).
"""

import numpy as np


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array → uint16 bf16 bit patterns, as ggml_fp32_to_bf16_row_ref writes them."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if is_nan.any():
        rounded[is_nan] = ((bits[is_nan] >> 16) | np.uint32(64)).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns → float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_element_bytes(x: np.ndarray, qtype_name: str) -> np.ndarray:
    """float32 (rows, n) → uint8 (rows, n * element size) for F32, F16 or BF16."""
    if qtype_name == "F32":
        elements = np.ascontiguousarray(x, dtype=np.float32)
    elif qtype_name == "F16":
        with np.errstate(over="ignore"):  # |x| > 65504 becomes ±inf, as in ggml
            elements = x.astype(np.float16)
    else:
        elements = f32_to_bf16_bits(x)
    return elements.view(np.uint8).reshape(x.shape[0], -1)


def from_element_bytes(data: np.ndarray, qtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 bytes of F32, F16 or BF16 elements → float32 array of `shape`."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if qtype_name == "F32":
        values = raw.view(np.float32).copy()
    elif qtype_name == "F16":
        values = raw.view(np.float16).astype(np.float32)
    else:
        values = bf16_bits_to_f32(raw.view(np.uint16))
    return values.reshape(shape)
