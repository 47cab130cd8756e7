"""The shard plan (`--plan shards`): O(shards) planning and state with the per-sample plan's
guarantees — every row once per epoch and rank split, exact shares, byte-identical resume."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from mmtool.data.loader import Loader, LoaderConfig
from mmtool.data.mixture import Mixture
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.shardplan import ShardPlan
from mmtool.errors import MMToolError

ALL_SPLITS = ["train", "validation", "test"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[str]:
    """pydocs (300 records) and cartpole (30 episodes) cut into 16-row shards: 17 + 2 shards."""
    root = tmp_path_factory.mktemp("sharded")
    out = []
    for name, kw in (("pydocs", dict(max_samples=300)), ("cartpole", dict(options=["episodes=30"]))):
        manifest = preprocess(PreprocessConfig(out=root / name, source=name, shard_size="16KB", **kw))
        assert len(manifest["shards"]) > 1, name
        out.append(str(root / name))
    return out


def make(paths, **kw) -> Loader:
    cfg = dict(data=list(paths), batch_tokens=2048, seed=5, splits=ALL_SPLITS, verify=False,
               plan="shards", shard_window=2)
    cfg.update(kw)
    return Loader(LoaderConfig(**cfg))


def take(loader: Loader, n: int) -> list[bytes]:
    return [b.buffer.numpy().tobytes() for b in itertools.islice(loader.forever(), n)]


def take_stop_resume(paths, k: int, n: int, **kw) -> list[bytes]:
    """The first `k` batches of one loader, then `n - k` of a new loader resumed from its state."""
    first = make(paths, **kw)
    try:
        got, state = take(first, k), first.state_dict()
    finally:
        first.close()
    resumed = make(paths, **kw)
    resumed.load_state_dict(state)
    try:
        return got + take(resumed, n - k)
    finally:
        resumed.close()


# -- the plan alone, from per-shard counts -------------------------------------------------------
SIZES = np.array([5, 7, 0, 3, 9, 4, 4, 6, 2, 11, 1])  # a shard may be empty
FOLDER = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])


def plan(weights=None, window=2, seed=1) -> ShardPlan:
    sizes = np.bincount(FOLDER, SIZES).astype(int).tolist()
    return ShardPlan(SIZES, FOLDER, Mixture(sizes, weights, seed=seed), window)


def test_natural_epochs_visit_every_row_exactly_once():
    p = plan()
    epochs = [p.epoch(e) for e in range(3)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(SIZES.sum()))
    assert not np.array_equal(epochs[0], epochs[1])
    assert p.blocks > 1


def test_weighted_epochs_draw_exact_counts_and_walk_laps():
    p = plan(weights=[1, 1, 3])
    first = np.searchsorted(p.first_row, np.arange(SIZES.sum()), side="right") - 1
    n = np.bincount(FOLDER, SIZES).astype(int)
    walks = [[] for _ in n]
    for e in range(4):
        order = p.epoch(e)
        folder = FOLDER[first[order]]
        np.testing.assert_array_equal(np.bincount(folder, minlength=3), p.counts)
        for f in range(3):
            walks[f].extend(order[folder == f].tolist())
    for f, walk in enumerate(walks):  # each lap through a folder is a permutation of its rows
        for lap in range(len(walk) // n[f]):
            assert sorted(walk[lap * n[f]:(lap + 1) * n[f]]) == sorted(set(walk))


def test_every_block_holds_the_mixture_to_within_one_draw_per_folder():
    p = plan(weights=[1, 2, 1], window=1)
    first = np.searchsorted(p.first_row, np.arange(SIZES.sum()), side="right") - 1
    for b in range(p.blocks):
        got = np.bincount(FOLDER[first[p.block(2, b)]], minlength=3)
        want = (b + 1) * p.counts // p.blocks - b * p.counts // p.blocks
        np.testing.assert_array_equal(got, want)
        assert (np.abs(got - p.counts / p.blocks) < 1).all()


def test_a_block_is_a_pure_function_of_seed_epoch_and_block():
    warm = plan()
    walked = [warm.block(e, b) for e in range(2) for b in range(warm.blocks)]
    cold = plan()
    np.testing.assert_array_equal(cold.block(1, 2), walked[warm.blocks + 2])
    assert not np.array_equal(plan(seed=2).block(1, 2), cold.block(1, 2))


def test_plan_refuses_counts_that_do_not_match_the_mixture():
    with pytest.raises(MMToolError, match="shard sizes sum to"):
        ShardPlan(SIZES, FOLDER, Mixture([1, 2, 3]))
    with pytest.raises(MMToolError, match="--shard-window 0"):
        plan(window=0)


def test_a_billion_row_plan_stays_small_and_plans_a_block_fast():
    shards = 10_000
    sizes = np.full(shards, 100_000, np.int64)  # 10^9 rows, metadata only
    t0 = time.perf_counter()
    p = ShardPlan(sizes, np.zeros(shards, np.int64), Mixture([int(sizes.sum())], seed=0), window=2)
    block = p.block(3, p.blocks // 2)
    seconds = time.perf_counter() - t0
    assert len(p) == 10**9 and p.nbytes() < 40 * shards + 16 * len(block)  # per shard, one window
    assert len(block) == 200_000 and len(np.unique(block)) == len(block)
    shard_of = np.unique(np.searchsorted(p.first_row, block, side="right") - 1)
    assert len(shard_of) == 2  # one window: the block's rows come from its two shards only
    assert seconds < 10, seconds


# -- the loader under --plan shards ----------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("strategy,size", [("packed", dict(batch_tokens=2048)),
                                           ("padded", dict(batch_tokens=None, batch_samples=7))])
def test_rank_splits_draw_every_row_once_per_epoch(sharded, world, strategy, size):
    ranks = [make(sharded, rank=r, world_size=world, strategy=strategy, **size) for r in range(world)]
    assert ranks[0].shard_plan is not None and ranks[0].shard_plan.blocks > 3
    drawn = [np.concatenate([b.numpy("sample_index") for b in ld]) for ld in ranks]
    np.testing.assert_array_equal(np.sort(np.concatenate(drawn)), ranks[0].members)
    counts = [len(ld.plan(0)) for ld in ranks]
    assert max(counts) - min(counts) <= ranks[0].shard_plan.blocks  # at most one per block
    assert all(ld.epoch == 1 and ld.batch == 0 for ld in ranks)


@pytest.mark.parametrize("k", [0, 3, 11])
def test_resume_mid_epoch_is_byte_identical(sharded, k):
    first = make(sharded)
    per_epoch = len(first.plan(0))
    assert k < per_epoch
    reference = take(make(sharded), per_epoch + 5)  # into the next epoch
    assert take(first, k) == reference[:k]
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as checkpoints keep it
    assert state["plan"] == "shards" and state["batch"] == k
    resumed = make(sharded)
    resumed.load_state_dict(state)
    assert take(resumed, per_epoch + 5 - k) == reference[k:]
    assert resumed.state_dict()["epoch"] == 1


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_workers_and_ranks_resume_exactly(sharded, worker_type):
    kw = dict(rank=1, world_size=2, num_workers=2, worker_type=worker_type, prefetch=2)
    reference = take(make(sharded, rank=1, world_size=2), 20)
    assert take_stop_resume(sharded, 8, 20, **kw) == reference


def test_remote_shards_under_the_shard_plan_equal_local_and_resume(sharded, tmp_path):
    import fsspec

    url = f"memory://scale-{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(url)
    remote = []
    for folder in map(Path, sharded):
        for f in sorted(folder.iterdir()):
            if f.is_file():
                fs.put_file(str(f), f"{root}/{folder.name}/{f.name}")
        remote.append(f"{url}/{folder.name}")
    kw = dict(cache_dir=str(tmp_path / "cache"), cache_limit="200KB")  # below the 19 shards (~440KB): evicts
    reference = take(make(sharded), 20)
    assert take_stop_resume(remote, 9, 20, **kw) == reference


def test_state_size_does_not_grow_with_the_rows(sharded):
    sizes = []
    for fraction in ("0.25", "1"):
        ld = make([f"{p}:fraction={fraction}" for p in sharded], batch_tokens=None, batch_samples=4)
        take(ld, 5)
        state = ld.state_dict()
        assert all(isinstance(v, (int, str)) or len(v) <= len(sharded)  # per-folder counters
                   for k, v in state.items() if k != "splits")
        sizes.append((len(ld.members), len(json.dumps(state).encode())))
    (small_rows, small_bytes), (rows, nbytes) = sizes
    assert rows > 3 * small_rows
    assert nbytes < 1024 and abs(nbytes - small_bytes) <= 8  # only counters' digits differ


def test_weighted_shares_are_exact_per_epoch(sharded):
    ld = make([f"{sharded[0]}=1", f"{sharded[1]}=3"], mix_by="samples", samples_per_epoch=200)
    for epoch in range(2):
        folder = ld.index.sample_folder[ld.order(epoch)]
        np.testing.assert_array_equal(np.bincount(folder, minlength=2), ld.mixture.counts())
    np.testing.assert_array_equal(ld.mixture.counts(), [50, 150])


def test_auto_keeps_the_per_sample_plan_for_small_data_and_states_do_not_cross(sharded):
    auto = make(sharded, plan="auto")
    assert auto.shard_plan is None and auto.state_dict()["plan"] == "samples"
    with pytest.raises(MMToolError, match="plan='shards'"):
        auto.load_state_dict(make(sharded).state_dict())
    with pytest.raises(MMToolError, match="--plan 'rows'"):
        make(sharded, plan="rows")
    with pytest.raises(MMToolError, match="shard_window=2"):
        make(sharded, shard_window=3).load_state_dict(make(sharded).state_dict())


@pytest.mark.slow  # two 6-step trainings and a resume: ~40-60 s on 2 shared cores
def test_training_killed_mid_run_resumes_bitwise_under_the_shard_plan(sharded, tmp_path):
    from mmtool.models.model import ModelConfig
    from mmtool.train import TrainConfig, train

    def config(out, **kw):
        return TrainConfig(data=list(sharded), out=out, plan="shards", shard_window=8,
                           batch_tokens=2048, max_steps=6, save_every=3, warmup=2, num_workers=0,
                           splits=ALL_SPLITS, model=ModelConfig(size="tiny"), **kw)

    def losses(run):
        return [json.loads(x)["losses"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    train(config(tmp_path / "straight"))
    with pytest.raises(MMToolError, match="at step 5"):
        train(config(tmp_path / "broken", fault_nan_step=5))  # dies after the step-3 checkpoint
    [state] = json.loads((tmp_path / "broken" / "checkpoints" / "step-00000003" / "state.json")
                         .read_text())["loader"]
    assert state["plan"] == "shards" and state["block_batch"] > 0  # killed inside a block
    train(config(tmp_path / "broken"), resume=True)
    assert losses(tmp_path / "broken") == losses(tmp_path / "straight")  # bitwise on CPU
