"""Loader: deterministic, exactly resumable, exact rank/worker splits, one H2D copy per batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mmtool.data.loader import Loader, LoaderConfig
from mmtool.errors import MMToolError

SMALL = ("digits", "cartpole", "pendulum", "jsonl", "prompted")  # 353 samples, every layout case
ALL_SPLITS = ["train", "validation", "test"]  # `prompted`'s one row is a validation row


def make(folders, names=SMALL, **kw) -> Loader:
    cfg = dict(data=folders.paths(*names), batch_tokens=2048, seed=3, splits=ALL_SPLITS)
    cfg.update(kw)
    return Loader(LoaderConfig(**cfg))


def take(loader: Loader, n: int) -> list[bytes]:
    return [b.buffer.numpy().tobytes() for b in itertools.islice(loader.forever(), n)]


def close(loader: Loader) -> None:
    """Stops a loader's workers now. (Loader has no close(); its worker stream references the
    loader, so without this the worker processes live until the garbage collector finds the cycle,
    and shutting them down then stalls whichever later test triggers it.)"""
    loader._stream = None


def epoch_samples(loader: Loader) -> np.ndarray:
    return np.concatenate([b.numpy("sample_index") for b in loader])


def test_same_config_same_batches_other_seed_differs(data):
    a, b = take(make(data), 12), take(make(data), 12)
    assert a == b
    assert take(make(data, seed=4), 12) != a


def test_an_epoch_visits_every_sample_once_and_then_stops(data):
    loader = make(data, strategy="padded")
    n = len(loader)
    seen = [b.numpy("sample_index") for b in loader]
    assert len(seen) == n and loader.epoch == 1 and loader.batch == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(loader.index)))
    assert not np.array_equal(epoch_samples(loader), np.concatenate(seen))  # epoch 1 reshuffles


@pytest.mark.parametrize("k", [0, 5, 17, 29])
def test_resume_mid_epoch_is_byte_identical(data, k):
    first = make(data)
    total = len(first) + 6  # into the next epoch (30 batches per epoch)
    assert k < len(first)
    reference = take(make(data), total)
    assert take(first, k) == reference[:k]
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (0, k)
    resumed = make(data)
    resumed.load_state_dict(state)
    assert take(resumed, total - k) == reference[k:]
    assert resumed.state_dict() == make_and_take_state(data, total)


def make_and_take_state(data, n, **kw):
    loader = make(data, **kw)
    take(loader, n)
    return loader.state_dict()


def test_resume_exactly_at_the_epoch_boundary(data):
    first = make(data)
    n = len(first)
    reference = take(make(data), n + 4)
    take(first, n)
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 0)
    resumed = make(data)
    resumed.load_state_dict(state)
    assert take(resumed, 4) == reference[n:]


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_workers_give_the_same_batches_and_resume_exactly(data, worker_type):
    names = ("cartpole", "pendulum", "jsonl")  # small: process workers pay per start
    size = dict(batch_tokens=None, batch_samples=6)
    reference = take(make(data, names, **size), 16)
    assert len(make(data, names, **size)) == 9
    loader = make(data, names, num_workers=2, worker_type=worker_type, prefetch=2, **size)
    assert take(loader, 7) == reference[:7]
    state = loader.state_dict()
    close(loader)
    resumed = make(data, names, num_workers=2, worker_type=worker_type, prefetch=2, **size)
    resumed.load_state_dict(state)
    try:
        assert take(resumed, 9) == reference[7:16]  # across the epoch boundary
    finally:
        close(resumed)


@pytest.mark.parametrize("workers", [1, 2])
def test_thread_worker_counts_agree_over_epochs(data, workers):
    reference = take(make(data), 45)
    assert take(make(data, num_workers=workers, worker_type="thread"), 45) == reference


def test_load_state_dict_in_a_used_loader_drops_prefetched_batches(data):
    reference = take(make(data, num_workers=2), 12)
    loader = make(data, num_workers=2)
    state = None
    for i, _ in enumerate(loader.forever()):
        if i == 2:
            state = loader.state_dict()
        if i == 8:
            break
    loader.load_state_dict(state)
    assert take(loader, 9) == reference[3:12]


def test_state_dict_refuses_another_seed_or_strategy(data):
    state = make(data).state_dict()
    with pytest.raises(MMToolError, match="seed=3"):
        make(data, seed=9).load_state_dict(state)
    with pytest.raises(MMToolError, match="strategy='packed'"):
        make(data, strategy="padded").load_state_dict(state)


@pytest.mark.parametrize("strategy,size", [("packed", dict(batch_tokens=2048)),
                                           ("padded", dict(batch_samples=7)),
                                           ("by-modality", dict(batch_tokens=2048))])
def test_two_ranks_split_an_epoch_exactly(data, strategy, size):
    kw = dict(strategy=strategy, batch_tokens=None)
    kw.update(size)
    ranks = [make(data, rank=r, world_size=2, **kw) for r in (0, 1)]
    whole = make(data, **kw)
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1 and len(ranks[0]) + len(ranks[1]) == len(whole)
    for epoch in range(2):
        got = [epoch_samples(r) for r in ranks]
        assert not set(got[0].tolist()) & set(got[1].tolist())
        np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(len(whole.index)))
        # rank r gets planned batches r, r+2, ...
        plan = whole.plan(epoch)
        np.testing.assert_array_equal(got[0], np.concatenate(plan[0::2]))
        np.testing.assert_array_equal(got[1], np.concatenate(plan[1::2]))


def test_ranks_with_workers_split_a_weighted_epoch(data):
    names = ("digits", "cartpole", "jsonl")
    kw = dict(data=[f"{p}={w}" for p, w in zip(data.paths(*names), (1, 3, 2))], samples_per_epoch=400)
    ranks = [make(data, rank=r, world_size=2, num_workers=2, **kw) for r in (0, 1)]
    whole = make(data, **kw)
    got = np.concatenate([epoch_samples(r) for r in ranks])
    np.testing.assert_array_equal(np.sort(got), np.sort(whole.mixture.epoch(0)))
    assert len(got) == 400


def test_drawn_counts_add_up(data):
    kw = dict(data=[f"{p}={w}" for p, w in zip(data.paths(*SMALL), (1, 2, 2, 1, 1))],
              samples_per_epoch=500)
    loader = make(data, **kw)
    samples = np.zeros(len(SMALL), np.int64)
    tokens = np.zeros(len(SMALL), np.int64)
    for batch in itertools.islice(loader.forever(), len(loader) + 5):
        folders = batch.numpy("sample_folder")
        samples += np.bincount(folders, minlength=len(SMALL))
        tokens += np.bincount(folders, batch.numpy("seqlens"), minlength=len(SMALL)).astype(np.int64)
    drawn = loader.drawn_by_folder()
    assert [d["samples"] for d in drawn.values()] == samples.tolist()
    assert [d["tokens"] for d in drawn.values()] == tokens.tolist()
    assert list(drawn) == data.paths(*SMALL)
    first_epoch = np.bincount(loader.index.folder_of(loader.mixture.epoch(0)), minlength=len(SMALL))
    assert (samples >= first_epoch).all() and samples.sum() > 500
    # counters survive a resume
    resumed = make(data, **kw)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.drawn_by_folder() == drawn


def test_batch_to_device_is_one_copy(data):
    batch = next(make(data).forever())
    assert batch.to("cpu") is batch and batch.h2d_copies == 0
    devices = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        moved = batch.to(device)
        assert moved.buffer.device.type == device
        assert moved.h2d_copies == 1 and moved.h2d_bytes == batch.buffer.numel()
        assert moved["slot_sample"].device.type == device
        assert moved["slot_sample"].shape == batch["slot_sample"].shape
        assert moved.to(device) is moved
        if device != "meta":
            assert torch.equal(moved.buffer.cpu(), batch.buffer)


# -- bad configuration: refused before any batch is made ----------------------------------------
def test_weight_must_be_positive(data):
    for w in ("0", "-1", "abc"):
        with pytest.raises(MMToolError, match=rf"--data .*digits={w}: weight"):
            Loader(LoaderConfig(data=[f"{data.dirs['digits']}={w}"], batch_tokens=2048))


def test_budget_below_the_longest_sample(data):
    with pytest.raises(MMToolError) as err:
        make(data, batch_tokens=1000)
    msg = str(err.value)
    assert "--batch-tokens 1000 is smaller than sample" in msg
    longest = max(data.samples("cartpole"), key=lambda s: s.n_tokens)
    assert f"'{longest.id}'" in msg and "(1400 tokens)" in msg, msg


def test_unknown_strategy_suggests_a_close_match(data):
    with pytest.raises(MMToolError, match=r"unknown strategy 'packd'; did you mean 'packed'"):
        make(data, strategy="packd")


def test_bad_loader_flags(data):
    for kw, match in ((dict(worker_type="fork"), "--worker-type"), (dict(num_workers=-1), "--num-workers"),
                      (dict(rank=2, world_size=2), "outside world size"),
                      (dict(batch_samples=4), "exactly one of --batch-tokens")):
        with pytest.raises(MMToolError, match=match):
            make(data, **kw)
    with pytest.raises(MMToolError, match="no data folders"):
        Loader(LoaderConfig(data=[], batch_tokens=2048))


def test_bad_folders_surface_through_the_loader(data, tmp_path):
    with pytest.raises(MMToolError, match="missing: no manifest.json"):
        Loader(LoaderConfig(data=[*data.paths("digits"), str(tmp_path / "missing")], batch_tokens=2048))
    folder = data.copy("pendulum", tmp_path)
    shard = folder / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-1] + b"?")
    with pytest.raises(MMToolError, match="shard is corrupt"):
        Loader(LoaderConfig(data=[str(folder)], batch_tokens=2048))


# -- splits: pretraining reads only the rows of the chosen splits --------------------------------
TRAIN_ONLY = ("digits", "cartpole", "pendulum", "jsonl")  # every folder has train rows


def test_default_splits_read_exactly_the_train_rows(data):
    loader = make(data, TRAIN_ONLY, splits=["train"])
    seen = epoch_samples(loader)
    index = loader.index
    column = [v for shard in index.shards for v in shard.table.column("split").to_pylist()]  # [N]
    want = np.flatnonzero(np.array(column) == "train")
    assert 0 < len(want) < len(index)  # the folders hold validation/test rows that stay out
    np.testing.assert_array_equal(np.sort(seen), want)  # each train row once, nothing else
    both = epoch_samples(make(data, TRAIN_ONLY, splits=["train", "validation"]))
    assert len(want) < len(both) < len(index)


def test_splits_resume_exactly_and_must_match(data):
    kw = dict(splits=["train"], batch_tokens=1500)
    reference = take(make(data, TRAIN_ONLY, **kw), 20)
    first = make(data, TRAIN_ONLY, **kw)
    assert take(first, 7) == reference[:7]
    resumed = make(data, TRAIN_ONLY, **kw)
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, 13) == reference[7:]
    other = make(data, TRAIN_ONLY, batch_tokens=1500, splits=["train", "test"])
    with pytest.raises(MMToolError, match="splits"):
        other.load_state_dict(first.state_dict())


def test_a_folder_without_rows_in_the_splits_is_named(data):
    with pytest.raises(MMToolError, match=r"prompted has no row in splits train \(it has validation\)"
                                          r".*--splits validation"):
        make(data, ("digits", "prompted"), splits=["train"])
    with pytest.raises(MMToolError, match="--splits dev"):
        make(data, ("digits",), splits=["dev"])
