"""How the forward pass rounds: exact float32, or as ggml's CPU backend does (`--numerics ggml`).

Exact: every matrix product is float32 × the dequantized float32 weight; attention is float32. This
measures the quantized weights alone.

ggml: what llama.cpp's CPU backend computes (and so what llama-perplexity and llama-imatrix report).
Before a product with a weight of type T, ggml converts the activations to T's `vec_dot_type`
(ggml-cpu.c `type_traits_cpu`): Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL (blocks of 32, scale amax/127 stored as
F16), Q8_1 for Q4_1/Q5_1, Q8_K for the K and most IQ types (blocks of 256, scale -max/127 in F32), F16
or BF16 for those weights, nothing for F32. The KV cache holds F16, the query is converted to F16 for
QKᵀ and the softmax output to F16 for the product with V (the non-flash-attention path that
llama-cpp-python takes by default). Every kernel llama.cpp picks for a product rounds this way (llamafile's
tinyBLAS takes F16/BF16 weights on x86 only with F16/BF16 activations; the tiled K-quant kernels use the
same quantize_row_q8_K): each product, fed llama.cpp's own input, equals llama.cpp's to float32 summation
order (tests/test_evaluate.py). On tiny random models these roundings move perplexity by a few per cent,
up to 20 % with logits far from uniform; on trained models by far less.
"""

import math
from typing import Protocol

import torch
import torch.nn.functional as nnf
from gguf import GGMLQuantizationType

# weight type name → the type ggml converts the other operand to ("F32": no conversion)
VEC_DOT_TYPE: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K",
    "IQ1_S": "Q8_K", "IQ1_M": "Q8_K", "IQ4_XS": "Q8_K", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
}


def _divide(numerator: float, x: torch.Tensor) -> torch.Tensor:
    """numerator / x as an IEEE float32 division (torch's `scalar / tensor` multiplies by a reciprocal)."""
    return torch.div(torch.full_like(x, numerator), x)


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml-cpu's quantize_row_q8_0 (x86) then dequantize: blocks of 32, q = round(x·127/amax) half to even,
    value q · F16(amax/127). One new tensor, the rest in place: these roundings run before every product."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax != 0, _divide(127.0, amax), torch.zeros_like(amax))
    q = torch.mul(b, inv).round_().add_(0.0)  # + 0.0: an int8 has no −0
    return q.mul_((amax / 127.0).half().float()).reshape(x.shape)


def signed_absmax(b: torch.Tensor) -> torch.Tensor:
    """Per row (keepdim), the value of largest magnitude, the first one when +m and −m tie (ggml's scan)."""
    low, high = b.amin(dim=1, keepdim=True), b.amax(dim=1, keepdim=True)  # aminmax: 4× slower on CPU
    out = torch.where(high >= -low, high, low)
    tied = ((high == -low) & (high != 0)).nonzero()[:, 0]
    if tied.numel():  # rare: +m and −m in one block; argmax gives the first
        rows = b[tied]
        out[tied] = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return out


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K then dequantize: blocks of 256, the signed value of largest magnitude → −127,
    d = 1/iscale in F32."""
    b = x.reshape(-1, 256)
    signed_max = signed_absmax(b)
    nonzero = signed_max != 0
    iscale = torch.where(nonzero, _divide(-127.0, signed_max), torch.zeros_like(signed_max))
    d = torch.where(nonzero, _divide(1.0, iscale), torch.zeros_like(iscale))
    q = torch.mul(b, iscale).round_().clamp_(max=127).add_(0.0)
    return q.mul_(d).reshape(x.shape)


ROUNDERS = {
    "F16": lambda x: x.half().float(),
    "BF16": lambda x: x.bfloat16().float(),
    "Q8_0": round_q8_0,
    "Q8_1": round_q8_0,  # same values; Q8_1 adds the block sum for the weights' minimum
    "Q8_K": round_q8_k,
}
BLOCK = {"Q8_0": 32, "Q8_1": 32, "Q8_K": 256}


class Numerics(Protocol):
    """How the forward pass rounds: the input of each weight's matmul, and attention."""

    name: str

    def input(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """x as the matmul by the weight of `kind` sees it."""
        ...

    def inputs(self, kinds: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """x as the matmuls by the weights of `kinds` see it, rounded once per distinct rounding (the weights
        that share an input, q/k/v or gate/up, mostly share a type too)."""
        ...

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention, (B, heads, T, d) with KV heads grouped: query head i reads KV head i // r."""
        ...


class ExactNumerics:
    """float32 throughout."""

    name = "exact"

    def input(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def inputs(self, kinds: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
        return [x] * len(kinds)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention, (B, heads, T, d) with KV heads grouped: query head i reads KV head i // r."""
        return nnf.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


class GgmlNumerics:
    """ggml-cpu's roundings, given the stored type of each weight of the layer (by kind)."""

    name = "ggml"

    def __init__(self, weight_types: dict[str, GGMLQuantizationType]) -> None:
        self.rounders = {}
        for kind, qtype in weight_types.items():
            dot_type = VEC_DOT_TYPE.get(qtype.name, "F32")
            if dot_type != "F32":
                self.rounders[kind] = (ROUNDERS[dot_type], BLOCK.get(dot_type, 1))

    def input(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        rounder = self.rounders.get(kind)
        if rounder is None or x.shape[-1] % rounder[1]:
            return x
        return rounder[0](x)

    def inputs(self, kinds: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
        rounded: dict = {}
        for kind in kinds:
            rounding = self.rounders.get(kind)
            if rounding not in rounded:
                rounded[rounding] = self.input(kind, x)
        return [rounded[self.rounders.get(kind)] for kind in kinds]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        r = q.shape[1] // k.shape[1]
        k = k.half().float().repeat_interleave(r, dim=1)  # F16 KV cache
        v = v.half().float().repeat_interleave(r, dim=1)
        scores = (q.half().float() @ k.transpose(-1, -2)) * scale  # Q converted to F16 for QKᵀ
        T = q.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        return probs.half().float() @ v  # softmax output converted to F16 for the product with V


EXACT = ExactNumerics()
NUMERICS = ("exact", "ggml")
