"""The qwen35moe text model's forward pass in PyTorch, on a batch of independent chunks, one layer at a time.

The math is llama.cpp's (src/models/qwen35moe.cpp, delta-net-base.cpp), on weights under GGUF names
and layouts (norms already +1, A = -exp(A_log), V heads in tiled order), all in float32:

- full attention: q_proj gives query and gate per head; RMS q/k norms; interleaved multi-section RoPE
  (IMROPE) on the first n_rot dims in NeoX pairing, with text positions as llama.cpp fills them
  (t = h = w = position, e = 0); causal softmax attention with grouped KV heads; output × sigmoid(gate).
- Gated DeltaNet: causal depthwise conv + SiLU on [q k v], L2-normalised q and k (eps as rms eps),
  K heads tiled over the V heads (head h reads K head h mod n_k), g = softplus(a + dt_bias)·A,
  β = sigmoid(b); the delta rule in its chunked (WY) form, checked against the per-token recurrence;
  gated RMSNorm norm(o)·w·silu(z).
- MoE: router softmax → top-k → renormalise; SiLU experts; shared expert × sigmoid(its gate).

An `Observer` sees the input of every weight matrix (what llama-imatrix collects); MTP is not run.
"""

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as nnf

from rioquant.evaluate.numerics import EXACT, Numerics
from rioquant.export.qwen35moe import ModelArgs, is_linear_block

DELTA_CHUNK = 64  # positions per chunk of the chunked delta rule, as llama.cpp's


class Observer(Protocol):
    """Receives the input rows of each weight matrix: dense (rows, n_per_row), or those of one expert."""

    def dense(self, kind: str, x: torch.Tensor) -> None: ...

    def expert(self, kind: str, e: int, x: torch.Tensor) -> None: ...


class _NoObserver:
    def dense(self, kind: str, x: torch.Tensor) -> None:
        pass

    def expert(self, kind: str, e: int, x: torch.Tensor) -> None:
        pass


