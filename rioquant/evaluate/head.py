"""The output head, a slice of the vocabulary at a time: logits never exist for the whole vocabulary.

The output matrix stays in its stored form (`StoredRows`); each slice of VOCAB_SLICE rows is dequantized
just before its products and used at once, then every block of ROW_BLOCK scored rows is multiplied by it
and reduced while the logits are still in cache: a running max, a running Σexp (rescaled when the max
grows, accumulated in float64 as llama.cpp's double sum), the logit of each row's target and, for KLD
only, the argmax. Sizes: a slice's weights (2048 × H floats) and a block's logits (512 × 2048 floats, 4 MB,
half per thread on 2 cores) stay in L2, where dequantizing the whole matrix to float32 (254 MB at H 256,
4 GB for the 397B) and sweeping 512 × 8192 logits five times made the head memory-bound (1.8 s → 1.3 s
on the bench model); slices outside, rows inside, so each slice is dequantized once per pass.

KL divergence needs log p and log q of every token, so it takes two passes: the first gives both
log-sum-exps, the second the sum over base log p > −16 of p · ((z_base − z_quant) − (lse_base − lse_quant)),
the difference formed so that no digit is lost to the logits' size.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rioquant.evaluate.numerics import Numerics
from rioquant.evaluate.source import StoredRows

VOCAB_SLICE = 2048
ROW_BLOCK = 512
KLD_LOG_P_FLOOR = -16.0  # llama.cpp sums p·(log p − log q) only where the base log p > −16


@dataclass
class Scores:
    """Per row: float64 log Σ exp(z), the target's logit, the argmax (None unless asked for)."""

    lse: torch.Tensor
    target_logit: torch.Tensor
    argmax: torch.Tensor | None

    @property
    def nll(self) -> torch.Tensor:
        return self.lse - self.target_logit


class Reduction:
    """Online log-sum-exp, target logit and (optionally) argmax of rows, fed logits a block at a time."""

    def __init__(self, targets: torch.Tensor, with_argmax: bool) -> None:
        rows, device = targets.shape[0], targets.device
        self.targets = targets
        self.top = torch.full((rows,), -torch.inf, dtype=torch.float32, device=device)
        self.total = torch.zeros(rows, dtype=torch.float64, device=device)
        self.target_logit = torch.zeros(rows, dtype=torch.float64, device=device)
        self.argmax = torch.zeros(rows, dtype=torch.int64, device=device) if with_argmax else None

    def add(self, rows: slice, start: int, z: torch.Tensor) -> None:
        """Logits z (rows, n) of vocabulary ids start … start+n−1; z is overwritten."""
        targets = self.targets[rows]
        inside = (targets >= start) & (targets < start + z.shape[1])
        local = (targets - start).clamp(0, z.shape[1] - 1)
        self.target_logit[rows] += torch.where(inside, z.gather(1, local[:, None])[:, 0].double(), 0.0)
        top = self.top[rows]
        if self.argmax is None:
            slice_max = z.amax(dim=1)  # no index: a third of the cost of max with indices
        else:
            slice_max, slice_arg = z.max(dim=1)
            better = slice_max > top  # first maximum wins, as in llama.cpp's scan
            self.argmax[rows] = torch.where(better, slice_arg + start, self.argmax[rows])
        new_top = torch.maximum(top, slice_max)
        total = self.total[rows]
        total.mul_(torch.exp((top - new_top).double())).add_(z.sub_(new_top[:, None]).exp_().sum(dim=1).double())
        top.copy_(new_top)

    def result(self) -> Scores:
        return Scores(self.top.double() + torch.log(self.total), self.target_logit, self.argmax)


