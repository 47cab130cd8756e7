"""Attention backends over packed batches: every available backend equals the padded reference.

Equality is checked on outputs and on gradients w.r.t. q, k and v, in float32, with
atol = 1e-5 and rtol = 1e-4 (the backends differ only in summation order and in padding that is
masked out). The padded reference itself is checked against a brute-force dense N×N
block-diagonal attention in float64.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmtool.errors import MMToolError
from mmtool.models.attention import (ATTENTION, default_backend, get_backend, length_buckets)
from mmtool.registry import all_registries

CPU = torch.device("cpu")
ATOL, RTOL = 1e-5, 1e-4
ALL_BACKENDS = ["bucketed", "flash-varlen", "flex", "loop", "njt", "padded"]
OTHERS = [n for n in ALL_BACKENDS if n != "padded"]


def random_lengths(seed: int) -> list[int]:
    """6-12 sample lengths: always a 1-token sample and a long one, the rest short or medium."""
    rng = random.Random(seed)
    lengths = [1, rng.randint(60, 90)]
    lengths += [rng.choice([rng.randint(1, 6), rng.randint(10, 20)]) for _ in range(rng.randint(4, 10))]
    rng.shuffle(lengths)
    return lengths


def packed(lengths: list[int], heads: int, head_dim: int, seed: int, dtype=torch.float32):
    """q, k, v `[N, H, Dh]` (leaf tensors needing grad), cu_seqlens `[B+1]` and an upstream grad."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, head_dim, generator=g, dtype=dtype) for _ in range(3))  # [N, H, Dh]
    cu = torch.tensor([0, *itertools_accumulate(lengths)], dtype=torch.int32)  # [B+1]
    grad_out = torch.randn(n, heads, head_dim, generator=g, dtype=dtype)  # [N, H, Dh]
    return q, k, v, cu, grad_out


def itertools_accumulate(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


def run(name: str, q, k, v, cu, lengths, causal, grad_out, with_grad=True):
    """The backend's output and (when `with_grad`) its gradients w.r.t. q, k, v."""
    q, k, v = (t.clone().requires_grad_(with_grad) for t in (q, k, v))
    with torch.set_grad_enabled(with_grad):
        out = ATTENTION.get(name)(q, k, v, cu, max(lengths), causal, lengths)  # [N, H, Dh]
    if not with_grad:
        return out, None
    out.backward(grad_out)
    return out.detach(), (q.grad, k.grad, v.grad)


def dense_reference(q, k, v, lengths, causal):
    """Brute force from the definition: full N×N scores with a block-diagonal (causal) mask."""
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [N]
    idx = torch.arange(q.shape[0])  # [N]
    allowed = sample[:, None] == sample[None, :]  # [N, N] same sample
    if causal:
        allowed &= idx[None, :] <= idx[:, None]  # [N, N] and no future keys
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])  # [H, N, N]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # [H, N, N]
    return torch.einsum("hqk,khd->qhd", probs, v)  # [N, H, Dh]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_padded_reference_matches_dense_definition(seed, causal):
    lengths = random_lengths(seed)
    q, k, v, cu, _ = packed(lengths, 2, 8, seed, dtype=torch.float64)
    out = ATTENTION.get("padded")(q, k, v, cu, max(lengths), causal, lengths)  # [N, H, Dh]
    torch.testing.assert_close(out, dense_reference(q, k, v, lengths, causal), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", OTHERS)
def test_backend_equals_padded_outputs_and_grads(name, seed, causal):
    heads, head_dim = 2 + seed % 3, (8, 12, 16)[seed % 3]
    lengths = random_lengths(seed)
    q, k, v, cu, grad_out = packed(lengths, heads, head_dim, seed)
    backend = ATTENTION.get(name)
    with_grad = backend.is_available(CPU, requires_grad=True, causal=causal)
    if not backend.is_available(CPU, requires_grad=False, causal=causal):
        with pytest.raises(MMToolError, match=name):  # unavailable ones must say so, not compute
            run(name, q, k, v, cu, lengths, causal, grad_out)
        return
    ref_out, ref_grads = run("padded", q, k, v, cu, lengths, causal, grad_out)
    out, grads = run(name, q, k, v, cu, lengths, causal, grad_out, with_grad=with_grad)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    if with_grad:
        for got, want, what in zip(grads, ref_grads, "qkv"):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"d{what}: {m}")
    else:  # e.g. flex on CPU: forward only, and backward must be refused with a reason
        with pytest.raises(MMToolError, match="backward"):
            run(name, q, k, v, cu, lengths, causal, grad_out, with_grad=True)