NO_OBSERVER = _NoObserver()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last axis (the weight already holds Qwen's +1)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(Σx² + eps): llama.cpp's rms_norm(x, eps/n)/sqrt(n), transformers' l2norm."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------
# rotary position embedding


def rope_angles(n_pos: int, n_rot: int, base: float, sections: tuple[int, int, int, int]) -> np.ndarray:
    """float32 (n_pos, n_rot/2) angles of ggml's IMROPE for text positions 0..n_pos-1.

    Pair i takes the position of its section (t, h or w: all equal to the token position for text;
    e: 0 for text) and frequency base^(-2i/n_rot), built by repeated float32 multiplication as
    ggml_mrope_cache_init does.
    """
    s_t, s_h, s_w, _ = sections
    sect_dims = sum(sections)
    theta_scale = np.float32(base) ** np.float32(-2.0 / n_rot)
    positions = np.arange(n_pos, dtype=np.float32)
    theta = positions.copy()
    angles = np.empty((n_pos, n_rot // 2), dtype=np.float32)
    for i in range(n_rot // 2):
        sector = i % sect_dims
        in_section = (
            (sector % 3 == 1 and sector < 3 * s_h)
            or (sector % 3 == 2 and sector < 3 * s_w)
            or (sector % 3 == 0 and sector < 3 * s_t)
        )
        angles[:, i] = theta if in_section else 0.0  # the e section: position 0 for text
        theta = theta * theta_scale
    return angles


class Rope:
    """cos/sin tables for one sequence length, applied to (B, T, heads, head_dim) tensors."""

    def __init__(self, n_pos: int, a: ModelArgs, sections: tuple[int, int, int, int], device: torch.device) -> None:
        self.n_rot = int(a.head_dim * a.partial_rotary_factor)
        angles = torch.from_numpy(rope_angles(n_pos, self.n_rot, a.rope_theta, sections))
        self.cos = torch.cos(angles).to(device)[None, :, None, :]  # (1, T, 1, n_rot/2)
        self.sin = torch.sin(angles).to(device)[None, :, None, :]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        half = self.n_rot // 2
        x0, x1, rest = x[..., :half], x[..., half : self.n_rot], x[..., self.n_rot :]
        return torch.cat([x0 * self.cos - x1 * self.sin, x0 * self.sin + x1 * self.cos, rest], dim=-1)


# ---------------------------------------------------------------------------------------------
# gated full attention


def _mm(num: Numerics, kind: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x · weightᵀ, x rounded as the numerics convert it for a weight of that kind."""
    return nnf.linear(num.input(kind, x), weight)


def _products(num: Numerics, kinds: tuple[str, ...], x: torch.Tensor, w: dict) -> list[torch.Tensor]:
    """x · wᵀ for the weights of `kinds`, which share the input x: it is rounded once per distinct rounding."""
    return [nnf.linear(xr, w[kind]) for kind, xr in zip(kinds, num.inputs(kinds, x), strict=True)]


def full_attention(h: torch.Tensor, w: dict, a: ModelArgs, rope: Rope, obs: Observer,
                   num: Numerics = EXACT) -> torch.Tensor:
    B, T, _ = h.shape
    nh, nkv, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    rows = h.reshape(-1, h.shape[-1])
    for kind in ("attn_q", "attn_k", "attn_v"):
        obs.dense(kind, rows)
    qg, k, v = _products(num, ("attn_q", "attn_k", "attn_v"), h, w)
    qg = qg.view(B, T, nh, 2 * hd)  # per head: [query | gate]
    q = rms_norm(qg[..., :hd], w["attn_q_norm"], a.rms_norm_eps)
    gate = qg[..., hd:].reshape(B, T, nh * hd)
    k = rms_norm(k.view(B, T, nkv, hd), w["attn_k_norm"], a.rms_norm_eps)
    v = v.view(B, T, nkv, hd)
    q, k = rope(q), rope(k)
    o = num.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1.0 / math.sqrt(hd))  # (B, nh, T, hd)
    o = o.transpose(1, 2).reshape(B, T, nh * hd) * torch.sigmoid(gate)
    obs.dense("attn_output", o.reshape(-1, o.shape[-1]))
    return _mm(num, "attn_output", o, w["attn_output"])


# ---------------------------------------------------------------------------------------------
# Gated DeltaNet


def delta_rule_recurrent(q, k, v, g, beta):
    """The reference: one token at a time. q, k (B, H, T, dk); v (B, H, T, dv); g, beta (B, H, T).

    S ← exp(g_t)·S;  u = β_t (v_t − Sᵀk_t);  S ← S + k_t uᵀ;  o_t = Sᵀ q_t   (S: dk × dv per head)
    """
    B, H, T, dk = k.shape
    S = torch.zeros(B, H, dk, v.shape[-1], dtype=v.dtype, device=v.device)
    out = torch.empty_like(v)
    for t in range(T):
        S = S * torch.exp(g[:, :, t])[..., None, None]
        kt = k[:, :, t]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., :, None] * u[..., None, :]
        out[:, :, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, :, t])
    return out


def delta_rule_chunked(q, k, v, g, beta, chunk: int = DELTA_CHUNK):
    """The same recurrence, C positions at a time (same arguments and result as delta_rule_recurrent).

    Within a chunk with cumulative log-decay Γ and entry state S₀, the corrections u_s solve the
    unit lower-triangular system (I + A) U = Vβ − (Kβ ⊙ e^Γ) S₀, A[t,s] = β_t e^(Γ_t−Γ_s) k_t·k_s
    (s < t), so U = W_v − W_k S₀ with W_v, W_k independent of S₀ and solved for all chunks at once;
    then O = (Q ⊙ e^Γ) S₀ + (M ⊙ QKᵀ) U with M[t,s] = e^(Γ_t−Γ_s) (s ≤ t), and
    S_C = e^(Γ_C) S₀ + (K ⊙ e^(Γ_C−Γ))ᵀ U. Only the last step runs chunk after chunk.
    Γ and its differences are formed in float64: Γ reaches −10³ inside a chunk, where float32
    differences would lose the decays between neighbours.
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:  # padded positions have β = 0 (no update) and g = 0 (no decay)
        q, k, v = (nnf.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (nnf.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // chunk
    q, k = q.reshape(B, H, n, chunk, dk), k.reshape(B, H, n, chunk, dk)
    v = v.reshape(B, H, n, chunk, dv)
    beta = beta.reshape(B, H, n, chunk, 1)
    G = g.reshape(B, H, n, chunk).double().cumsum(-1)  # Γ, (B, H, n, C)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, -math.inf).to(q.dtype).exp()  # M
    k_beta = k * beta
    strictly_causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    A = (k_beta @ k.transpose(-1, -2) * decay).masked_fill(~strictly_causal, 0.0)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    eG = G.to(q.dtype).exp()[..., None]
    W = torch.linalg.solve_triangular(A + eye, torch.cat([v * beta, k_beta * eG], dim=-1), upper=False,
                                      unitriangular=True)
    W_v, W_k = W[..., :dv], W[..., dv:]
    qk = q @ k.transpose(-1, -2) * decay  # (B, H, n, C, C), zero above the diagonal
    q_decayed = q * eG
    k_tail = k * (G[..., -1:] - G).to(q.dtype).exp()[..., None]
    chunk_decay = G[..., -1].to(q.dtype).exp()[..., None, None]  # (B, H, n, 1, 1)
    S = torch.zeros(B, H, dk, dv, dtype=q.dtype, device=q.device)
    out = torch.empty_like(v)
    for i in range(n):
        U = W_v[:, :, i] - W_k[:, :, i] @ S  # (B, H, C, dv)
        out[:, :, i] = q_decayed[:, :, i] @ S + qk[:, :, i] @ U
        S = S * chunk_decay[:, :, i] + k_tail[:, :, i].transpose(-1, -2) @ U
    return out.reshape(B, H, n * chunk, dv)[:, :, :T]


def gated_delta_net(h: torch.Tensor, w: dict, a: ModelArgs, obs: Observer, num: Numerics = EXACT) -> torch.Tensor:
    B, T, _ = h.shape
    nk, nv, dk, dv = a.linear_num_key_heads, a.linear_num_value_heads, a.linear_key_head_dim, a.linear_value_head_dim
    rows = h.reshape(-1, h.shape[-1])
    kinds = ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha")
    for kind in kinds:
        obs.dense(kind, rows)
    qkv, z, beta, alpha = _products(num, kinds, h, w)  # qkv: (B, T, conv_dim)
    z = z.view(B, T, nv, dv)
    beta = torch.sigmoid(beta)  # (B, T, nv)
    g = nnf.softplus(alpha + w["ssm_dt"]) * w["ssm_a"]
    # causal depthwise conv over time: out[t] = Σ_j w[j]·x[t-K+1+j]
    kernel = w["ssm_conv1d"]  # (conv_dim, K)
    x = nnf.pad(qkv.transpose(1, 2), (kernel.shape[1] - 1, 0))
    qkv = nnf.silu(nnf.conv1d(x, kernel.unsqueeze(1), groups=kernel.shape[0])).transpose(1, 2)
    key_dim = nk * dk
    q = l2_norm(qkv[..., :key_dim].reshape(B, T, nk, dk), a.rms_norm_eps)
    k = l2_norm(qkv[..., key_dim : 2 * key_dim].reshape(B, T, nk, dk), a.rms_norm_eps)
    v = qkv[..., 2 * key_dim :].reshape(B, T, nv, dv)
    q = q.repeat(1, 1, nv // nk, 1) / math.sqrt(dk)  # tiled: V head h reads K head h mod nk
    k = k.repeat(1, 1, nv // nk, 1)
    o = delta_rule_chunked(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           g.transpose(1, 2), beta.transpose(1, 2)).transpose(1, 2)  # (B, T, nv, dv)
    o = (rms_norm(o, w["ssm_norm"], a.rms_norm_eps) * nnf.silu(z)).reshape(B, T, nv * dv)
    obs.dense("ssm_out", o.reshape(-1, o.shape[-1]))
    return _mm(num, "ssm_out", o, w["ssm_out"])


# ---------------------------------------------------------------------------------------------
# mixture of experts


def moe(x: torch.Tensor, w: dict, a: ModelArgs, obs: Observer, num: Numerics = EXACT) -> torch.Tensor:
    """x (N, H) → (N, H): routed experts plus the gated shared expert.

    The roundings are row by row, so x is rounded once for all experts' gate/up products and all experts'
    activations at once for their down products (per expert, rounding ran 48 times a layer)."""
    for kind in ("ffn_gate_inp", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp"):
        obs.dense(kind, x)
    probs = torch.softmax(_mm(num, "ffn_gate_inp", x, w["ffn_gate_inp"]), dim=-1)  # (N, E)
    top_w, top_e = probs.topk(a.num_experts_per_tok, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    flat = top_e.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // a.num_experts_per_tok  # (token, expert) pairs grouped by expert
    weights = top_w.reshape(-1)[order, None]
    counts = torch.bincount(flat, minlength=a.num_experts).tolist()
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    segments = [(e, slice(s, s + c)) for e, (s, c) in enumerate(zip(starts, counts, strict=True)) if c]
    gate_exps, up_exps, down_exps = w["ffn_gate_exps"], w["ffn_up_exps"], w["ffn_down_exps"]
    gate_in, up_in = num.inputs(("ffn_gate_exps", "ffn_up_exps"), x)
    act = torch.empty(len(tokens), gate_exps.shape[1], dtype=x.dtype, device=x.device)
    for e, seg in segments:
        rows = tokens[seg]
        xe = x[rows]
        obs.expert("ffn_gate_exps", e, xe)
        obs.expert("ffn_up_exps", e, xe)
        xg = xe if gate_in is x else gate_in[rows]
        xu = xg if up_in is gate_in else up_in[rows]
        act[seg] = nnf.silu(nnf.linear(xg, gate_exps.expert(e))) * nnf.linear(xu, up_exps.expert(e))
    down_in = num.input("ffn_down_exps", act)
    out = torch.zeros_like(x)
    for e, seg in segments:
        obs.expert("ffn_down_exps", e, act[seg])
        out.index_add_(0, tokens[seg], nnf.linear(down_in[seg], down_exps.expert(e)) * weights[seg])
    shexp_gate, shexp_up = _products(num, ("ffn_gate_shexp", "ffn_up_shexp"), x, w)
    act = nnf.silu(shexp_gate) * shexp_up
    obs.dense("ffn_down_shexp", act)
    shared_gate = torch.sigmoid(_mm(num, "ffn_gate_inp_shexp", x, w["ffn_gate_inp_shexp"].reshape(-1, x.shape[-1])))
    return out + _mm(num, "ffn_down_shexp", act, w["ffn_down_shexp"]) * shared_gate  # shared gate: (N, 1)


# ---------------------------------------------------------------------------------------------


def decoder_layer(x: torch.Tensor, w: dict, a: ModelArgs, il: int, rope: Rope, obs: Observer = NO_OBSERVER,
                  num: Numerics = EXACT) -> torch.Tensor:
    """One block on (B, T, H) chunks: attention (full or linear) and MoE, each with its residual."""
    h = rms_norm(x, w["attn_norm"], a.rms_norm_eps)
    mix = gated_delta_net(h, w, a, obs, num) if is_linear_block(a, il) else full_attention(h, w, a, rope, obs, num)
    x = x + mix
    h = rms_norm(x, w["post_attention_norm"], a.rms_norm_eps)
    return x + moe(h.reshape(-1, h.shape[-1]), w, a, obs, num).view_as(x)