class OutputHead:
    """The output matrix (n_vocab, H) with the numerics that round its input."""

    def __init__(self, weight: StoredRows, numerics: Numerics, vocab_slice: int = VOCAB_SLICE) -> None:
        self.weight, self.numerics, self.vocab_slice = weight, numerics, vocab_slice

    def slices(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first vocabulary id, float32 rows of the output matrix) per slice, each dequantized on the spot."""
        n_vocab = self.weight.shape[0]
        for start in range(0, n_vocab, self.vocab_slice):
            yield start, self.weight.rows(start, min(n_vocab, start + self.vocab_slice))

    def scores(self, h: torch.Tensor, targets: torch.Tensor, with_argmax: bool = False) -> Scores:
        """Scores of rows h (rows, H) against their targets (rows,)."""
        x = self.numerics.input("output", h)
        reduction = Reduction(targets, with_argmax)
        buffer = _logits_buffer(x, self.vocab_slice)
        for start, w in self.slices():
            for rows, z in _blocks(x, w, buffer):
                reduction.add(rows, start, z)
        return reduction.result()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full float32 logits (..., n_vocab) of h (..., H): for checks on small models."""
        x = self.numerics.input("output", h)
        out = torch.empty(*x.shape[:-1], self.weight.shape[0], dtype=torch.float32, device=x.device)
        for start, w in self.slices():
            out[..., start : start + w.shape[0]] = x @ w.T
        return out


def _logits_buffer(x: torch.Tensor, vocab_slice: int) -> torch.Tensor:
    return torch.empty(min(ROW_BLOCK, x.shape[0]), vocab_slice, dtype=torch.float32, device=x.device)


def _blocks(x: torch.Tensor, w: torch.Tensor, buffer: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, their logits x[rows] · wᵀ) for each block of ROW_BLOCK rows; the logits live in `buffer`."""
    for s in range(0, x.shape[0], ROW_BLOCK):
        rows = slice(s, min(x.shape[0], s + ROW_BLOCK))
        z = buffer[: rows.stop - s, : w.shape[0]]
        torch.matmul(x[rows], w.T, out=z)
        yield rows, z


def kld_terms(base: OutputHead, h_base: torch.Tensor, quant: OutputHead, h_quant: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: KLD(base ‖ quant) over base log p > −16, Δp of the target, both NLLs, same argmax."""
    sb, sq = base.scores(h_base, targets, with_argmax=True), quant.scores(h_quant, targets, with_argmax=True)
    shift = (sb.lse - sq.lse).float()[:, None]
    lse_b = sb.lse.float()[:, None]
    kld = torch.zeros(targets.shape[0], dtype=torch.float64, device=targets.device)
    xb, xq = base.numerics.input("output", h_base), quant.numerics.input("output", h_quant)
    buf_b, buf_q = _logits_buffer(xb, base.vocab_slice), _logits_buffer(xq, quant.vocab_slice)
    for (_, wb), (_, wq) in zip(base.slices(), quant.slices(), strict=True):
        for (rows, zb), (_, zq) in zip(_blocks(xb, wb, buf_b), _blocks(xq, wq, buf_q), strict=True):
            log_p = zb - lse_b[rows]
            terms = log_p.exp() * (zb.sub_(zq).sub_(shift[rows]))  # p · (log p − log q)
            kld[rows] += torch.where(log_p > KLD_LOG_P_FLOOR, terms, 0.0).sum(dim=1, dtype=torch.float64)
    nll_b, nll_q = sb.nll, sq.nll
    return {"kld": kld, "p_diff": torch.exp(-nll_q) - torch.exp(-nll_b), "nll_q": nll_q, "nll_base": nll_b,
            "same_top": sb.argmax == sq.argmax}


def scores_from_logits(logits: torch.Tensor, targets: torch.Tensor, vocab_slice: int = VOCAB_SLICE) -> Scores:
    """The same reduction over logits computed elsewhere (llama.cpp's, in the benchmark); not modified."""
    reduction = Reduction(targets, with_argmax=False)
    buffer = torch.empty(logits.shape[0], vocab_slice, dtype=torch.float32)
    for start in range(0, logits.shape[1], vocab_slice):
        z = buffer[:, : min(vocab_slice, logits.shape[1] - start)]
        z.copy_(logits[:, start : start + z.shape[1]])
        reduction.add(slice(None), start, z)
    return reduction.result()
