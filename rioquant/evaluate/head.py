"""The output head, a slice of the vocabulary at a time: logits never exist for the whole vocabulary.

The output matrix stays in its stored form (`StoredRows`). Each slice of VOCAB_SLICE rows is dequantized
just before its products, multiplied by every block of ROW_BLOCK scored rows and reduced while the logits
are still in cache: per row the slice's max, float64 Σexp(z − max), the target's logit and, for KLD only,
the argmax (`slice_scores`); the slices' results are then merged in vocabulary order (`Reduction`, as
llama.cpp's double sum). Sizes: a slice's weights (2048 × H floats) and a block's logits (256 × 2048
floats, 2 MB) stay in one core's L2, where dequantizing the whole matrix to float32 (254 MB at H 256, 4 GB
for the 397B) and sweeping 512 × 8192 logits five times made the head memory-bound (1.8 s → 1.3 s on the
bench model). On CPU the slices are the unit of parallel work (`map_slices`).

KL divergence needs log p and log q of every token, so it takes two passes: the first gives both
log-sum-exps, the second the sum over base log p > −16 of p · ((z_base − z_quant) − (lse_base − lse_quant)),
the difference formed so that no digit is lost to the logits' size."""

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numba
import torch

from rioquant.evaluate.numerics import Numerics
from rioquant.evaluate.source import StoredRows

T = TypeVar("T")

VOCAB_SLICE = 2048
ROW_BLOCK = 256
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


@dataclass
class SliceScores:
    """One vocabulary slice reduced, per row: its max, float64 Σ exp(z − max), the target's logit where the
    target falls in the slice (else 0), the argmax (vocabulary id, or None)."""

    top: torch.Tensor
    total: torch.Tensor
    target_logit: torch.Tensor
    argmax: torch.Tensor | None


def slice_scores(start: int, blocks: Iterator[tuple[slice, torch.Tensor]], targets: torch.Tensor,
                 with_argmax: bool) -> SliceScores:
    """Reduce the logits of vocabulary ids start … start+n−1, given a block of rows at a time (overwritten)."""
    rows, device = targets.shape[0], targets.device
    out = SliceScores(torch.empty(rows, dtype=torch.float32, device=device),
                      torch.empty(rows, dtype=torch.float64, device=device),
                      torch.zeros(rows, dtype=torch.float64, device=device),
                      torch.empty(rows, dtype=torch.int64, device=device) if with_argmax else None)
    for block, z in blocks:
        t = targets[block]
        inside = (t >= start) & (t < start + z.shape[1])
        local = (t - start).clamp(0, z.shape[1] - 1)
        out.target_logit[block] = torch.where(inside, z.gather(1, local[:, None])[:, 0].double(), 0.0)
        if with_argmax:
            top, arg = z.max(dim=1)  # the first maximum, as llama.cpp's scan
            out.argmax[block] = arg + start
        else:
            top = z.amax(dim=1)  # no index: a third of the cost of max with indices
        out.top[block] = top
        out.total[block] = z.sub_(top[:, None]).exp_().sum(dim=1).double()
    return out


class Reduction:
    """Slices' scores merged in vocabulary order: the running max, Σexp rescaled to it (float64), the target's
    logit and the first argmax."""

    def __init__(self, rows: int, device: torch.device, with_argmax: bool) -> None:
        self.top = torch.full((rows,), -torch.inf, dtype=torch.float32, device=device)
        self.total = torch.zeros(rows, dtype=torch.float64, device=device)
        self.target_logit = torch.zeros(rows, dtype=torch.float64, device=device)
        self.argmax = torch.zeros(rows, dtype=torch.int64, device=device) if with_argmax else None

    def add(self, s: SliceScores) -> None:
        new_top = torch.maximum(self.top, s.top)
        self.total = self.total * torch.exp((self.top - new_top).double()) + s.total * torch.exp((s.top - new_top).double())
        self.target_logit += s.target_logit
        if self.argmax is not None:
            self.argmax = torch.where(s.top > self.top, s.argmax, self.argmax)  # an earlier slice wins a tie
        self.top = new_top

    def result(self) -> Scores:
        return Scores(self.top.double() + torch.log(self.total), self.target_logit, self.argmax)


