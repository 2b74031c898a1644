"""dap_ray.stats against scipy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from dap_ray.stats import bootstrap_mean_ci, holm, mean_ci, paired_difference

pytestmark = pytest.mark.unit


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, sd 1, t_{0.975, 2} = 4.302652729749464 -> 2 ± 4.3027/√3
    ci = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert (ci.n, ci.mean, ci.sd) == (3, 2.0, 1.0)
    assert ci.low == pytest.approx(2 - half, abs=1e-9) and ci.high == pytest.approx(2 + half, abs=1e-9)


def test_mean_ci_matches_scipy_interval():
    x = np.random.default_rng(1).normal(60, 3, size=7)
    ci = mean_ci(x, 0.9)
    lo, hi = sp.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=sp.sem(x))
    assert (ci.low, ci.high) == (pytest.approx(lo, abs=1e-10), pytest.approx(hi, abs=1e-10))


def test_paired_difference_matches_ttest_rel():
    rng = np.random.default_rng(0)
    b = rng.normal(90, 2, size=5)
    a = b + rng.normal(0.8, 1.0, size=5)
    d = paired_difference(a, b)
    ref = sp.ttest_rel(a, b)
    lo, hi = ref.confidence_interval(0.95)
    assert d.mean == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    assert (d.low, d.high) == (pytest.approx(lo, abs=1e-10), pytest.approx(hi, abs=1e-10))
    assert d.p_value == pytest.approx(ref.pvalue, abs=1e-12)
    assert d.up + d.down + d.tie == 5


def test_paired_difference_counts_direction_by_hand():
    # a − b = [+2, −1, 0, +3]: 2 up, 1 down, 1 tie; mean 1, deviations 1, −2, −1, 2: sd √(10/3)
    d = paired_difference([92, 90, 91, 95], [90, 91, 91, 92])
    assert (d.up, d.down, d.tie) == (2, 1, 1)
    assert d.mean == 1.0 and d.sd == pytest.approx(math.sqrt(10 / 3))
    # the sign of the difference follows the argument order
    r = paired_difference([90, 91, 91, 92], [92, 90, 91, 95])
    assert (r.mean, r.up, r.down) == (-1.0, 1, 2)


def test_degenerate_inputs():
    one = paired_difference([1.0], [0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.p_value) and one.up == 1
    flat = paired_difference([2.0, 3.0], [1.0, 2.0])  # constant difference: zero-width CI, no p
    assert flat.low == flat.high == 1.0 and math.isnan(flat.p_value)
    assert math.isnan(mean_ci([]).mean)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = [0.5, -1.0, 2.0, 1.5, 0.0]
    lo, hi = bootstrap_mean_ci(x, seed=3)
    assert (lo, hi) == bootstrap_mean_ci(x, seed=3)
    assert lo < np.mean(x) < hi
    # with few seeds the percentile bootstrap is narrower than the t interval
    t = mean_ci(x)
    assert t.low < lo and hi < t.high


def test_holm_by_hand():
    # sorted p 0.01, 0.02, 0.04, 0.5 (m = 4): 4*0.01, 3*0.02, max(2*0.04, .06), max(1*0.5, .08); nan untouched
    adj = holm([0.04, 0.5, float("nan"), 0.01, 0.02])
    assert adj[0] == pytest.approx(0.08) and adj[1] == pytest.approx(0.5) and math.isnan(adj[2])
    assert adj[3] == pytest.approx(0.04) and adj[4] == pytest.approx(0.06)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []
