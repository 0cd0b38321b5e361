"""The table of tensor types rioquant can write, and the kernels behind each.

Block sizes and byte counts come from gguf-py's `GGML_QUANT_SIZES`; this table adds only what gguf-py
does not know: which Numba row kernels implement the type.
"""

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba.core.registry import CPUDispatcher

from rioquant.errors import QuantInputError
from rioquant.kernels import (
    iq1,
    iq1_m,
    iq2,
    iq3,
    iq4,
    legacy,
    legacy_affine,
    q2_k,
    q3_k,
    q4_k,
    q5_k,
    q6_k,
    q8_0,
)

T = GGMLQuantizationType


@dataclass(frozen=True)
class KernelPair:
    """Serial Numba row kernels (see rioquant.kernels.driver for their signatures)."""

    quantize_row: CPUDispatcher
    dequantize_row: CPUDispatcher


# One row per block type. F32/F16/BF16 are element types and are converted with numpy (see api.py).
BLOCK_KERNELS: dict[GGMLQuantizationType, KernelPair] = {
    T.Q8_0: KernelPair(q8_0.quantize_row_q8_0, q8_0.dequantize_row_q8_0),
    T.Q6_K: KernelPair(q6_k.quantize_row_q6_k, q6_k.dequantize_row_q6_k),
    T.Q3_K: KernelPair(q3_k.quantize_row_q3_k, q3_k.dequantize_row_q3_k),
    T.Q4_0: KernelPair(legacy.quantize_row_q4_0, legacy.dequantize_row_q4_0),  # row length not % 256
    T.Q5_0: KernelPair(legacy.quantize_row_q5_0, legacy.dequantize_row_q5_0),  # row length not % 256
    T.Q5_K: KernelPair(q5_k.quantize_row_q5_k, q5_k.dequantize_row_q5_k),
    T.Q4_K: KernelPair(q4_k.quantize_row_q4_k, q4_k.dequantize_row_q4_k),
    T.Q2_K: KernelPair(q2_k.quantize_row_q2_k, q2_k.dequantize_row_q2_k),
    T.Q5_1: KernelPair(legacy_affine.quantize_row_q5_1, legacy_affine.dequantize_row_q5_1),  # Q5_K's fallback
    T.IQ3_XXS: KernelPair(iq3.quantize_row_iq3_xxs, iq3.dequantize_row_iq3_xxs),
    T.IQ3_S: KernelPair(iq3.quantize_row_iq3_s, iq3.dequantize_row_iq3_s),
    T.IQ2_XXS: KernelPair(iq2.quantize_row_iq2_xxs, iq2.dequantize_row_iq2_xxs),
    T.IQ2_XS: KernelPair(iq2.quantize_row_iq2_xs, iq2.dequantize_row_iq2_xs),
    T.IQ2_S: KernelPair(iq2.quantize_row_iq2_s, iq2.dequantize_row_iq2_s),
    T.Q4_1: KernelPair(legacy_affine.quantize_row_q4_1, legacy_affine.dequantize_row_q4_1),  # row length not % 256
    T.IQ4_NL: KernelPair(iq4.quantize_row_iq4_nl, iq4.dequantize_row_iq4_nl),  # row length not % 256
    T.IQ4_XS: KernelPair(iq4.quantize_row_iq4_xs, iq4.dequantize_row_iq4_xs),
    T.IQ1_S: KernelPair(iq1.quantize_row_iq1_s, iq1.dequantize_row_iq1_s),
    T.IQ1_M: KernelPair(iq1_m.quantize_row_iq1_m, iq1_m.dequantize_row_iq1_m),
}

FLOAT_TYPES = (T.F32, T.F16, T.BF16)

# ggml's first block types (32 weights, one fp16 scale, or scale and min): kept for old runtimes, and
# beaten by K- and i-quants of the same size; also the fallbacks for rows that no 256-block fits
LEGACY_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1})

# Types quantized only with an importance matrix. ggml itself aborts without one for IQ2_XXS, IQ2_XS
# and IQ1_S (`ggml_quantize_requires_imatrix`); llama-quantize refuses the rest too
# (`tensor_requires_imatrix` in llama-quant.cpp), except on token_embd/output, which no mix gives
# these types. (It also demands one for Q2_K inside Q2_K_S: a mix rule, not a type rule.)
GGML_REQUIRES_IMATRIX = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S})

# The lattice i-quants score candidate grid points by weighted squared error in float32 (about
# importance·|x|³ summed over a group). Far past any real weight those sums overflow, ggml's neighbour
# search then finds no candidate and aborts the process (GGML_ASSERT in iq*_find_best_neighbour), so
# rioquant refuses rows beyond this magnitude for these types instead of writing bytes ggml never would.
LATTICE_TYPES = frozenset({T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S})
LATTICE_MAGNITUDE_LIMIT = 1e6
REQUIRES_IMATRIX = GGML_REQUIRES_IMATRIX | {T.IQ3_XXS, T.IQ2_S, T.IQ1_M}


def parse_qtype(qtype: "str | GGMLQuantizationType") -> GGMLQuantizationType:
    """Accept 'Q4_K', 'q4_k' or the enum; name the choices when the type is unknown."""
    if isinstance(qtype, GGMLQuantizationType):
        resolved = qtype
    else:
        try:
            resolved = GGMLQuantizationType[str(qtype).upper()]
        except KeyError:
            resolved = None
    if resolved is None or (resolved not in BLOCK_KERNELS and resolved not in FLOAT_TYPES):
        known = ", ".join(t.name for t in (*FLOAT_TYPES, *BLOCK_KERNELS))
        raise QuantInputError(f"unsupported tensor type {qtype!r}: rioquant writes {known}")
    return resolved


def block_geometry(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(weights per block, bytes per block), straight from gguf-py."""
    return GGML_QUANT_SIZES[qtype]
