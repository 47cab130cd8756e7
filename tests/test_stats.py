"""mmtool.stats: the intervals behind every eval-transfer row, on known answers."""

from __future__ import annotations

import numpy as np
import pytest

from mmtool.stats import bootstrap_ci, crossed_bootstrap, mean_ci95, paired_bootstrap, verdict


def test_bootstrap_ci_matches_the_binomial_standard_error():
    correct = np.arange(400) % 4 == 0  # accuracy 0.25 on 400 examples: SE = sqrt(.25·.75/400) = 0.0217
    est, (lo, hi) = bootstrap_ci(correct, np.random.default_rng(0), 4000)
    assert est == 0.25 and lo < 0.25 < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.25 * 0.75 / 400), rel=0.1)
    assert bootstrap_ci(correct, np.random.default_rng(0), 4000) == (est, [lo, hi])  # seeded


def test_paired_bootstrap_keeps_the_pairing():
    rng = np.random.default_rng(1)
    a = rng.random(200) < 0.6
    same = paired_bootstrap(a, a.copy(), np.random.default_rng(0))
    assert same["difference"] == 0 and same["difference_ci95"] == [0.0, 0.0]  # identical models: no doubt
    assert verdict(same["difference_ci95"]) == "within noise"
    # b = a plus 20 more right answers: the difference is 0.1 and every resample sees a gain ≥ 0.
    b = a.copy()
    b[np.flatnonzero(~a)[:20]] = True
    d = paired_bootstrap(b, a, np.random.default_rng(0))
    assert d["difference"] == pytest.approx(0.1) and 0 < d["difference_ci95"][0] < 0.1 < d["difference_ci95"][1]
    assert verdict(d["difference_ci95"]) == "better" and verdict([-0.2, -0.01]) == "worse"
    # Two independent intervals overlap although the paired one excludes 0.
    assert d["a_ci95"][0] < d["b_ci95"][1]
    with pytest.raises(ValueError, match="same units"):
        paired_bootstrap(a, a[:10], np.random.default_rng(0))


def test_crossed_bootstrap_covers_the_test_set_not_only_the_episodes():
    # Each test example is either always right or always wrong, whatever the support draw (episodes
    # agree): a t-interval over episodes is 0 wide, but a new test set would move the accuracy by
    # about the binomial error of 80 examples — the crossed interval keeps that.
    rng = np.random.default_rng(2)
    easy = rng.random(80) < 0.5  # [80]
    grid = np.tile(easy, (100, 1))  # [100 episodes, 80 examples]
    assert mean_ci95(grid.mean(1))[1] == pytest.approx(0.0, abs=1e-12)
    crossed = crossed_bootstrap(grid, np.zeros_like(grid), np.random.default_rng(0), 2000)
    lo, hi = crossed["a_ci95"]
    assert crossed["a"] == easy.mean() and (hi - lo) / 2 == pytest.approx(
        1.96 * np.sqrt(easy.mean() * (1 - easy.mean()) / 80), rel=0.15)
    # ... and episodes that disagree on a fixed test set widen it further.
    noisy = grid ^ (rng.random(grid.shape) < 0.2)
    wide = crossed_bootstrap(noisy, grid, np.random.default_rng(0), 2000)
    assert wide["b_ci95"] == crossed["a_ci95"]  # same resamples: the same grid gets the same interval
    assert wide["difference_ci95"][0] < wide["difference"] < wide["difference_ci95"][1]
