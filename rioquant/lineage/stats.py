"""The statistics of one unit (a tensor, or one expert slab): the blend fit, its bootstrap interval, the
null, and the exact-reproduction test — all from the per-block sums of `lineage.kernels`.

The fit regresses the child's task vector on the parents' (module docstring of `lineage.kernels`):
y = W − R on X = [P_i − R …, R]. β for a column P_i − R is parent i's weight; β for R is the weights'
sum minus one, so a merge whose weights do not add up to one exactly (weights rounded to bfloat16
before the merge, as older mergekit did) is fitted without bias. Fitting W on the parents themselves
would give R² ≈ 1 for any fine-tune of the same base; these statistics are all relative to the task
vector instead.
"""

from dataclasses import dataclass, field, replace
from fractions import Fraction
from statistics import NormalDist

import numpy as np

from rioquant.lineage.kernels import MODE_BFLOAT16, MODE_FLOAT32, MODE_FUSED, reduce_piece

N_BOOT = 200  # bootstrap replicates
Z95 = NormalDist().inv_cdf(0.975)  # a 95 % interval is ±1.96 standard errors …
F32_RESOLUTION = 2.0**-24  # … plus |w|·2^-24: a weight is resolved no finer than float32 (bootstrap_interval)
MAX_BOOT_BLOCKS = 1024  # more blocks than this are merged in runs before resampling
N_SHIFTS = 4  # null replicates: the regressors of the block 1…4 blocks earlier (one fused pass)
BLOCKS_PER_UNIT = 256  # blocks of a unit (fewer when they would exceed MAX_BLOCK)
MAX_BLOCK = 16384  # elements: a block's columns, its null ring and scratch stay in a 2 MB L2 cache
EXACT_SAMPLE_STEP = 8  # candidates other than the best are counted on every 8th block of a large unit
EXACT_FULL_BELOW = 1 << 16  # units smaller than this test every candidate on every element
PROBE = 1 << 14  # elements of a piece fitted to choose its candidate recipes
GRIDS = (Fraction(1, 20), Fraction(1, 100))  # "simple" weights: multiples of 0.05 and 0.01 …
MAX_DENOMINATOR = 12  # … and fractions p/q with q ≤ 12 (1/3, 3/8, 5/12, …)
MANTISSA_BITS = {"BF16": 7, "F16": 10, "F32": 23}


def q8_0_floor(values: np.ndarray) -> float:
    """Expected squared error of a Q8_0 tensor: each block of 32 is rounded to steps d = max|x|/127."""
    step = np.abs(values.reshape(-1, 32)).max(axis=1).astype(np.float64) / 127.0
    return float(32.0 * np.sum(step * step) / 12.0)


