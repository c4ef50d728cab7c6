"""Numbers with their error, worked out by hand: noise marks at their boundary, means and
ratio losses with their SE, the degenerate inputs that have no SE, interpolation at and
around its ends, exact rank p-values. numpy and scipy only: no torch, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from solar_ray.stats import (
    Estimate,
    interpolate_rows,
    mean_se,
    paired_difference,
    paired_mean_difference,
    ratio_estimate,
    spearman,
    within_noise,
)


def _nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


def test_within_noise_is_under_two_standard_errors():
    assert within_noise(0.0, 1.0) and within_noise(0.0, math.nan) and within_noise(0.0, 0.0)
    assert within_noise(-0.0, 0.0)
    assert within_noise(0.5, math.nan) and within_noise(0.5, math.inf)  # no finite SE
    assert within_noise(1.9, 1.0) and within_noise(-1.9, 1.0)
    assert not within_noise(2.0, 1.0) and not within_noise(-2.0, 1.0)  # exactly 2 SE: resolved
    assert not within_noise(2.1, 1.0) and not within_noise(1e-6, 0.0)
    assert within_noise(2.5, 1.0, k=3) and not within_noise(3.0, 1.0, k=3)
    # the Estimate's method: the same rule, default k = 2
    assert Estimate(1.0, 0.49, 5).within_noise() is False
    assert Estimate(1.0, 0.51, 5).within_noise() is True
    assert Estimate(1.0, 0.4, 5).within_noise(k=3) is True
    assert Estimate(-1.0, 0.4, 5).within_noise(k=2.5) is False


def test_mean_and_its_standard_error_by_hand():
    # 1 2 3 4: mean 2.5, sd^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, se^2 = 5/12
    est = mean_se([1.0, 2.0, 3.0, 4.0])
    assert (est.value, est.n) == (2.5, 4) and est.se == pytest.approx(math.sqrt(5 / 12))
    # 0 0 3: mean 1, sd^2 = (1 + 1 + 4) / 2 = 3, se^2 = 1
    assert mean_se([0.0, 0.0, 3.0]) == Estimate(1.0, pytest.approx(1.0), 3)
    one = mean_se([0.7])
    assert (one.value, one.n) == (0.7, 1) and _nan(one.se)  # one item: no spread to measure
    none = mean_se([])
    assert none.n == 0 and _nan(none.value) and _nan(none.se)
    # paired: differences 1 0 0 -> mean 1/3, sd^2 = (4/9 + 1/9 + 1/9) / 2 = 1/3, se^2 = 1/9
    d = paired_mean_difference([1.0, 0.0, 1.0], [0.0, 0.0, 1.0])
    assert d.value == pytest.approx(1 / 3) and d.se == pytest.approx(1 / 3) and d.n == 3
    with pytest.raises(ValueError, match=r"same items \(2 vs 1\)"):
        paired_mean_difference([1.0, 0.0], [1.0])


def test_ratio_loss_and_its_error_over_unequal_rows_by_hand():
    # rows of 1, 2, 3 tokens with nll sums 1, 4, 3: R = 8 / 6 = 4/3; residuals
    # nll - R c = -1/3, 4/3, -1: squares 26/9, over n (n - 1) = 6: 13/27; mean(c) = 2
    est = ratio_estimate(np.array([1.0, 4.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    assert est.value == pytest.approx(4 / 3) and est.n == 3
    assert est.se == pytest.approx(math.sqrt(13 / 27) / 2)
    # two rows: R = (2 + 6) / (1 + 3) = 2, residuals 0, 0: no spread
    assert ratio_estimate([2.0, 6.0], [1.0, 3.0]) == Estimate(2.0, 0.0, 2)
    one = ratio_estimate([3.0], [2.0])
    assert (one.value, one.n) == (1.5, 1) and _nan(one.se)
    # one scored token in all is enough: R = 3.5, residuals -0.5, 0.5: sqrt(0.5 / 2) / 0.5
    assert ratio_estimate([3.0, 0.5], [1.0, 0.0]) == Estimate(3.5, 1.0, 2)
    for nll, tokens, n in (([], [], 0), ([1.0, 2.0], [0.0, 0.0], 2), ([1.0], [-1.0], 1)):
        est = ratio_estimate(nll, tokens)  # no rows, or no scored token: nothing to divide
        assert est.n == n and _nan(est.value) and _nan(est.se)
    # float32 losses and counts (a model's outputs) are summed in float64: 2^24 + 1 + 1
    big = np.array([2.0**24, 1.0, 1.0], dtype=np.float32)
    assert ratio_estimate(big, [1, 1, 1]).value == (2**24 + 2) / 3
    assert ratio_estimate([2.0**24 + 2, 0.0, 0.0], big).value == 1.0
    with pytest.raises(ValueError, match="1-D of one length"):
        ratio_estimate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="1-D of one length"):
        ratio_estimate([[1.0, 2.0]], [[1.0, 1.0]])


def test_paired_loss_difference_by_hand():
    # per-row differences 2, -1, 2 over 1, 1, 2 tokens: R = 3 / 4; residuals 5/4, -7/4,
    # 1/2: squares (25 + 49 + 4) / 16 = 78/16, over 6: 13/16; mean(c) = 4/3
    d = paired_difference([5.0, 1.0, 4.0], [3.0, 2.0, 2.0], [1.0, 1.0, 2.0])
    assert d.value == pytest.approx(0.75) and d.n == 3
    assert d.se == pytest.approx(math.sqrt(13 / 16) / (4 / 3))
    # float32 rows are subtracted in float64: 1e8 - 1 has no float32 (spacing 8 there)
    a32, b32 = np.float32([1e8, 1e8]), np.float32([1.0, 1.0])
    assert paired_difference(a32, b32, [1, 1]).value == 1e8 - 1
    with pytest.raises(ValueError, match="paired rows differ in number"):
        paired_difference([1.0, 2.0], [1.0], [1.0, 1.0])


def test_interpolated_rows_at_and_around_the_ends():
    pts = [(10.0, np.array([2.0, 1.0])), (0.0, np.array([4.0, 2.0])), (20.0, np.array([0.0, 5.0]))]
    assert interpolate_rows(pts, 0.0).tolist() == [4.0, 2.0]  # unsorted points, at the first
    assert interpolate_rows(pts, 10.0).tolist() == [2.0, 1.0]
    assert interpolate_rows(pts, 20.0).tolist() == [0.0, 5.0]  # at the last
    assert interpolate_rows(pts, 7.5).tolist() == pytest.approx([2.5, 1.25])
    assert interpolate_rows(pts, 15.0).tolist() == pytest.approx([1.0, 3.0])
    # an x a rounding error past an end is that end, never extrapolated further
    assert interpolate_rows(pts, 20.0 + 1e-10).tolist() == pytest.approx([0.0, 5.0])
    assert interpolate_rows(pts, -1e-10).tolist() == pytest.approx([4.0, 2.0])
    assert interpolate_rows(pts, 20.001) is None and interpolate_rows(pts, -0.001) is None
    assert interpolate_rows([], 1.0) is None
    # one point: only its own x; two points at one x: the later one
    assert interpolate_rows([(3.0, np.array([7.0]))], 3.0).tolist() == [7.0]
    two = [(3.0, np.array([9.0, 9.0])), (3.0, np.array([1.0, 1.0]))]
    assert interpolate_rows(two, 3.0).tolist() == [1.0, 1.0]
    # whole-number rows come back as floats, as interpolated ones do
    assert interpolate_rows([(3.0, [1, 2])], 3.0).dtype == np.float64
    assert interpolate_rows([(3.0, [1, 2]), (3.0, [5, 6])], 3.0).dtype == np.float64
    # float32 rows (a model's losses) are blended in float64, not rounded to float32
    y0, y1 = np.float32([1.1, 2.7]), np.float32([2.3, 0.4])
    blend = interpolate_rows([(0.0, y0), (3.0, y1)], 1.0)
    exact = [float(a) * 2 / 3 + float(b) / 3 for a, b in zip(y0, y1, strict=True)]
    assert blend.tolist() == pytest.approx(exact, rel=1e-12, abs=0)  # float32: ~1e-8 off


def test_interpolation_tolerance_is_inclusive_at_its_edges():
    # with |x| <= 1 the tolerance is 1e-9: an x exactly that far past an end is that end
    # (bitwise), and an x exactly on a middle point is that point, not a blend
    pts = [(-1.0, np.array([4.0, 2.0])), (0.0, np.array([2.0, 1.0])), (1.0, np.array([0.0, 3.0]))]
    assert interpolate_rows(pts[1:], -1e-9).tolist() == [2.0, 1.0]
    assert interpolate_rows(pts[:2], 1e-9).tolist() == [2.0, 1.0]
    assert interpolate_rows(pts, 1e-9).tolist() == [2.0, 1.0]
    assert interpolate_rows(pts[1:], -2e-9) is None and interpolate_rows(pts[:2], 2e-9) is None
    # the tolerance is relative past |x| = 1 only: 1.5e-9 past 0.5 is outside
    assert interpolate_rows([(0.0, [1.0]), (0.5, [2.0])], 0.5 + 1.5e-9) is None


def test_spearman_exact_p_value_up_to_eight_pairs():
    # three pairs in order: 2 of the 6 pairings are as extreme (|rho| = 1)
    three = spearman([1, 2, 3], [3, 5, 9])
    assert three == spearman([1.0, 2.0, 3.0], [3.0, 5.0, 9.0])
    assert (three.rho, three.n, three.exact) == (pytest.approx(1.0), 3, True)
    assert three.p_value == pytest.approx(1 / 3)
    eight = spearman(range(8), range(8))
    assert eight.exact and eight.p_value == pytest.approx(2 / math.factorial(8))
    # nine pairs, one adjacent swap: rho = 1 - 6 * 2 / (9 * 80); scipy's t approximation
    # (exact would count 2 x 9 pairings as extreme: 18 / 9!)
    nine = spearman(range(9), [0, 1, 2, 3, 4, 5, 6, 8, 7])
    assert not nine.exact and nine.n == 9
    assert nine.rho == pytest.approx(1 - 6 * 2 / (9 * 80))
    t = nine.rho * math.sqrt(7 / (1 - nine.rho**2))
    assert nine.p_value == pytest.approx(float(scipy_stats.t.sf(t, 7)) * 2)
    assert nine.p_value != pytest.approx(18 / math.factorial(9), rel=0.1)
    const = spearman([4, 4, 4], [1, 2, 3])
    assert const.n == 3 and _nan(const.rho) and _nan(const.p_value) and const.exact is False
    assert nine.exact is False
    # a side whose range is exactly 1 is not constant
    assert spearman([1, 2, 3], [0.0, 0.5, 1.0]).rho == pytest.approx(1.0)
    assert _nan(spearman([1, 2], [2, 1]).p_value)
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        spearman([1, 2, 3], [1, 2])
