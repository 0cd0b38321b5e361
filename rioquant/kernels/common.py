"""Scalar building blocks shared by every ggml block quantizer.

They reproduce ggml's float tricks bit for bit: `nearest_int` through the 1.5·2^23 magic number
(which also defines what happens to out-of-range values, so we bit-cast rather than call `rint`),
and ggml's software fp32→fp16 conversion (ggml-base is built without F16C, so this is the path its
quantizers take). All arithmetic stays float32: a bare Python float literal would promote to float64
inside Numba, so constants are spelled as `np.float32`.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

F32 = np.float32
MAGIC_ROUND = F32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer held in the mantissa
GROUP_MAX_EPS = F32(1e-15)  # ggml treats a group whose |max| is below this as all zero


@intrinsic
def f32_as_i32(typingctx, value):
    """Reinterpret the bits of a float32 as an int32 (C's memcpy between float and int)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def i32_as_f32(typingctx, value):
    """Reinterpret the bits of an int32 as a float32."""
    if value != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, inline="always")
def nearest_int(fval: np.float32) -> int:
    """ggml's round-to-nearest-even for |fval| ≤ 2^22, and its exact garbage beyond that."""
    bits = f32_as_i32(F32(fval + MAGIC_ROUND))
    return (bits & 0x007FFFFF) - 0x00400000


@njit(cache=True, inline="always")
def round_half_away(v: np.float32) -> np.float32:
    """C's roundf: nearest integer, halves away from zero (exact, unlike floor(v + 0.5))."""
    t = np.trunc(v)
    if abs(F32(v - t)) >= F32(0.5):
        t += F32(1.0) if v > 0 else F32(-1.0)
    return F32(t)


@njit(cache=True, inline="always")
def fp32_to_fp16_bits(f: np.float32) -> np.uint16:
    """ggml_compute_fp32_to_fp16: round to nearest even, NaN → 0x7E00, overflow → inf."""
    scale_to_inf = F32(5.192296858534828e33)  # 2**112
    scale_to_zero = F32(7.703719777548943e-34)  # 2**-110
    base = F32(F32(abs(f) * scale_to_inf) * scale_to_zero)
    w = np.int64(f32_as_i32(F32(f))) & 0xFFFFFFFF
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = F32(i32_as_f32(np.int32((bias >> 1) + 0x07800000)) + base)
    bits = np.int64(f32_as_i32(base)) & 0xFFFFFFFF
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return np.uint16((sign >> 16) | nonsign)


@njit(cache=True, inline="always")
def fp16_bits_to_fp32(h: np.uint16) -> np.float32:
    """Exact half → float conversion (every half value is representable in float32)."""
    h = np.int64(h)
    sign = (h >> 15) & 1
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        value = F32(mantissa) * F32(5.960464477539063e-08)  # subnormal: mantissa * 2**-24
        return -value if sign else value
    if exponent == 31:
        bits = (sign << 31) | 0x7F800000 | (mantissa << 13)
    else:
        bits = (sign << 31) | ((exponent + 112) << 23) | (mantissa << 13)
    return i32_as_f32(np.int32(np.int64(bits) - (np.int64(1) << 32) if bits >= (1 << 31) else bits))


@njit(cache=True, inline="always")
def store_fp16(out: np.ndarray, offset: int, value: np.float32) -> None:
    """Write `value` as a little-endian ggml half at out[offset:offset+2]."""
    h = np.int64(fp32_to_fp16_bits(value))
    out[offset] = np.uint8(h & 0xFF)
    out[offset + 1] = np.uint8(h >> 8)


@njit(cache=True, inline="always")
def load_fp16(data: np.ndarray, offset: int) -> np.float32:
    """Read a little-endian ggml half from data[offset:offset+2]."""
    return fp16_bits_to_fp32(np.uint16(np.int64(data[offset]) | (np.int64(data[offset + 1]) << 8)))


@njit(cache=True, inline="always")
def positive_max(values: np.ndarray) -> np.float32:
    """Largest value, or 0 when none is positive: ggml's scan for a super-block's max scale or min."""
    best = F32(0.0)
    for v in values:
        if v > best:
            best = v
    return best


@njit(cache=True, inline="always")
def signed_max_abs(values: np.ndarray) -> tuple[np.float32, np.float32]:
    """(the value with the largest magnitude, that magnitude); the first one wins ties, as in ggml."""
    best, best_abs = F32(0.0), F32(0.0)
    for v in values:
        if abs(v) > best_abs:
            best_abs = abs(v)
            best = v
    return best, best_abs


@intrinsic
def frame_array(typingctx, count, dtype):
    """A 1-D scratch array of `count` (a constant) items in the calling kernel's stack frame, without
    a reference count: valid until that kernel returns, so only for scratch it never returns.

    Why: Numba counts references to every array a kernel allocates, with an atomic add and subtract
    each time a variable takes it, which includes each call of an inlined helper in a search's inner
    loop. Those atomics were half of IQ2_S's time; an array without a count (a null MemInfo, as for
    a constant table) costs a test instead."""
    if not isinstance(count, types.IntegerLiteral):
        return None
    item = dtype.instance_type if isinstance(dtype, types.NumberClass) else dtype.dtype
    array_type = types.Array(item, 1, "C")

    def codegen(context, builder, signature, args):
        n = count.literal_value
        data = cgutils.alloca_once(builder, context.get_data_type(item), size=context.get_constant(types.intp, n))
        array = make_array(array_type)(context, builder)
        itemsize = context.get_abi_sizeof(context.get_data_type(item))
        populate_array(array, data=data, shape=[context.get_constant(types.intp, n)],
                       strides=[context.get_constant(types.intp, itemsize)],
                       itemsize=context.get_constant(types.intp, itemsize), meminfo=None)
        return array._getvalue()

    return array_type(count, dtype), codegen
