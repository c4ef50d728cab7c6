"""Numbers with their error: item means, held-out losses over sequences, paired differences, ranks.

Benchmark scores are item means (:func:`mean_se`), compared paired on shared items
(:func:`paired_mean_difference`). Held-out losses are token-weighted ratios over rows with a
ratio-estimator SE, the row being the sampling unit (:func:`ratio_estimate`,
:func:`paired_difference`). :func:`spearman` adds an exact permutation p-value for few
trials. The formulas: docs/merge-eval.md, "Numbers with their error".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NOISE_SE",
    "Estimate",
    "Rank",
    "interpolate_rows",
    "mean_se",
    "paired_difference",
    "paired_mean_difference",
    "ratio_estimate",
    "spearman",
    "within_noise",
]

#: a difference smaller than this many standard errors is reported as within noise
NOISE_SE = 2.0


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error over ``n`` sampling units (held-out rows)."""

    value: float
    se: float
    n: int

    def within_noise(self, k: float = NOISE_SE) -> bool:
        """For a difference: ``|value| < k * se``, or 0, or no finite SE (nothing resolved)."""
        return within_noise(self.value, self.se, k)


def within_noise(diff: float, se: float, k: float = NOISE_SE) -> bool:
    """Is ``diff`` indistinguishable from zero at about 95% (|diff| < 2 SE; no difference is)?"""
    return diff == 0 or not (abs(diff) >= k * se)


def mean_se(values: Sequence[float]) -> Estimate:
    """Mean and its standard error (sample standard deviation with ddof 1, over sqrt(n))."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def paired_mean_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """``mean(a) - mean(b)`` over the same items, with the standard error of the paired mean."""
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same items ({len(a)} vs {len(b)})")
    return mean_se([x - y for x, y in zip(a, b, strict=True)])


def ratio_estimate(nll: Sequence[float] | np.ndarray, tokens: Sequence[float] | np.ndarray) -> Estimate:
    """``sum(nll) / sum(tokens)`` with its ratio-estimator SE over rows (see the module doc)."""
    num = np.asarray(nll, dtype=np.float64)
    den = np.asarray(tokens, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"nll and tokens must be 1-D of one length, got {num.shape}, {den.shape}")
    n = int(num.size)
    total = float(den.sum())
    if n == 0 or total <= 0:
        return Estimate(math.nan, math.nan, n)
    value = float(num.sum()) / total
    if n < 2:
        return Estimate(value, math.nan, n)
    resid = num - value * den
    se = math.sqrt(float((resid**2).sum()) / (n * (n - 1))) / (total / n)
    return Estimate(value, se, n)


def paired_difference(
    nll_a: Sequence[float] | np.ndarray,
    nll_b: Sequence[float] | np.ndarray,
    tokens: Sequence[float] | np.ndarray,
) -> Estimate:
    """Loss of ``a`` minus loss of ``b`` on the same rows, with its paired SE."""
    a = np.asarray(nll_a, dtype=np.float64)
    b = np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rows differ in number: {a.shape} vs {b.shape}")
    return ratio_estimate(a - b, tokens)


def interpolate_rows(
    points: Sequence[tuple[float, np.ndarray]], x: float
) -> np.ndarray | None:
    """Per-row values at ``x``, linearly interpolated between the two points around it.

    ``points`` are ``(x, per-row values)`` sorted or not; None when ``x`` is outside them
    (never extrapolated); an ``x`` a rounding error past a point is that point; at an
    ``x`` that several points share, the last of them. Interpolating every row linearly
    keeps the rows paired, and the mean of the interpolated rows is the interpolated mean.
    """
    pts = sorted(points, key=lambda p: p[0])
    xs = [p[0] for p in pts]
    tol = 1e-9 * max(1.0, abs(x))
    if not xs or not xs[0] - tol <= x <= xs[-1] + tol:
        return None
    x = next((p for p in reversed(xs) if p < x <= p + tol), x)
    # where x falls as a fractional index into the points: i, and w of the way to i + 1
    at = float(np.interp(x, xs, np.arange(len(xs))))
    i = int(at)
    w, y0 = at - i, np.asarray(pts[i][1], dtype=np.float64)
    return y0 if w == 0 else (1 - w) * y0 + w * np.asarray(pts[i + 1][1], dtype=np.float64)


@dataclass(frozen=True)
class Rank:
    """A Spearman rank correlation over ``n`` pairs and its two-sided p-value."""

    rho: float
    p_value: float
    n: int
    exact: bool  #: the p-value enumerates every permutation (n <= 8)


def spearman(x: Sequence[float], y: Sequence[float]) -> Rank:
    """Spearman's rho (``scipy.stats.spearmanr``, ties averaged) and its p-value.

    For ``n <= 8`` the p-value is exact (``scipy.stats.permutation_test`` over all ``n!``
    pairings; the t approximation scipy uses by default is poor for a handful of trials),
    else scipy's. Fewer than three pairs, or a constant side, give NaN.
    """
    from scipy import stats

    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    n = int(xs.size)
    if n != ys.size:
        raise ValueError(f"spearman: {n} x values but {ys.size} y values")
    if n < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return Rank(math.nan, math.nan, n, False)
    rho = float(stats.spearmanr(xs, ys).statistic)
    if n <= 8:
        res = stats.permutation_test(
            (xs,),
            lambda a: stats.spearmanr(a, ys).statistic,
            permutation_type="pairings",
            n_resamples=math.inf,
            alternative="two-sided",
        )
        return Rank(rho, float(res.pvalue), n, True)
    return Rank(rho, float(stats.spearmanr(xs, ys).pvalue), n, False)