def block_length(elements: int) -> int:
    return max(1, min(MAX_BLOCK, -(-elements // BLOCKS_PER_UNIT)))


@dataclass
class Moments:
    """Sums over a unit's elements, per bootstrap block, plus the unit's totals that need no resampling."""

    k: int
    gram: list[np.ndarray] = field(default_factory=list)  # (nb, k, k) per piece
    cross: list[np.ndarray] = field(default_factory=list)  # (nb, k)
    yy: list[np.ndarray] = field(default_factory=list)  # (nb,)
    null_cross: np.ndarray | None = None  # (N_SHIFTS, k-1)
    floor_child: float = 0.0
    floor_parents: np.ndarray | None = None  # (k,): Σ expected squared storage error of each parent
    n: int = 0

    def add(self, gram: np.ndarray, cross: np.ndarray, yy: np.ndarray, null_cross: np.ndarray,
            floor_child: float, floor_parents: np.ndarray, n: int) -> None:
        self.gram.append(gram)
        self.cross.append(cross)
        self.yy.append(yy)
        self.null_cross = null_cross if self.null_cross is None else self.null_cross + null_cross
        self.floor_parents = floor_parents if self.floor_parents is None else self.floor_parents + floor_parents
        self.floor_child += floor_child
        self.n += n

    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self.gram), np.concatenate(self.cross), np.concatenate(self.yy)

    def total(self) -> "Moments":
        """The same sums as a single block: what an expert stack resamples, and the model-level fit sums."""
        gram, cross, yy = self.blocks()
        out = Moments(self.k)
        out.add(gram.sum(0, keepdims=True), cross.sum(0, keepdims=True), yy.sum(0, keepdims=True),
                self.null_cross, self.floor_child, self.floor_parents, self.n)
        return out

    @staticmethod
    def concat(parts: list["Moments"]) -> "Moments":
        """All the parts' blocks (an expert stack: every expert's blocks, resampled together)."""
        out = Moments(parts[0].k)
        for part in parts:
            gram, cross, yy = part.blocks()
            out.add(gram, cross, yy, part.null_cross, part.floor_child, part.floor_parents, part.n)
        return out

    @staticmethod
    def join(parts: list["Moments"]) -> "Moments":
        """Moments whose blocks are the given parts' totals (experts of a stack, tensors of a model)."""
        out = Moments(parts[0].k)
        for part in parts:
            t = part.total()
            out.add(t.gram[0], t.cross[0], t.yy[0], t.null_cross, t.floor_child, t.floor_parents, t.n)
        return out


@dataclass(frozen=True)
class Fit:
    """The least-squares blend of one set of sums."""

    evidence: bool  # False: two parents are equal (or collinear) here, so no weight can be told apart
    weights: np.ndarray  # (k,) weight of each parent; they sum to 1 + β_R
    beta: np.ndarray  # (k,) the regression coefficients
    rss: float  # residual sum of squares
    yy: float  # the child's task vector, squared norm


def _solve(gram: np.ndarray, cross: np.ndarray) -> np.ndarray | None:
    """β for one or many systems, scaled by the diagonal (the R column is far longer than the others).

    A column that is zero everywhere (R = 0: a zero-initialised bias) gets β = 0."""
    diag = np.diagonal(gram, axis1=-2, axis2=-1)
    scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
    scaled = gram * scale[..., :, None] * scale[..., None, :]
    scaled = scaled + np.eye(gram.shape[-1]) * (diag == 0)[..., None, :]
    try:
        return np.linalg.solve(scaled, (cross * scale)[..., None])[..., 0] * scale
    except np.linalg.LinAlgError:
        return None


def weights_from_beta(beta: np.ndarray) -> np.ndarray:
    """β (…, k) → weights: w_i = β_i for i < k−1, w_{k−1} = 1 + β_R − Σ_{i<k−1} β_i."""
    last = 1.0 + beta[..., -1] - beta[..., :-1].sum(-1)
    return np.concatenate([beta[..., :-1], last[..., None]], axis=-1)


def fit(gram: np.ndarray, cross: np.ndarray, yy: float) -> Fit:
    k = gram.shape[0]
    diff = gram[: k - 1, : k - 1]
    d = np.sqrt(np.diag(diff))
    if np.any(d == 0) or np.linalg.cond(diff / np.outer(d, d)) > 1e10:
        return Fit(False, np.full(k, np.nan), np.full(k, np.nan), float("nan"), yy)
    beta = _solve(gram, cross)
    if beta is None:
        return Fit(False, np.full(k, np.nan), np.full(k, np.nan), float("nan"), yy)
    rss = max(yy - float(beta @ cross), 0.0)
    return Fit(True, weights_from_beta(beta), beta, rss, yy)


def bootstrap_interval(gram: np.ndarray, cross: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """95 % interval of each weight: the fitted weight ± Z95 block-bootstrap standard errors (N_BOOT replicates).

    A replicate redraws the blocks with replacement, so its sums are count-weighted sums of the
    blocks' sums: no element is read again. Blocks are contiguous, so correlated residuals inside a
    block widen the interval as they should. The standard error, not the replicates' 2.5/97.5
    percentiles: with 200 replicates each percentile rests on its 5 most extreme draws, and that noise
    alone brought the coverage of known weights to 93 % (20 × 75 tensors of the test family's shapes);
    the standard error is estimated to ±5 % from all 200 and covers 94.4 %, as 2,000 percentile
    replicates (10× the time) do. The weights are smooth functions of ~256 block sums, so their
    bootstrap distribution is close to normal and nothing is lost by the normal interval.

    Each side is widened by |w|·2^-24, float32's unit roundoff, a systematic term the resampling cannot
    see: a merge tool holds its weights in float32 (0.6 is used as 0.6000000238), and each float32
    product w·P carries a rounding error that is a fixed function of P's mantissa, so it does not
    average out over elements. Into a float32 child both go unrounded: its fit pins the weight to ~1e-9
    at 4 M elements, and without this term the interval sat 9.6 standard errors off the weight used."""
    nb, k = cross.shape
    if nb > MAX_BOOT_BLOCKS:  # runs of consecutive blocks: still contiguous, and the resampling stays cheap
        runs = np.linspace(0, nb, MAX_BOOT_BLOCKS + 1).astype(np.int64)[:-1]
        gram, cross = np.add.reduceat(gram, runs), np.add.reduceat(cross, runs)
        nb = MAX_BOOT_BLOCKS
    center = _solve(gram.sum(0), cross.sum(0))
    if nb < 2 or center is None:
        return np.full(k, np.nan), np.full(k, np.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, nb, size=(N_BOOT, nb)) + np.arange(N_BOOT)[:, None] * nb
    counts = np.bincount(draws.ravel(), minlength=N_BOOT * nb).reshape(N_BOOT, nb).astype(np.float64)
    g = (counts @ gram.reshape(nb, k * k)).reshape(N_BOOT, k, k)
    c = counts @ cross
    beta = _solve(g, c)
    if beta is None:
        return np.full(k, np.nan), np.full(k, np.nan)
    w = weights_from_beta(beta)
    w = w[np.all(np.isfinite(w), axis=1)]
    if w.shape[0] < 2:
        return np.full(k, np.nan), np.full(k, np.nan)
    fitted = weights_from_beta(center)
    spread = Z95 * w.std(axis=0, ddof=1) + np.abs(fitted) * F32_RESOLUTION
    return fitted - spread, fitted + spread


def explained(beta: np.ndarray, cross: np.ndarray, yy: float) -> float:
    return float(beta @ cross) / yy if yy > 0 else 1.0


def task_share(gram: np.ndarray, cross: np.ndarray, yy: float) -> tuple[float, np.ndarray]:
    """The fraction of the child's task vector y that the parents' task vectors explain (R left out: the
    reference parent itself can explain much of y = W − R when the models are unrelated, aligned or
    not), observed and, per shift, with the task vectors block-shifted (the null).

    The shifted columns keep their mutual Gram matrix (up to the edge blocks), so one matrix serves all.
    `cross` here is (1 + shifts, k − 1): the observed Xᵀy first, then each shift's."""
    k1 = gram.shape[0] - 1
    g = gram[:k1, :k1]
    beta = _solve(np.broadcast_to(g, (cross.shape[0], k1, k1)), cross)
    if beta is None or yy <= 0:
        return 0.0, np.zeros(cross.shape[0] - 1)
    shares = np.einsum("sk,sk->s", beta, cross) / yy
    return float(shares[0]), shares[1:]


# ---------------------------------------------------------------------------------------------
# Exact reproduction


@dataclass(frozen=True)
class Candidate:
    """One way the child could have been computed: weights (as the merge tool held them) and arithmetic."""

    label: str  # "0.6·A + 0.4·B in float32"
    weights: np.ndarray  # float32 (k,), already rounded to bfloat16 for MODE_BFLOAT16
    mode: int
    denominator: np.float32


def _bf16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    return (((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16) << 16).astype(np.uint32).view(np.float32)


def _simple(weights: np.ndarray) -> list[tuple[Fraction, ...]]:
    """The simple weight vectors near the fitted ones: on each grid, and as fractions of small denominators."""
    out = []
    for grid in GRIDS:
        out.append(tuple(Fraction(round(Fraction(float(w)) / grid)) * grid for w in weights))
    out.append(tuple(Fraction(float(w)).limit_denominator(MAX_DENOMINATOR) for w in weights))
    return list(dict.fromkeys(out))


def _frac_text(f: Fraction) -> str:
    if f.denominator in (1, 2, 4, 5, 10, 20, 25, 50, 100):
        return f"{float(f):g}"
    return f"{f.numerator}/{f.denominator}"


def formula(coefficients: list[str], letters: list[str]) -> str:
    """'0.6·A + 0.4·B'; a weight of 0 is left out and a weight of 1 written as the letter alone."""
    terms = [letter if c == "1" else f"{c}·{letter}" for c, letter in zip(coefficients, letters, strict=True) if c != "0"]
    return " + ".join(terms) or "0"


def candidates(weights: np.ndarray, letters: list[str], child_bf16: bool) -> list[Candidate]:
    """The fitted weights in float32, and each nearby simple weight vector in float32 (separate and fused
    multiply-adds) and in bfloat16.

    Labels read as recipes: "bf16(0.6·A + 0.4·B) in float32" — the merge computed in float32 and
    stored as bfloat16. "…, fused" is mergekit's linear merge as it runs (`addcmul_` is one rounding per
    term on FMA hardware); the separate products are torch's a·A + b·B. They differ in ~1e-4 of a
    bfloat16 child's elements and in ~20 % of a float32 child's, so only the right one reproduces all."""
    wrap = "bf16" if child_bf16 else "f32"
    out = []
    for simple in _simple(weights):
        if sum(simple) <= 0:
            continue  # no blend sums to nothing, and a normalising merge would divide by it
        text = formula([_frac_text(f) for f in simple], letters)
        w32 = np.array([float(f) for f in simple], dtype=np.float32)
        out.append(Candidate(f"{wrap}({text}) in float32", w32, MODE_FLOAT32, _f32_sum(w32)))
        out.append(Candidate(f"{wrap}({text}) in float32, fused", w32, MODE_FUSED, _f32_sum(w32)))
        if child_bf16:
            wb = _bf16(w32)
            out.append(Candidate(f"{wrap}({text}) in bfloat16", wb, MODE_BFLOAT16, _bf16(_f32_sum(wb))[()]))
    fitted = formula([f"{w:.6g}" for w in weights], letters)  # last: the first block's ties go to simple recipes
    out.append(Candidate(f"{wrap}({fitted}) in float32 (fitted)", weights.astype(np.float32), MODE_FLOAT32,
                         np.float32(1.0)))
    return out


def _f32_sum(w: np.ndarray) -> np.float32:
    total = np.float32(0.0)
    for v in w:
        total = np.float32(total + v)
    return total


class UnitReducer:
    """What one piece of a unit adds up to: its Moments and its exact-reproduction counts.

    The candidate recipes are chosen from a fit of the piece's first PROBE elements; the simple ones come
    out the same in every piece of a blend, so their counts add up across pieces (and across an expert
    stack's slabs). Recipes that reproduced earlier tensors are tested too: a tensor of a few elements
    fits too loosely to find them itself. Sizes (blocks, sampling) follow the whole unit's `elements`."""

    def __init__(self, k: int, elements: int, letters: list[str], storage: list[str],
                 known: tuple["Candidate", ...] = ()) -> None:
        self.known = known  # recipes that reproduced earlier tensors exactly: tested here too
        self.moments = Moments(k)
        self.block = block_length(elements)
        self.letters = letters
        self.child_storage, self.parent_storage = storage[0], storage[1:]
        self.exact_possible = storage[0] in ("BF16", "F32") and all(s in MANTISSA_BITS for s in storage[1:])
        self.ulp_scale = 2.0 ** -MANTISSA_BITS[storage[0]] if storage[0] in MANTISSA_BITS else 0.0
        self.step = 1 if elements < EXACT_FULL_BELOW else EXACT_SAMPLE_STEP
        self.candidates: list[Candidate] | None = None
        self.matched = self.tested = np.zeros(0, dtype=np.int64)
        self.best = -1
        self.blocks_done = 0

    def _choose_candidates(self, child: np.ndarray, parents: tuple[np.ndarray, ...]) -> None:
        self.candidates = []
        if self.exact_possible:
            probe = min(child.shape[0], PROBE)
            gram, cross, yy = self._run(child[:probe], tuple(p[:probe] for p in parents), probe)[:3]
            probe_fit = fit(gram.sum(0), cross.sum(0), float(yy.sum()))
            if probe_fit.evidence:
                found = candidates(probe_fit.weights, self.letters, self.child_storage == "BF16")
                wrap = "bf16(" if self.child_storage == "BF16" else "f32("  # this unit's dtype names the label
                known = [replace(c, label=wrap + c.label.split("(", 1)[1]) for c in self.known
                         if c.mode != MODE_BFLOAT16 or self.child_storage == "BF16"]
                ordered = (*found[:-1], *known, found[-1])  # the fitted one stays last
                self.candidates = list({c.label: c for c in ordered}.values())
        self.matched = np.zeros(len(self.candidates), dtype=np.int64)
        self.tested = np.zeros(len(self.candidates), dtype=np.int64)

    def _run(self, child: np.ndarray, parents: tuple[np.ndarray, ...], block: int, cands: list[Candidate] = ()):
        n, k = child.shape[0], len(parents)
        bounds = np.append(np.arange(0, n, block, dtype=np.int64), np.int64(n))
        nb = bounds.shape[0] - 1
        gram, cross, yy = np.empty((nb, k, k)), np.empty((nb, k)), np.empty(nb)
        null = np.zeros((N_SHIFTS, max(k - 1, 1)))
        weights = np.stack([c.weights for c in cands]).astype(np.float32) if cands else np.zeros((0, k), np.float32)
        modes = np.array([c.mode for c in cands], dtype=np.int64)
        denominators = np.array([c.denominator for c in cands], dtype=np.float32)
        matched = self.matched if cands else np.zeros(0, dtype=np.int64)
        tested = self.tested if cands else np.zeros(0, dtype=np.int64)
        floor, best = reduce_piece(child, parents, bounds, self.ulp_scale, N_SHIFTS, gram, cross, yy, null, weights,
                                   modes, denominators, self.child_storage == "BF16", self.best, self.step,
                                   self.blocks_done, matched, tested)
        return gram, cross, yy, null[:, : k - 1], floor, best

    def add(self, child: np.ndarray, parents: tuple[np.ndarray, ...]) -> None:
        """Reduce one piece (flat float32, child and parents alike)."""
        if self.candidates is None:
            self._choose_candidates(child, parents)
        gram, cross, yy, null, floor, self.best = self._run(child, parents, self.block, self.candidates)
        self.blocks_done += gram.shape[0]
        if self.child_storage == "Q8_0":
            floor = q8_0_floor(child)
        floor_parents = np.array([q8_0_floor(p) if s == "Q8_0" else 0.0 for p, s in zip(parents, self.parent_storage, strict=True)])
        self.moments.add(gram, cross, yy, null, floor, floor_parents, child.shape[0])

    def exact(self) -> dict[str, list[int]]:
        """label → [elements reproduced bit for bit, elements tested]."""
        return {c.label: [int(m), int(t)] for c, m, t in zip(self.candidates or [], self.matched, self.tested, strict=True)}
