"""Realised shares: what the loader's batches hold matches what `--data` weights and `--mix-by` ask,
over an epoch and batch by batch, on the real built-in folders."""

from __future__ import annotations

import numpy as np
import pytest

from mmtool.data.loader import Loader, LoaderConfig

ALL_SPLITS = ["train", "validation", "test"]
WEIGHTS = {"digits": 1, "cartpole": 1, "pydocs": 2}  # cartpole: 1,400-token episodes
WANT = np.array([0.25, 0.25, 0.5])


def loader(data, mix_by, names=WEIGHTS, **kw):
    spec = [f"{p}={names[n]}" for n, p in zip(names, data.paths(*names))]
    kw = {"batch_tokens": 2048, **kw}
    return Loader(LoaderConfig(data=spec, mix_by=mix_by, splits=ALL_SPLITS, verify=False, **kw))


def per_batch_shares(ld: Loader, by: str) -> np.ndarray:
    """float [B, F]: each batch's share of tokens (or samples) per folder."""
    n = len(ld.index.folders)
    rows = []
    for b in ld.plan(0):
        f = ld.index.sample_folder[b]
        weights = ld.index.lengths[b] if by == "tokens" else None
        counts = np.bincount(f, weights, n)
        rows.append(counts / counts.sum())
    return np.array(rows)


@pytest.mark.parametrize("mix_by", ["tokens", "samples"])
def test_realised_shares_follow_the_requested_ones(data, mix_by):
    # Batches of a fixed size in what the weights count: a token budget, or 16 samples.
    ld = loader(data, mix_by, **({} if mix_by == "tokens" else
                                 {"batch_tokens": None, "batch_samples": 16}))
    order = ld.order(0)
    f = ld.index.sample_folder[order]
    amount = ld.index.lengths[order] if mix_by == "tokens" else None
    epoch = np.bincount(f, amount, 3) / np.bincount(f, amount, 3).sum()
    np.testing.assert_allclose(epoch, WANT, atol=0.03)  # over the epoch
    shares = per_batch_shares(ld, mix_by)
    np.testing.assert_allclose(shares.mean(0), WANT, atol=0.05)  # batch by batch, on average
    if mix_by == "tokens":  # and almost no batch holds one source only (a 2,048-token batch has
        # room for one 1,400-token episode: a 25% token share puts one in about every third batch)
        assert ((shares > 0).sum(1) == 1).mean() < 0.10
        assert ld.warnings() == []


def test_samples_mode_gives_long_episodes_the_tokens_and_says_so(data):
    ld = loader(data, "samples")
    tokens = per_batch_shares(ld, "tokens").mean(0)
    assert tokens[1] > 0.6  # cartpole: a quarter of the draws, most of the tokens
    assert len(per_batch_shares(ld, "tokens")) > 10


def test_equal_weights_no_longer_give_cartpole_only_batches(data):
    """The audit's quickstart case: equal weights over images, audio, cartpole and docs."""
    names = {"digits": 1, "spoken-digits": 1, "cartpole": 1, "pydocs": 1}
    ld = loader(data, "tokens", names)
    plan = ld.plan(0)
    cartpole = list(names).index("cartpole")
    only = [bool((ld.index.sample_folder[b] == cartpole).all()) for b in plan]
    assert sum(only) <= 0.05 * len(plan), (sum(only), len(plan))
    single = [len(np.unique(ld.index.sample_folder[b])) == 1 for b in plan]
    assert np.mean(single) < 0.10
    samples = loader(data, "samples", names)  # per-sample weights: cartpole dominates, warned
    assert any("hold samples of one data folder only" in w for w in samples.warnings()) or \
        per_batch_shares(samples, "tokens").mean(0)[cartpole] > 0.8
