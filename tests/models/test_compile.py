"""`--compile` (mmtool.models.compile): bucketed rows change no loss, graphs stay few, eager = compiled."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmtool.data.batching import assemble
from mmtool.models import compile as compiling
from mmtool.models.compile import Buckets, compile_model, compiled_head_loss
from mmtool.models.model import ModelConfig, build_model
from mmtool.models.objectives import tied_head_loss

OBJECTIVES = {"next-token": 1.0, "masked-patch": 1.0, "masked-token": 0.5}


def mixed_batches(index, count: int, seed: int = 0) -> list:
    """`count` packed batches of 3-8 random samples (digits captions and cartpole episodes mixed):
    a different row count nearly every batch."""
    rng = np.random.default_rng(seed)
    return [assemble(index, np.sort(rng.choice(len(index), rng.integers(3, 9), replace=False)), "packed")
            for _ in range(count)]


@pytest.fixture
def backend(monkeypatch):
    """Sets `compiling.SETTINGS.backend` for one test (the settings are per process), with the trunk
    blocks compiled too, starting from no compiled graphs (`torch._dynamo.reset`), so that the test
    counts its own."""
    def use(name: str) -> None:
        monkeypatch.setattr(compiling.SETTINGS, "backend", name)
        monkeypatch.setattr(compiling.SETTINGS, "blocks", True)  # CPU's default is heads only
        torch._dynamo.reset()
    return use


def test_buckets_round_up_to_few_sizes():
    b = Buckets(bits=3, granularity=64)
    assert [b.size(n) for n in (0, 1, 64, 65, 300, 2049, 4088, 4096, 4097)] == \
        [0, 64, 64, 128, 320, 2560, 4096, 4096, 5120]
    sizes = [b.size(n) for n in range(1, 65537)]
    assert all(s >= n for n, s in zip(range(1, 65537), sizes))
    # padding: at most a fifth of the bucket once buckets are wider than the granularity
    assert max(1 - n / s for n, s in zip(range(1, 65537), sizes) if n > 256) <= 0.2
    # 4 buckets per doubling from 256 up: 1..65536 rows → 1 + 1 + 2 + 4·8 sizes
    assert len(set(sizes)) == 36
    assert all(s % 64 == 0 for s in sizes)


def test_head_loss_ignores_its_padding_rows(backend):
    """The heads' rows are padded with target -100: the real rows' losses and gradients are eager's."""
    backend("aot_eager")
    torch.manual_seed(0)
    head = torch.randn(300, 16, requires_grad=True)  # [V, d]
    for n in (1, 37, 64, 130):
        rows = torch.randn(n, 16, requires_grad=True)  # [n, d]
        target = torch.randint(0, 300, (n,))
        want = tied_head_loss(rows, head, target)  # [n]
        (g_rows, g_head) = torch.autograd.grad(want.sum(), (rows, head))
        got = compiled_head_loss(rows, head, target)  # [n] (computed on bucket(n) rows)
        assert got.shape == (n,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (c_rows, c_head) = torch.autograd.grad(got.sum(), (rows, head))
        torch.testing.assert_close(c_rows, g_rows, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_head, g_head, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_bucketed_capture_gives_eager_losses_with_few_graphs(index, backend, fusion):
    """dynamo + AOTAutograd capture the bucketed blocks and heads (eager kernels: seconds): losses and
    gradients equal the plain model's on batches whose row counts all differ, with graphs for
    before/after attention and the heads only — not one per batch shape."""
    backend("aot_eager")
    torch.manual_seed(0)
    plain = build_model(ModelConfig(fusion=fusion, objectives=OBJECTIVES), index.streams)
    compiled = compile_model(copy.deepcopy(plain))
    batches = mixed_batches(index, 8, seed=1)
    rows = [b.real_tokens for b in batches]
    assert len(set(rows)) >= 6 and any(Buckets().size(n) != n for n in rows)  # padding is exercised
    before = compiling.stats().graphs
    for i, batch in enumerate(batches):
        a = plain(batch, torch.Generator().manual_seed(i))
        b = compiled(batch, torch.Generator().manual_seed(i))
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        for name in OBJECTIVES:
            torch.testing.assert_close(b.losses[name], a.losses[name], rtol=1e-5, atol=1e-6)
        a.loss.backward()
        b.loss.backward()
        for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        plain.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
    graphs = compiling.stats().graphs - before
    # before/after attention, the text/bytes head and the actions head (another vocabulary)
    assert 0 < graphs <= 4
    # evaluation: pooled features under no_grad, the same rows as eager
    with torch.no_grad():
        torch.testing.assert_close(compiled.pooled(batches[0]), plain.pooled(batches[0]), rtol=1e-5, atol=1e-6)


def test_attention_probe_hooks_still_fire(index, backend):
    """Blocks whose attention a forward hook watches (the `attention` probe) run eagerly."""
    backend("aot_eager")
    model = compile_model(build_model(ModelConfig(objectives=OBJECTIVES), index.streams))
    seen = []
    handles = [b.attn.register_forward_hook(lambda m, args, out: seen.append(out.shape))
               for b in model.trunk.blocks]
    batch = mixed_batches(index, 1)[0]
    model(batch, torch.Generator().manual_seed(0))
    for h in handles:
        h.remove()
    assert seen == [(batch.real_tokens, model.size.d_model)] * len(model.trunk.blocks)


@pytest.mark.slow
def test_inductor_training_matches_eager_over_20_steps(index, backend):
    """20 AdamW steps on mixed packed batches: compiled (inductor) losses track eager's, graphs ≤ 8."""
    backend("inductor")
    torch.manual_seed(0)
    plain = build_model(ModelConfig(objectives=OBJECTIVES), index.streams)
    compiled = compile_model(copy.deepcopy(plain))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, compiled)]
    before = compiling.stats().graphs
    losses = []
    for i, batch in enumerate(mixed_batches(index, 20, seed=2)):
        pair = []
        for model, opt in zip((plain, compiled), opts):
            loss = model(batch, torch.Generator().manual_seed(i)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            pair.append(loss.item())
        losses.append(pair)
    losses = np.array(losses)  # [20, 2]
    np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=2e-4)
    assert losses[-5:, 0].mean() < losses[:5, 0].mean()  # it trained (the comparison is not of constants)
    assert 0 < compiling.stats().graphs - before <= 8


def test_cpu_compiles_the_heads_and_leaves_the_blocks_eager(index):
    """The default rule (`SETTINGS.blocks` None): blocks compiled on CUDA only, heads everywhere."""
    assert compiling.SETTINGS.blocks is None
    assert not compiling.compiles_blocks("cpu") and compiling.compiles_blocks("cuda")
    model = compile_model(build_model(ModelConfig(objectives=OBJECTIVES), index.streams))
    assert "run_blocks" not in vars(model.trunk)
    assert all(o.head_loss is compiled_head_loss for o in model.objectives.values())
