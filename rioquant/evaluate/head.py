"""The output head, a slice of the vocabulary at a time: logits never exist for the whole vocabulary.

For a block of rows, each slice of the output matrix (VOCAB_SLICE rows of it) gives logits that stay in
cache while they are reduced: a running max, a running Σexp (rescaled when the max grows, accumulated
in float64 as llama.cpp's double sum), the argmax and the logit of each row's target. Materialising
rows × 248K logits and sweeping them several times is what made the head memory-bound.

KL divergence needs log p and log q of every token, so it takes two sweeps: the first gives both
log-sum-exps, the second the sum over base log p > −16 of p · ((z_base − z_quant) − (lse_base − lse_quant)),
the difference formed so that no digit is lost to the logits' size.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from rioquant.evaluate.numerics import Numerics

VOCAB_SLICE = 8192
KLD_LOG_P_FLOOR = -16.0  # llama.cpp sums p·(log p − log q) only where the base log p > −16


@dataclass
class Scores:
    """Per row: float64 log Σ exp(z), the target's logit, the argmax."""

    lse: torch.Tensor
    target_logit: torch.Tensor
    argmax: torch.Tensor

    @property
    def nll(self) -> torch.Tensor:
        return self.lse - self.target_logit


class OutputHead:
    """output (n_vocab, H) float32 with the numerics that round its input."""

    def __init__(self, weight: torch.Tensor, numerics: Numerics, vocab_slice: int = VOCAB_SLICE) -> None:
        self.weight, self.numerics, self.vocab_slice = weight, numerics, vocab_slice

    def slices(self, h: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first vocabulary id, logits (rows, slice)) for rows h (rows, H); the buffer is reused."""
        x = self.numerics.input("output", h)
        buffer = torch.empty(h.shape[0], self.vocab_slice, dtype=torch.float32, device=h.device)
        for start in range(0, self.weight.shape[0], self.vocab_slice):
            w = self.weight[start : start + self.vocab_slice]
            out = buffer[:, : w.shape[0]]
            torch.matmul(x, w.T, out=out)
            yield start, out

    def scores(self, h: torch.Tensor, targets: torch.Tensor) -> Scores:
        return reduce_slices(self.slices(h), targets)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return nnf.linear(self.numerics.input("output", h), self.weight)


def reduce_slices(slices: Iterator[tuple[int, torch.Tensor]], targets: torch.Tensor) -> Scores:
    """Online log-sum-exp, argmax and target logit over vocabulary slices (each slice is overwritten)."""
    rows = targets.shape[0]
    device = targets.device
    top = torch.full((rows,), -torch.inf, dtype=torch.float32, device=device)
    argmax = torch.zeros(rows, dtype=torch.int64, device=device)
    total = torch.zeros(rows, dtype=torch.float64, device=device)
    target_logit = torch.zeros(rows, dtype=torch.float64, device=device)
    for start, z in slices:
        inside = (targets >= start) & (targets < start + z.shape[1])
        local = (targets - start).clamp(0, z.shape[1] - 1)
        target_logit += torch.where(inside, z.gather(1, local[:, None])[:, 0].double(), 0.0)
        slice_max, slice_arg = z.max(dim=1)
        better = slice_max > top  # first maximum wins, as in llama.cpp's scan
        argmax = torch.where(better, slice_arg + start, argmax)
        new_top = torch.maximum(top, slice_max)
        total = total * torch.exp((top - new_top).double()) + z.sub_(new_top[:, None]).exp_().sum(dim=1).double()
        top = new_top
    return Scores(top.double() + torch.log(total), target_logit, argmax)


def kld_terms(base: OutputHead, h_base: torch.Tensor, quant: OutputHead, h_quant: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: KLD(base ‖ quant) over base log p > −16, Δp of the target, both NLLs, same argmax."""
    sb, sq = base.scores(h_base, targets), quant.scores(h_quant, targets)
    shift = (sb.lse - sq.lse).float()[:, None]
    lse_b = sb.lse.float()[:, None]
    kld = torch.zeros(targets.shape[0], dtype=torch.float64, device=targets.device)
    for (_, zb), (_, zq) in zip(base.slices(h_base), quant.slices(h_quant), strict=True):
        log_p = zb - lse_b
        terms = log_p.exp() * (zb.sub_(zq).sub_(shift))  # p · (log p − log q)
        kld += torch.where(log_p > KLD_LOG_P_FLOOR, terms, 0.0).sum(dim=1, dtype=torch.float64)
    nll_b, nll_q = sb.nll, sq.nll
    return {"kld": kld, "p_diff": torch.exp(-nll_q) - torch.exp(-nll_b), "nll_q": nll_q, "nll_base": nll_b,
            "same_top": sb.argmax == sq.argmax}


def scores_from_logits(logits: torch.Tensor, targets: torch.Tensor, vocab_slice: int = VOCAB_SLICE) -> Scores:
    """The same reduction over logits computed elsewhere (llama.cpp's, in the benchmark); not modified."""
    buffer = torch.empty(logits.shape[0], vocab_slice, dtype=torch.float32)

    def slices():
        for start in range(0, logits.shape[1], vocab_slice):
            out = buffer[:, : min(vocab_slice, logits.shape[1] - start)]
            out.copy_(logits[:, start : start + out.shape[1]])
            yield start, out

    return reduce_slices(slices(), targets)
