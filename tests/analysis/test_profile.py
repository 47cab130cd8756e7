"""`mmtool.analysis.profile` on small real folders: the numbers agree with the batches they describe."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from mmtool.data.index import Stream
from mmtool.data.loader import Loader, LoaderConfig
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.analysis.profile import (DEFAULT_STRATEGIES, NO_ACCELERATOR, ProfileConfig, check_plot_path,
                            plot_profile, profile_strategies, step_objectives)

STEPS = 5
ALL_SPLITS = ["train", "validation", "test"]  # profile's default


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Images + captions, trajectories (1,400-token episodes) and text: every layout case."""
    root = tmp_path_factory.mktemp("profile-data")
    jobs = {"digits": dict(max_samples=120), "cartpole": dict(options=["episodes=4"]),
            "pydocs": dict(max_samples=120)}
    for source, kw in jobs.items():
        preprocess(PreprocessConfig(source=source, out=root / source, **kw))
    return [str(root / s) for s in jobs]


def reference(folders, strategy, warmup=2, steps=STEPS, **size):
    """The batches the profile should have measured, drawn independently from a fresh loader."""
    stream = Loader(LoaderConfig(folders, strategy=strategy, splits=ALL_SPLITS, **size)).forever()
    for _ in range(warmup):
        next(stream)
    return [next(stream) for _ in range(steps)]


def test_counts_padding_and_h2d_match_the_batches(folders):
    result = profile_strategies(ProfileConfig(folders, batch_samples=8, steps=STEPS))
    assert list(result["strategies"]) == DEFAULT_STRATEGIES
    assert set(result) == {"config", "machine", "data", "mixture", "strategies"}
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cpu_count"] >= 1
    assert result["config"]["batch_samples"] == 8 and result["config"]["step_fn"] is None
    assert [f["samples"] for f in result["data"]["folders"]] == [120, 4, 121]  # one pydocs record chunks in two
    assert json.loads(json.dumps(result)) == result  # JSON-ready as it is

    for name, r in result["strategies"].items():
        batches = reference(folders, name, batch_samples=8)
        assert r["batches"] == STEPS
        assert r["samples"] == sum(b.batch_size for b in batches)
        assert r["real_tokens"] == sum(b.real_tokens for b in batches)
        assert r["token_slots"] == sum(b.num_slots for b in batches)
        assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"])
        assert r["real_tokens_per_s"] == pytest.approx(r["real_tokens"] / r["seconds"])
        # one buffer: one copy of the whole buffer; naive: one copy per field
        one, naive = r["h2d"]["one_buffer"], r["h2d"]["per_field"]
        assert one["copies_per_batch"] == 1
        assert naive["copies_per_batch"] == pytest.approx(np.mean([len(b.specs) for b in batches]))
        assert naive["copies_per_batch"] > 10
        assert one["bytes_per_batch"] == pytest.approx(np.mean([b.buffer.numel() for b in batches]))
        assert one["bytes_per_batch"] >= naive["bytes_per_batch"] > 0  # fields + alignment gaps
        if not torch.cuda.is_available():  # never a made-up time on a CPU-only machine
            assert r["h2d"]["timing"] == NO_ACCELERATOR
            assert one["seconds_per_batch"] is None and naive["seconds_per_batch"] is None
        assert r["rss_mb"]["peak_so_far"] >= r["rss_mb"]["after"] > 0
        assert r["step"] is None
    s = result["strategies"]
    assert s["per-sample"]["samples"] == STEPS and s["packed"]["samples"] == 8 * STEPS
    assert s["per-sample"]["padding_fraction"] == 0 and s["packed"]["padding_fraction"] == 0
    assert s["padded"]["padding_fraction"] > 0.3  # 1,400-token episodes next to 10-token images


def test_packed_pads_less_than_padded_under_a_token_budget(folders, tmp_path):
    result = profile_strategies(ProfileConfig(folders, strategies=["padded", "packed"],
                                              batch_tokens=4200, steps=8))
    plot_profile(result, tmp_path / "chart.svg")  # any format matplotlib writes, by suffix
    assert (tmp_path / "chart.svg").read_text().lstrip().startswith("<?xml")
    packed, padded = result["strategies"]["packed"], result["strategies"]["padded"]
    # packed: the share of the budget its tokens leave empty (only an epoch's last bin is short);
    # padded: the share of its B × longest slots without a token
    expected_packed = np.mean([1 - b.real_tokens / 4200
                               for b in reference(folders, "packed", steps=8, batch_tokens=4200)])
    expected_padded = np.mean([1 - b.real_tokens / b.num_slots
                               for b in reference(folders, "padded", steps=8, batch_tokens=4200)])
    assert packed["padding_fraction"] == pytest.approx(expected_packed)
    assert padded["padding_fraction"] == pytest.approx(expected_padded)
    assert packed["padding_fraction"] < padded["padding_fraction"] / 2
    assert packed["real_tokens"] > padded["real_tokens"]  # the same batches carry more real tokens
    assert result["data"]["longest_sample_tokens"] == 1400


