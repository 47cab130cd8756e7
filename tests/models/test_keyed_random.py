"""Keyed draws: a function of (generator, keys) alone — uniform, order-free, layout-free."""

from __future__ import annotations

import math

import torch

from mmtool.models.keyed_random import _mix, _mul32, keyed_uniform


def test_mul32_is_the_low_word_of_the_product():
    x = torch.tensor([0, 1, 2**32 - 1, 123456789, 3_000_000_000], dtype=torch.int64)
    for c in (0x7FEB352D, 0x846CA68B):
        assert _mul32(x, c).tolist() == [(v * c) % 2**32 for v in x.tolist()]


def test_mix_is_a_bijection_on_a_sample_of_words():
    x = torch.arange(0, 2**32, 2**32 // 100_003, dtype=torch.int64)
    assert torch.unique(_mix(x)).numel() == x.numel()


def test_same_keys_same_draws_in_any_order():
    sample, pos = torch.arange(1000) // 10, torch.arange(1000) % 10
    a = keyed_uniform(torch.Generator().manual_seed(3), sample, pos)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    b = keyed_uniform(torch.Generator().manual_seed(3), sample[perm], pos[perm])
    assert torch.equal(a[perm], b)  # a token's draw follows the token, not its storage place
    c = keyed_uniform(torch.Generator().manual_seed(4), sample, pos)
    assert not torch.isclose(a, c).any()  # another step/seed: independent draws


def test_draws_are_uniform_and_uncorrelated_with_the_keys():
    n = 200_000
    sample, pos = torch.arange(n) // 50, torch.arange(n) % 50
    u = keyed_uniform(torch.Generator().manual_seed(0), sample, pos)
    assert ((u >= 0) & (u < 1)).all() and torch.unique(u).numel() == n
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = n / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # 19 degrees of freedom, p = 0.001
    for key in (sample.double(), pos.double()):
        r = torch.corrcoef(torch.stack([u, key]))[0, 1]
        assert abs(float(r)) < 4 / math.sqrt(n)
    # neighbouring positions of one sample are not correlated either
    grid = u.view(-1, 50)
    r = torch.corrcoef(torch.stack([grid[:, :-1].flatten(), grid[:, 1:].flatten()]))[0, 1]
    assert abs(float(r)) < 4 / math.sqrt(n)
