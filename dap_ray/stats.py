"""Pure statistics for comparing methods over seeds: no Ray, no I/O (layer 1).

The study (dap_ray.study) pairs two methods by seed: seed s regenerates both distilled sets with run
seed s and retrains each with training seed s, so a per-seed difference cancels what the two share
(the evaluation net's initialisation, the data order) and its spread is the seed-to-seed noise of
the difference itself. Intervals are Student-t intervals on the mean (the paired t interval for
differences, scipy.stats.ttest_rel's); a percentile bootstrap is available as a cross-check that
does not assume normality (with 5 seeds it is narrower than t and should be read as optimistic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _sp


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    sd: float  # sample standard deviation (ddof = 1); nan for n < 2
    low: float  # two-sided Student-t interval on the mean; nan for n < 2
    high: float


@dataclass(frozen=True)
class PairedDiff:
    """a − b over paired seeds."""

    n: int
    mean: float
    sd: float
    low: float  # paired t interval (confidence level of the call)
    high: float
    p_value: float  # two-sided paired t test of mean difference 0; nan for n < 2 or zero spread
    up: int  # seeds where a > b
    down: int  # seeds where a < b
    tie: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean of `values` with the two-sided Student-t confidence interval."""
    x = np.asarray(values, dtype=float)  # (n,)
    n = int(x.size)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    m = float(x.mean())
    if n < 2:
        return MeanCI(n, m, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(_sp.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return MeanCI(n, m, sd, m - half, m + half)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Paired difference a − b (same seeds, same order) with its t interval, t-test p and sign counts."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"paired samples must be 1-D of equal length, got {xa.shape} and {xb.shape}")
    d = xa - xb  # (n,)
    ci = mean_ci(d, confidence)
    p = math.nan
    if ci.n >= 2 and ci.sd > 0:
        tstat = ci.mean / (ci.sd / math.sqrt(ci.n))
        p = float(2 * _sp.t.sf(abs(tstat), ci.n - 1))
    return PairedDiff(ci.n, ci.mean, ci.sd, ci.low, ci.high, p,
                      int((d > 0).sum()), int((d < 0).sum()), int((d == 0).sum()))


def bootstrap_mean_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so reproducible)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # (resamples,)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p values (same order; nan stays nan and is not counted): a family of m
    tests is rejected at level α where the adjusted p ≤ α, controlling the family-wise error rate."""
    p = np.asarray(p_values, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(p.shape, math.nan)
    m = ok.size
    if m == 0:
        return out.tolist()
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])  # step-down: (m - i) p_(i), kept monotone
    out[order] = np.minimum(adj, 1.0)
    return out.tolist()