def map_slices(fn: Callable[[int], T], starts: range, device: torch.device) -> Iterator[T]:
    """fn(start) for each vocabulary slice, in order. On CPU the slices are shared out among torch's threads,
    each slice run single-threaded by whichever thread is free: on cores shared with other processes a slowed
    thread then takes fewer slices, where a product split evenly over the threads (MKL's) waits for the slowest.
    Each slice's result is the same whichever thread computes it, and they are merged in order."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield from map(fn, starts)
        return

    def single_threaded() -> None:
        torch.set_num_threads(1)
        numba.set_num_threads(1)

    numba_threads = numba.get_num_threads()
    single_threaded()
    try:
        with ThreadPoolExecutor(threads, initializer=single_threaded) as pool:
            yield from pool.map(fn, starts)
    finally:
        torch.set_num_threads(threads)
        numba.set_num_threads(numba_threads)


class OutputHead:
    """The output matrix (n_vocab, H) with the numerics that round its input."""

    def __init__(self, weight: StoredRows, numerics: Numerics, vocab_slice: int = VOCAB_SLICE) -> None:
        self.weight, self.numerics, self.vocab_slice = weight, numerics, vocab_slice
        self.starts = range(0, weight.shape[0], vocab_slice)

    def rows(self, start: int) -> torch.Tensor:
        """float32 rows of the output matrix for the slice at `start`, dequantized on the spot."""
        return self.weight.rows(start, min(self.weight.shape[0], start + self.vocab_slice))

    def scores(self, h: torch.Tensor, targets: torch.Tensor, with_argmax: bool = False) -> Scores:
        """Scores of rows h (rows, H) against their targets (rows,)."""
        x = self.numerics.input("output", h)

        def one_slice(start: int) -> SliceScores:
            return slice_scores(start, _blocks(x, self.rows(start)), targets, with_argmax)

        reduction = Reduction(x.shape[0], x.device, with_argmax)
        for s in map_slices(one_slice, self.starts, x.device):
            reduction.add(s)
        return reduction.result()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full float32 logits (..., n_vocab) of h (..., H): for checks on small models."""
        x = self.numerics.input("output", h)
        out = torch.empty(*x.shape[:-1], self.weight.shape[0], dtype=torch.float32, device=x.device)
        for start in self.starts:
            w = self.rows(start)
            out[..., start : start + w.shape[0]] = x @ w.T
        return out


def _blocks(x: torch.Tensor, w: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, their logits x[rows] · wᵀ) for each block of ROW_BLOCK rows, in one buffer reused."""
    buffer = torch.empty(min(ROW_BLOCK, x.shape[0]), w.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], ROW_BLOCK):
        rows = slice(s, min(x.shape[0], s + ROW_BLOCK))
        z = buffer[: rows.stop - s]
        torch.matmul(x[rows], w.T, out=z)
        yield rows, z


def kld_terms(base: OutputHead, h_base: torch.Tensor, quant: OutputHead, h_quant: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: KLD(base ‖ quant) over base log p > −16, Δp of the target, both NLLs, same argmax."""
    sb, sq = base.scores(h_base, targets, with_argmax=True), quant.scores(h_quant, targets, with_argmax=True)
    shift = (sb.lse - sq.lse).float()[:, None]
    lse_b = sb.lse.float()[:, None]
    xb, xq = base.numerics.input("output", h_base), quant.numerics.input("output", h_quant)

    def one_slice(start: int) -> torch.Tensor:
        kld = torch.empty(targets.shape[0], dtype=torch.float64, device=targets.device)
        for (rows, zb), (_, zq) in zip(_blocks(xb, base.rows(start)), _blocks(xq, quant.rows(start)), strict=True):
            log_p = zb - lse_b[rows]
            terms = log_p.exp() * (zb.sub_(zq).sub_(shift[rows]))  # p · (log p − log q)
            kld[rows] = torch.where(log_p > KLD_LOG_P_FLOOR, terms, 0.0).sum(dim=1, dtype=torch.float64)
        return kld

    kld = torch.zeros(targets.shape[0], dtype=torch.float64, device=targets.device)
    for part in map_slices(one_slice, base.starts, xb.device):
        kld += part
    nll_b, nll_q = sb.nll, sq.nll
    return {"kld": kld, "p_diff": torch.exp(-nll_q) - torch.exp(-nll_b), "nll_q": nll_q, "nll_base": nll_b,
            "same_top": sb.argmax == sq.argmax}


def scores_from_logits(logits: torch.Tensor, targets: torch.Tensor, vocab_slice: int = VOCAB_SLICE) -> Scores:
    """The same reduction over logits computed elsewhere (llama.cpp's, in the benchmark); not modified."""
    reduction = Reduction(logits.shape[0], logits.device, with_argmax=False)
    buffer = torch.empty(logits.shape[0], vocab_slice, dtype=torch.float32)
    for start in range(0, logits.shape[1], vocab_slice):
        z = buffer[:, : min(vocab_slice, logits.shape[1] - start)]
        z.copy_(logits[:, start : start + z.shape[1]])
        reduction.add(slice_scores(start, iter([(slice(None), z)]), targets, with_argmax=False))
    return reduction.result()