@pytest.mark.parametrize("lengths", [[1], [37]], ids=["one-token", "one-sample"])
@pytest.mark.parametrize("name", [n for n in ALL_BACKENDS if ATTENTION.get(n).is_available(CPU, True)])
def test_single_sample_batch(name, lengths):
    q, k, v, cu, grad_out = packed(lengths, 3, 8, seed=5)
    for causal in ([False, True] if ATTENTION.get(name).is_available(CPU, True, causal=True) else [False]):
        out, grads = run(name, q, k, v, cu, lengths, causal, grad_out)
        ref_out, ref_grads = run("padded", q, k, v, cu, lengths, causal, grad_out)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    if lengths == [1]:  # one token attends only to itself: the output is its value
        torch.testing.assert_close(out, v, atol=ATOL, rtol=RTOL)


def test_backends_work_without_the_lengths_hint():
    lengths = random_lengths(3)
    q, k, v, cu, _ = packed(lengths, 2, 8, seed=3)
    ref = ATTENTION.get("padded")(q, k, v, cu, max(lengths), True)  # [N, H, Dh]
    for name in ["loop", "bucketed"]:
        torch.testing.assert_close(ATTENTION.get(name)(q, k, v, cu, max(lengths), True), ref,
                                   atol=ATOL, rtol=RTOL)


def test_unavailable_backends_raise_with_a_reason():
    with pytest.raises(MMToolError, match=r"'flash-varlen' is unavailable on cpu.*needs a CUDA device"):
        get_backend("flash-varlen", "cpu", requires_grad=False)
    with pytest.raises(MMToolError, match=r"'flex' is unavailable.*no backward on CPU.*Available here"):
        get_backend("flex", CPU, requires_grad=True)
    with pytest.raises(MMToolError, match=r"'njt'.*no causal kernel on CPU"):
        get_backend("njt", CPU, requires_grad=True, causal=True)
    assert get_backend("flex", CPU, requires_grad=False).registry_name == "flex"
    q, k, v, cu, _ = packed([2, 3], 2, 8, seed=0)
    with pytest.raises(MMToolError, match="'flash-varlen' cannot run here: .*CUDA"):
        ATTENTION.get("flash-varlen")(q, k, v, cu, 3, False, [2, 3])
    with pytest.raises(MMToolError, match="did you mean 'bucketed'"):
        get_backend("bucket", CPU, requires_grad=True)


def test_registry_lists_every_backend_with_a_description():
    reg = all_registries()["attention"]
    assert reg is ATTENTION and reg.names() == ALL_BACKENDS
    assert all(reg.describe(n) for n in reg.names())


def test_default_backend_on_cpu_is_bucketed_and_available():
    for requires_grad in (False, True):
        backend = default_backend("cpu", requires_grad)
        assert backend.registry_name == "bucketed" and backend.is_available(CPU, requires_grad, True)
    # flash-varlen takes only fp16/bf16, so a float32 model on a GPU never gets it by default
    assert default_backend("cuda", True, dtype=torch.float32).registry_name == "bucketed"


@pytest.mark.parametrize("seed", range(5))
def test_length_buckets_partition_within_the_padding_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(10, 18), rng.randint(50, 90), rng.randint(900, 1500)])
               for _ in range(32)] + [0]
    groups = length_buckets(lengths, pad_budget=0.1)
    assert sorted(i for g in groups for i in g) == [i for i, n in enumerate(lengths) if n > 0]
    for g in groups:
        sizes = [lengths[i] for i in g]
        assert 1 - sum(sizes) / (len(sizes) * max(sizes)) <= 0.1
    assert len(groups) < 20  # a handful of calls, not one per sample


def test_length_buckets_slack_merges_cheap_padding():
    # 10 and 12 share (8% padding); 14 would make it 14%, but only adds 2·(14²-12²) = 104 padded
    # score entries, which a slack of 200 accepts; 60 would add 3·(60²-14²) and never joins.
    assert length_buckets([60, 10, 12, 14], pad_budget=0.1) == [[1, 2], [3], [0]]
    assert length_buckets([60, 10, 12, 14], pad_budget=0.1, slack=200) == [[1, 2, 3], [0]]
    assert length_buckets([0, 5], pad_budget=0.1) == [[1]]  # empty samples have nothing to attend
