"""Rank correlation and bootstrap intervals shared by the evaluations and `fit-lens`.

The interval helpers resample single items or whole groups (e.g. all edits measured on one
validation window), since items that share a window are not independent.
"""

from __future__ import annotations

import numpy as np


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3:
        return float("nan")

    def rank(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            m = x == v
            r[m] = r[m].mean()
        return r

    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])



def _bootstrap_draws(n: int, groups, reps: int, rng) -> list:
    """Index arrays of `reps` bootstrap resamples of n items: single items, or whole groups."""
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(reps)]
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    return [np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
            for _ in range(reps)]



def within_window(u, d, groups):
    """(u, d) minus the mean of their group (window): only the order inside a window is left."""
    u, d, groups = np.asarray(u, np.float64), np.asarray(d, np.float64), np.asarray(groups)
    mu, md = np.zeros_like(u), np.zeros_like(d)
    for g in np.unique(groups):
        m = groups == g
        mu[m], md[m] = u[m].mean(), d[m].mean()
    return u - mu, d - md



def bootstrap_spearman(u, d, groups=None, *, reps: int = 1000, seed: int = 0):
    """95% percentile-bootstrap interval of spearman(u, d).

    groups=None resamples single edits. With groups (one id per edit, e.g. its validation
    window) whole groups are resampled: edits measured on the same window share its text and
    working contexts, so they are not independent, and the per-edit interval is too narrow
    when they are correlated.
    """
    u, d = np.asarray(u, np.float64), np.asarray(d, np.float64)
    draws = _bootstrap_draws(len(u), groups, reps, np.random.default_rng(seed))
    boot = [spearman(u[i], d[i]) for i in draws]
    return [float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))]



def bootstrap_spearman_diff(u_a, u_b, d, groups=None, *, reps: int = 1000, seed: int = 0):
    """95% paired-bootstrap interval of spearman(u_a, d) - spearman(u_b, d): two LensNets'
    scores of the same measured edits, both correlations taken on each same resample (so what
    the windows share cancels). groups as in `bootstrap_spearman`."""
    u_a, u_b = np.asarray(u_a, np.float64), np.asarray(u_b, np.float64)
    d = np.asarray(d, np.float64)
    draws = _bootstrap_draws(len(d), groups, reps, np.random.default_rng(seed))
    boot = [spearman(u_a[i], d[i]) - spearman(u_b[i], d[i]) for i in draws]
    return [float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))]


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval (z = 1.96) of a proportion: `successes` of `n` trials. Exact
    Wilson for whole counts (scipy's `binomtest(k, n).proportion_ci(method="wilson")` gives the
    same); a fractional count (partial-credit scores summed) is used as is, an approximation.
    n = 0 gives (nan, nan)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = float(successes) / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
