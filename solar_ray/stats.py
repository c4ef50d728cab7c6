"""Standard errors for reported numbers: means of items, ratios over windows, paired differences.

Every score solar-ray reports is a mean over items (a benchmark's accuracy) or a ratio of
sums over windows (held-out loss per token); a difference between two models on the same
items is the mean of per-item differences, whose standard error is far smaller than the
two scores' errors combined when the models agree on most items. lm-eval reports the same
item-mean standard error (``acc_stderr``); these helpers add the paired difference and the
ratio estimator, which lm-eval and numpy do not provide. A difference is *within noise*
when its magnitude is below two standard errors (about a 95% two-sided interval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["NOISE_SE", "Estimate", "mean_se", "paired_difference", "ratio_se", "within_noise"]

#: a difference smaller than this many standard errors is reported as within noise
NOISE_SE = 2.0


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error and the number of units it was computed from."""

    value: float
    se: float
    n: int

    @property
    def within_noise(self) -> bool:
        """For a difference: |value| < :data:`NOISE_SE` standard errors."""
        return within_noise(self.value, self.se)


def within_noise(diff: float, se: float) -> bool:
    """Is ``diff`` indistinguishable from zero at about 95% (|diff| < 2 SE; no difference is)?"""
    if not math.isfinite(se) or diff == 0:
        return True
    return abs(diff) < NOISE_SE * se


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


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """``mean(a) - mean(b)`` over the same items, with the standard error of the paired mean."""
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same items ({len(a)} vs {len(b)})")
    return mean_se([x - y for x, y in zip(a, b, strict=True)])


def ratio_se(sums: Sequence[float], counts: Sequence[float]) -> Estimate:
    """``sum(sums) / sum(counts)`` with its cluster (ratio-estimator) standard error.

    For a per-token mean over windows of different lengths (window ``i`` contributes
    ``sums[i]`` over ``counts[i]`` tokens): tokens of one window are not independent, so
    the windows are the units, ``n`` is their number.
    """
    k = len(sums)
    total = math.fsum(counts)
    if k == 0 or total == 0:
        return Estimate(math.nan, math.nan, k)
    r = math.fsum(sums) / total
    if k == 1:
        return Estimate(r, math.nan, 1)
    resid = math.fsum((s - r * c) ** 2 for s, c in zip(sums, counts, strict=True))
    return Estimate(r, math.sqrt(k / (k - 1) * resid) / total, k)
