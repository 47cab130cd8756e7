"""benchmarks/gpu_check.py: exits 0 with "no CUDA device" here, and its checks run on device="cpu"."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SHORT = [5, 17, 3, 40, 9, 40]  # mixed sample lengths, small enough for every backend on CPU


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mixture(gpu_check, tmp_path_factory):
    """(root, 3 packed batches of the built-in mixture, streams), built once."""
    root = tmp_path_factory.mktemp("gpu-check-mixture")
    batches, streams, loader = gpu_check.mixture_batches(root, 2048, 3)
    loader.close()
    return root, batches, streams


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs its GPU checks (minutes)")
def test_without_cuda_it_says_so_prints_the_paper_estimate_and_exits_0(mixture):
    root = mixture[0]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no CUDA device")
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("40%", "100%"))]
    assert len(rows) == 2
    for cells in rows:  # needed rate, then both waits: percentages in [0, 100]
        assert cells[1].endswith("M") and float(cells[1][:-1]) > 0
        assert all(0.0 <= float(c.rstrip("%")) <= 100.0 for c in cells[2:4])
        assert int(cells[4]) >= 1  # workers for <= 2% wait
    assert "MFLOPs per real token" in proc.stdout


def test_attention_errors_on_cpu(gpu_check):
    errors = gpu_check.attention_errors("cpu", torch.float32, SHORT)
    assert errors["padded"] == 0.0
    for name in ("loop", "bucketed", "flex"):  # flex runs without gradients on CPU
        assert isinstance(errors[name], float) and errors[name] < 1e-5, (name, errors[name])
    assert errors["flash-varlen"].startswith("unavailable: flash varlen attention needs a CUDA device")
    assert errors["njt"].startswith("unavailable: nested-tensor SDPA has no causal kernel on CPU")


def test_attention_speed_on_cpu(gpu_check):
    speed = gpu_check.attention_speed("cpu", torch.float32, lengths=SHORT, repeats=2)
    assert speed["flash-varlen"].startswith("unavailable")
    assert 0 < speed["bucketed"] < 5_000  # ms per forward + backward


def test_copies_and_side_stream_wait_on_cpu(gpu_check, mixture):
    _, batches, streams = mixture
    h2d = gpu_check.h2d_bandwidth("cpu", batches[0], repeats=2)
    assert h2d["fields"] == len(batches[0].specs) > 10
    assert h2d["bytes"] == batches[0].buffer.numel()
    assert h2d["one_copy_gb_s"] > 0 and h2d["per_field_gb_s"] > 0
    seen = []
    wait = gpu_check.side_stream_wait("cpu", batches, lambda b: seen.append(b.real_tokens))
    assert seen == [b.real_tokens for b in batches]
    assert 0 <= wait["data_wait_fraction"] < 1 and wait["step_seconds"] > 0


def test_flops_per_token_counts_the_model_s_own_weights(gpu_check, mixture):
    """The estimate, rebuilt from the model's modules rather than the size preset."""
    from mmtool.models.model import ModelConfig, build_model

    _, batches, streams = mixture
    model = build_model(ModelConfig(size="tiny"), streams)
    batch = batches[0]
    lengths = batch.numpy("seqlens").astype(float)
    n = lengths.sum()
    trunk = sum(m.weight.numel() for m in model.trunk.blocks.modules() if isinstance(m, torch.nn.Linear))
    expected = 6 * trunk * n + 12 * len(model.trunk.blocks) * model.size.d_model * (lengths ** 2).sum() / 2
    for k in batch.token_streams:
        enc = model.embedder.encoders[str(k)]
        if hasattr(enc, "table"):  # tied head: V rows (the [MASK] row is not an output)
            expected += 6 * (enc.table.weight.shape[0] - 1) * enc.table.weight.shape[1] * batch.stream_tokens(k)
        elif hasattr(enc, "proj"):  # decoded patches: d → dim
            expected += 6 * enc.proj.weight.numel() * batch.stream_tokens(k)
    assert gpu_check.flops_per_token(model, batch) == pytest.approx(expected / n, rel=1e-9)


def test_train_steps_on_cpu(gpu_check, mixture):
    _, batches, streams = mixture
    out = gpu_check.train_steps("cpu", batches, streams, size="tiny", bf16=False, peak_flops=None)
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    assert out["tokens_per_s"] > 0 and out["flops_per_token"] > 6 * out["parameters"] * 0.01
    assert out["mfu"] is None and out["attention"] == "bucketed"
    with_peak = gpu_check.train_steps("cpu", batches[:2], streams, size="tiny", bf16=False, peak_flops=1e12)
    assert with_peak["mfu"] == pytest.approx(with_peak["model_flops_per_s"] / 1e12)


def test_ddp_step_in_a_real_torchrun(gpu_check):
    out = gpu_check.ddp_step("cpu")
    assert out["ok"], out
    assert out["backend"] == "gloo" and out["world_size"] == 1 and out["all_reduce"] == 1.0
    assert out["grad_abs_sum"] > 0 and math.isfinite(out["loss"])


def test_paper_data_wait_known_answer(gpu_check):
    # needs 0.3 · 1e15 / 1e8 = 3M tokens/s; a 3M tokens/s loader: half of each inline step waits,
    # a worker keeps up exactly; at MFU 0.6 (6M needed) the worker covers half.
    rows = gpu_check.paper_data_wait(3e6, 1e8, peak=1e15, mfus=(0.3, 0.6))
    assert rows[0]["needed_tokens_per_s"] == pytest.approx(3e6)
    assert rows[0]["wait_inline"] == pytest.approx(0.5) and rows[0]["wait_overlapped"] == 0.0
    assert rows[1]["wait_inline"] == pytest.approx(2 / 3) and rows[1]["wait_overlapped"] == pytest.approx(0.5)
    assert [r["workers_for_2pct"] for r in rows] == [1, 2]  # 0.98 · 3M / 3M → 1; 0.98 · 6M / 3M → 2
