"""Intervals for the numbers mmtool prints: 95% bootstrap and t intervals, paired differences, verdicts.

DESIGN's rule: every figure gets a 95% interval that resamples what varies. The helpers here take
per-unit scores (one row per test example, batch or episode) and resample those units:

* `bootstrap_ci`: the mean of per-example scores and its percentile interval.
* `paired_bootstrap`: two models scored on the *same* examples; each resample draws one set of
  examples for both, so the interval of the difference keeps their pairing (much narrower than two
  independent intervals when the models agree on most examples).
* `crossed_bootstrap`: scores of a grid `[episodes, examples]` (k-shot: every support draw scored on
  every test example); each resample draws episodes *and* examples, both with replacement, so the
  interval covers what a new test set would change as well as what new support draws would.
* `ratio_bootstrap_ci`: Σnum / Σden over rows (batches) and its interval, resampling rows;
  `hierarchical_ci`: a two-level bootstrap (batches, then samples within them) — `mmtool ablate`'s.
* `verdict`: "better" / "worse" when a difference interval excludes 0, else "within noise".

Everything takes a `numpy.random.Generator`, so a seeded caller gets the same interval every time.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 1000
"""Default bootstrap resamples."""


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval of the mean); nan half-width for < 2 values."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def _percentiles(stats: np.ndarray) -> list[float]:
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator,
                 n: int = RESAMPLES) -> tuple[float, list[float]]:
    """(mean, [low, high]): the mean of `values` [N] and its 95% percentile bootstrap interval over
    the N units (nan bounds for fewer than 2)."""
    values = np.asarray(values, np.float64)
    est = float(values.mean())
    if len(values) < 2:
        return est, [float("nan"), float("nan")]
    pick = rng.integers(0, len(values), (n, len(values)))  # [n, N]
    return est, _percentiles(values[pick].mean(1))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                     n: int = RESAMPLES) -> dict[str, object]:
    """Means of two paired score vectors `a`, `b` [N] (same units, same order), their difference
    a − b, and 95% percentile intervals of all three from one shared resample of the units.

    Returns:
        {"a", "a_ci95", "b", "b_ci95", "difference", "difference_ci95"}; intervals are [low, high].
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same units: {a.shape} vs {b.shape}")
    if len(a) < 2:
        nan = [float("nan"), float("nan")]
        return {"a": float(a.mean()), "a_ci95": nan, "b": float(b.mean()), "b_ci95": nan,
                "difference": float((a - b).mean()), "difference_ci95": nan}
    pick = rng.integers(0, len(a), (n, len(a)))  # [n, N] one draw of units for both
    ma, mb = a[pick].mean(1), b[pick].mean(1)  # [n], [n]
    return {"a": float(a.mean()), "a_ci95": _percentiles(ma), "b": float(b.mean()),
            "b_ci95": _percentiles(mb), "difference": float((a - b).mean()),
            "difference_ci95": _percentiles(ma - mb)}


def crossed_bootstrap(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                      n: int = RESAMPLES) -> dict[str, object]:
    """Like `paired_bootstrap` for score grids `a`, `b` [E, N] (E episodes × N examples, the same
    grid for both models): each resample draws E episodes and N examples with replacement and takes
    the grid mean over them, so the interval covers both sources of variation.

    Returns:
        {"a", "a_ci95", "b", "b_ci95", "difference", "difference_ci95"}; intervals are [low, high].
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"crossed scores need two equal [episodes, examples] grids: {a.shape} vs {b.shape}")
    e, m = a.shape
    # Multiplicity of each episode / example in each resample: [n, E], [n, N].
    rows = np.stack([np.bincount(r, minlength=e) for r in rng.integers(0, e, (n, e))]).astype(np.float64)
    cols = np.stack([np.bincount(c, minlength=m) for c in rng.integers(0, m, (n, m))]).astype(np.float64)

    def means(grid: np.ndarray) -> np.ndarray:  # [n]: Σ_ij rows_i · grid_ij · cols_j / (E·N)
        return ((rows @ grid) * cols).sum(1) / (e * m)

    ma, mb = means(a), means(b)
    return {"a": float(a.mean()), "a_ci95": _percentiles(ma), "b": float(b.mean()),
            "b_ci95": _percentiles(mb), "difference": float((a - b).mean()),
            "difference_ci95": _percentiles(ma - mb)}


def ratio_bootstrap_ci(num: np.ndarray, den: np.ndarray | None, rng: np.random.Generator,
                 n: int) -> tuple[float, float, float]:
    """(estimate, low, high): Σnum/Σden (or the mean of num) and its 95% bootstrap interval over
    the rows (batches)."""
    num = np.asarray(num, np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, np.float64)
    if len(num) == 0 or den.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(num.sum() / den.sum())
    if len(num) < 2:
        return est, float("nan"), float("nan")
    pick = rng.integers(0, len(num), (n, len(num)))
    d = den[pick].sum(1)
    est_r = num[pick].sum(1)[d > 0] / d[d > 0]
    return (est, *_percentiles(est_r))


def hierarchical_ci(values: np.ndarray, groups: np.ndarray, rng: np.random.Generator,
                    n: int) -> tuple[float, float, float]:
    """(mean of `values`, 95% interval): a two-level bootstrap that resamples the groups (batches)
    and, within each drawn group, its rows (held-out samples)."""
    values, groups = np.asarray(values, np.float64), np.asarray(groups)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(values.mean())
    ug = np.unique(groups)
    if len(ug) < 2:
        return est, float("nan"), float("nan")
    parts = [values[groups == g] for g in ug]
    sizes = np.array([len(p) for p in parts], np.float64)
    sums = np.stack([p[rng.integers(0, len(p), (n, len(p)))].sum(1) for p in parts])  # [G, n]
    pick = rng.integers(0, len(ug), (n, len(ug)))  # [n, G] drawn batches per resample
    est_r = sums[pick, np.arange(n)[:, None]].sum(1) / sizes[pick].sum(1)  # [n]
    return (est, *_percentiles(est_r))


def verdict(interval: list[float]) -> str:
    """"better" when the difference interval lies above 0, "worse" below, else "within noise"
    (also for an interval that could not be computed)."""
    low, high = interval
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "within noise"
