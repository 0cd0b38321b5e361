"""Named input matrices for quantizer tests: the corner cases ggml's searches branch on.

Each generator takes (rng, rows, n) and returns float32 (rows, n). Kept as a table so a failing case
is reported by name and can be rerun alone.
"""

from collections.abc import Callable

import numpy as np

F32 = np.float32


def _gauss(scale: float) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    return lambda rng, rows, n: (rng.standard_normal((rows, n)) * scale).astype(F32)


def _heavy_tails(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return (rng.standard_t(2.0, (rows, n)) * 0.02).astype(F32)


def _rare_outliers(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    x = rng.standard_normal((rows, n)).astype(F32) * F32(0.01)
    mask = rng.random((rows, n)) < 0.002
    x[mask] = rng.choice([-1, 1], mask.sum()) * rng.uniform(5, 50, mask.sum())
    return x


def _zero_blocks(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    x = rng.standard_normal((rows, n)).astype(F32)
    x[0] = 0
    for r in range(rows):  # zero a few 16- and 32-wide groups and whole 256 blocks
        for start in rng.choice(n // 16, size=max(1, n // 64), replace=False):
            x[r, start * 16 : start * 16 + 16] = 0
    if n >= 512:
        x[:, 256:512] = 0
    return x


def _negative_zero_blocks(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Blocks of -0.0: ggml's max scan starts from +0 and never moves, so the sign of d is ggml's, not
    the sign of the block's first zero."""
    x = rng.standard_normal((rows, n)).astype(F32)
    x[:, 32:64] = F32(-0.0)
    x[:, 96:112] = F32(-0.0)
    x[:, 97] = 0
    return x


def _signed_zero_extremes(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Blocks whose min (first half of the row) or max (second half) is zero, reached by +0.0 and -0.0
    in random order: ggml keeps the first zero it meets, and Q4_1/Q5_1 store its sign."""
    x = np.abs(rng.standard_normal((rows, n))).astype(F32)
    x[:, n // 2 :] *= -1
    zeros = rng.random((rows, n)) < 0.1
    x[zeros] = np.where(rng.random(zeros.sum()) < 0.5, F32(0.0), F32(-0.0))
    return x


def _constant(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return np.repeat(rng.standard_normal((rows, 1)).astype(F32), n, axis=1)


def _tiny(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return (rng.standard_normal((rows, n)) * 1e-20).astype(F32)


def _bf16_grid(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    x = (rng.standard_normal((rows, n)) * 0.05).astype(F32)
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(F32)


def _positive_only(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return np.abs(rng.standard_normal((rows, n))).astype(F32) + F32(0.5)


def _negative_only(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return -np.abs(rng.standard_normal((rows, n))).astype(F32) - F32(0.5)


def _few_levels(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return rng.integers(-3, 4, (rows, n)).astype(F32) * F32(0.25)


def _huge(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    return (rng.standard_normal((rows, n)) * 1e4).astype(F32)


def _overflowing_squares(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """x² overflows float32: ggml's weighted sums go inf/NaN, and Q3_K's second-level search then
    meets NaN scales, which its `|x| > amax` scan must skip."""
    return (rng.standard_normal((rows, n)) * 1e20).astype(F32)


def _far_outliers(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Small positive values and one far negative outlier per 32. Where the imatrix zeroes the
    outlier, the affine searches' fit moves the min up to 0, and iscale·(x - min) of the outlier
    leaves the range where rioquant may round it in float: search_affine must take its exact path."""
    x = rng.uniform(0.001, 0.002, (rows, n)).astype(F32)
    x[:, 5::32] = -(100.0 * 1.4 ** rng.integers(0, 16, (rows, n // 32))).astype(F32)
    return x


INPUTS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "gauss_1": _gauss(1.0),
    "gauss_0.02": _gauss(0.02),
    "gauss_1e-4": _gauss(1e-4),
    "heavy_tails": _heavy_tails,
    "rare_outliers": _rare_outliers,
    "zero_blocks": _zero_blocks,
    "negative_zero_blocks": _negative_zero_blocks,
    "signed_zero_extremes": _signed_zero_extremes,
    "constant_rows": _constant,
    "tiny_values": _tiny,
    "bf16_grid": _bf16_grid,
    "positive_only": _positive_only,
    "negative_only": _negative_only,
    "few_levels": _few_levels,
    "huge_values": _huge,
    "overflowing_squares": _overflowing_squares,
    "far_outliers": _far_outliers,
}


def random_importance(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Importance vectors: typical Σx²/count, with near-zero entries, and exactly zero ones."""
    qw = (rng.gamma(0.5, 2.0, n) * 1e-2).astype(F32)
    if kind == "near_zero":
        qw[rng.random(n) < 0.3] = F32(1e-12)
    elif kind == "with_zeros":
        qw[rng.random(n) < 0.1] = 0
    elif kind == "ones":
        qw[:] = 1
    return qw


IMPORTANCE_KINDS = ("typical", "near_zero", "with_zeros", "ones")