@pytest.mark.parametrize("mix_by", ["tokens", "samples"])
def test_mixture_reports_requested_against_realised_shares(folders, mix_by):
    weighted = [f"{folders[0]}=1", f"{folders[1]}=1", f"{folders[2]}=2"]
    result = profile_strategies(ProfileConfig(weighted, strategies=["packed"], batch_tokens=4200,
                                              steps=6, mix_by=mix_by))
    mix = result["mixture"]
    assert mix["mix_by"] == mix_by and mix["splits"] == ALL_SPLITS
    shares = mix["folders"]
    assert list(shares) == ["digits", "cartpole", "pydocs"]
    requested = np.array([f["requested"] for f in shares.values()])
    np.testing.assert_allclose(requested, [0.25, 0.25, 0.5])
    realised = np.array([f[mix_by] for f in shares.values()])
    # over the epoch, in its own unit; draws are whole samples, and an epoch here holds ~9 episodes
    # of 1,400 tokens, so a token share moves in steps of several points
    np.testing.assert_allclose(realised, requested, atol=0.05)
    packed = result["strategies"]["packed"]
    assert sum(packed["token_share"].values()) == pytest.approx(1.0)
    batches = reference(weighted, "packed", steps=6, batch_tokens=4200, mix_by=mix_by)
    assert packed["single_source_fraction"] == pytest.approx(
        np.mean([len(set(b.numpy("sample_folder").tolist())) == 1 for b in batches]))


def test_step_fn_measures_the_time_waiting_for_data(folders):
    seen = []

    def step(batch):
        seen.append(batch.batch_size)
        time.sleep(0.01)  # a model step that takes much longer than assembling a small batch

    result = profile_strategies(ProfileConfig(folders, strategies=["packed"], batch_samples=4,
                                              steps=6, step_fn=step))
    r = result["strategies"]["packed"]
    assert seen == [4] * 8  # 2 warm-up steps (before the clock starts), 6 measured
    assert 0 < r["step"]["data_wait_fraction"] < 0.5
    assert r["step"]["step_seconds"] >= 0.06 and r["step"]["real_tokens_per_s"] > 0
    assert r["step"]["first_step_seconds"] >= 0.01 and r["step"]["compile_graphs"] is None
    assert r["seconds"] >= r["step"]["step_seconds"] + r["data_wait_seconds"] - 1e-6
    assert result["config"]["step_fn"].endswith("step")


@pytest.mark.parametrize("overrides, message", [
    (dict(strategies=["pakced"]), "unknown strategy 'pakced'; did you mean 'packed'"),
    (dict(strategies=["packed", "packed"]), "more than once"),
    (dict(strategies=[]), "--strategies is empty"),
    (dict(batch_tokens=4096), "exactly one of --batch-tokens and --batch-samples"),
    (dict(batch_samples=None), "exactly one of --batch-tokens and --batch-samples"),
    (dict(steps=0), "--steps 0"),
    (dict(device="tpu"), "--device 'tpu'"),
    (dict(batch_samples=None, batch_tokens=1000), "smaller than sample 'cartpole-"),
    (dict(worker_type="fiber"), "--worker-type 'fiber'"),
])
def test_bad_flags_fail_before_measuring(folders, overrides, message):
    cfg = ProfileConfig(folders, batch_samples=8, steps=2)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(MMToolError, match=message):
        profile_strategies(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_device_is_refused(folders):
    with pytest.raises(MMToolError, match="--device cuda: torch sees no CUDA device"):
        profile_strategies(ProfileConfig(folders, batch_samples=8, device="cuda"))


def test_plot_path_needs_an_image_suffix(tmp_path):
    with pytest.raises(MMToolError, match="--plot .*chart.txt: expected a file ending in .png"):
        check_plot_path(tmp_path / "chart.txt")


def test_the_profiled_step_trains_the_default_objectives_the_data_can_feed():
    patches = Stream("image:patches", "image", "values", dim=16)
    text = Stream("text:wordpiece", "text", "ids", vocab_size=100)
    assert step_objectives([patches, text]) == {"next-token": 1.0, "masked-patch": 1.0}
    assert step_objectives([patches]) == {"masked-patch": 1.0}  # e.g. an embedding folder
    assert step_objectives([text]) == {"next-token": 1.0}
    with pytest.raises(MMToolError, match="next-token"):
        step_objectives([Stream("separator", "separator", "none")])
