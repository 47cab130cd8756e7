"""Batching: every batch's tokens reassemble into the samples' segments; planners cover each
sample once, respect budgets and pad as little as claimed."""

from __future__ import annotations

import numpy as np
import pytest

from mmtool.data.batching import (STRATEGIES, BatchSize, _gather_rows, assemble,
                                  check_budget, padding_fraction)
from mmtool.data.index import SEPARATOR, TokenIndex
from mmtool.data.mixture import Mixture
from mmtool.data.schema import Sample, timestep_layout
from mmtool.errors import MMToolError

ALL_STRATEGIES = ("per-sample", "by-modality", "by-modality-sorted", "padded", "packed")
BUDGET = 2048  # tokens; the longest sample (a cartpole episode) has 1400


@pytest.fixture(scope="module")
def mix(data):
    """The index over every folder and the reference samples in its global order."""
    index = TokenIndex(data.all)
    samples = data.samples()
    assert len(index) == len(samples) == 759  # 300 pydocs records chunk into 306 samples
    return index, samples


# -- the reference layout, built from the rows alone (not from the index) ----------------------
def is_trajectory(sample: Sample) -> bool:
    roles = {g.role for g in sample.segments}
    return {"observation", "action"} <= roles


def reference_layout(sample: Sample) -> list[tuple[int, int]]:
    """(segment number or -1 for a separator, token within segment or timestep) per position.

    Plain segments come first, in segment order; trajectory segments follow as
    `schema.timestep_layout` interleaves them.
    """
    steps = None
    if is_trajectory(sample):
        steps = next(g for g in sample.segments if g.role == "observation").shape[0]
    timestep = {g.role: i for i, g in enumerate(sample.segments)
                if steps is not None and g.role in ("observation", "action", "reward")
                and g.shape[0] == steps}
    out = [(i, j) for i, g in enumerate(sample.segments) if i not in timestep.values()
           for j in range(g.n_tokens)]
    if steps is not None:
        for role, t, k in timestep_layout(sample):
            if role == "separator":
                out.append((-1, t))
            else:
                g = sample.segments[timestep[role]]
                out.append((timestep[role], t * (g.n_tokens // steps) + k))
    return out


def check_batch(index: TokenIndex, batch, samples: list[Sample], planned: np.ndarray) -> None:
    """Asserts that `batch` holds exactly the tokens of `planned`, each where it belongs."""
    b = len(planned)
    sep_id = index.stream_ids[SEPARATOR]
    num = batch.numpy
    np.testing.assert_array_equal(num("sample_index"), planned)
    lens = num("seqlens")
    np.testing.assert_array_equal(lens, index.lengths[planned])
    cu = num("cu_seqlens")
    slot_sample, slot_pos = num("slot_sample"), num("slot_pos")
    slot_stream, slot_segment = num("slot_stream"), num("slot_segment")
    if batch.layout == "packed":
        np.testing.assert_array_equal(cu, np.r_[0, np.cumsum(lens)])
        assert batch.num_slots == lens.sum()
        assert (slot_sample >= 0).all()
    else:
        width = int(lens.max())
        np.testing.assert_array_equal(cu, np.arange(b + 1) * width)
        assert batch.num_slots == b * width
        pad = np.ones(batch.num_slots, bool)
        for i in range(b):
            pad[cu[i]:cu[i] + lens[i]] = False
        assert (slot_sample[pad] == -1).all() and (slot_stream[pad] == -1).all()
        assert (slot_segment[pad] == -1).all()
        assert pad.sum() == batch.num_slots - lens.sum()
    seg_sample = num("seg_sample")
    seg_first = np.searchsorted(seg_sample, np.arange(b))  # first batch-local segment of sample i
    np.testing.assert_array_equal(num("sample_folder"), index.folder_of(planned))
    expected_labels = [-1 if samples[s].label is None else samples[s].label for s in planned]
    np.testing.assert_array_equal(num("label"), expected_labels)

    # Every stream's tokens: an inverse map slot -> token of that stream.
    token_of = {}
    for k in batch.streams:
        slots = num(f"s{k}.slot")
        inv = np.full(batch.num_slots, -1, np.int64)
        inv[slots] = np.arange(len(slots))
        assert (slot_stream[slots] == k).all()
        token_of[k] = inv
    assert sum(len(num(f"s{k}.slot")) for k in batch.streams) == lens.sum()

    for i, s in enumerate(planned):
        sample = samples[s]
        rows = np.arange(cu[i], cu[i] + lens[i])
        assert (slot_sample[rows] == i).all()
        np.testing.assert_array_equal(slot_pos[rows], np.arange(lens[i]))
        ref = np.array(reference_layout(sample), np.int64).reshape(-1, 2)
        assert len(ref) == lens[i], sample.id
        ref_seg, ref_tok = ref[:, 0], ref[:, 1]
        n_segs = len(sample.segments)
        assert (seg_sample[seg_first[i]:seg_first[i] + n_segs] == i).all()
        # Separators: in the separator stream, not part of any segment, pos = their timestep.
        sep_rows = rows[ref_seg == -1]
        assert (slot_stream[sep_rows] == sep_id).all() and (slot_segment[sep_rows] == -1).all()
        if len(sep_rows):
            np.testing.assert_array_equal(num(f"s{sep_id}.pos")[token_of[sep_id][sep_rows]],
                                          ref_tok[ref_seg == -1])
        for g, seg in enumerate(sample.segments):
            where = rows[ref_seg == g]  # this segment's slots, in sequence order
            assert len(where) == seg.n_tokens
            k = index.stream_ids[f"{seg.modality}:{seg.tokenizer}"]
            assert (slot_stream[where] == k).all(), (sample.id, seg.role)
            assert (slot_segment[where] == seg_first[i] + g).all()
            assert num("seg_stream")[seg_first[i] + g] == k
            tok = token_of[k][where]
            assert (tok >= 0).all()
            # In sequence order the tokens are the segment's, in the segment's own order.
            np.testing.assert_array_equal(num(f"s{k}.pos")[tok], ref_tok[ref_seg == g])
            np.testing.assert_array_equal(ref_tok[ref_seg == g][np.argsort(ref_tok[ref_seg == g])],
                                          np.arange(seg.n_tokens))
            pos = num(f"s{k}.pos")[tok]
            if seg.ids is not None:
                np.testing.assert_array_equal(num(f"s{k}.ids")[tok], seg.ids[pos])
            else:
                dim = seg.shape[-1]
                np.testing.assert_array_equal(num(f"s{k}.values")[tok],
                                              seg.values.reshape(-1, dim)[pos])


# -- round trip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_round_trip_every_strategy_both_layouts(mix, strategy):
    index, samples = mix
    order = Mixture(index.folder_sizes(), seed=3).epoch(0)
    size = BatchSize(tokens=BUDGET) if strategy != "per-sample" else BatchSize(samples=1)
    plan = STRATEGIES.get(strategy).plan(index, order, size)
    if strategy == "per-sample":
        plan = plan[::7]  # 759 one-sample batches × 2 layouts is slow and adds nothing
    for planned in plan:
        for layout in ("packed", "padded"):
            check_batch(index, assemble(index, planned, layout), samples, planned)


def test_trajectory_layout_with_prompt_and_rewards(mix, data):
    """The prompted episode: text first, then obs×4 | sep | action | reward per timestep."""
    index, samples = mix
    s = next(i for i, x in enumerate(samples) if x.id == "prompted-cartpole")
    batch = assemble(index, np.array([s]), "packed")
    keys = [index.streams[k].key for k in batch.numpy("slot_stream")]
    prompt = samples[s].segments[0].n_tokens
    assert keys[:prompt] == ["text:wordpiece"] * prompt
    step = ["observation:mulaw"] * 4 + [SEPARATOR, "action:discrete", "reward:raw-float"]
    assert keys[prompt:] == step * 3
    check_batch(index, batch, samples, np.array([s]))
    rewards = batch.numpy(f"s{index.stream_ids['reward:raw-float']}.values")
    np.testing.assert_array_equal(rewards[:, 0], [1.0, 0.5, 0.25])


def test_every_trajectory_sample_follows_timestep_layout(mix):
    index, samples = mix
    traj = np.array([i for i, s in enumerate(samples) if is_trajectory(s)])
    assert len(traj) == 30 + 10 + 3 + 1  # cartpole, pendulum, jsonl episodes, prompted
    batch = assemble(index, traj, "padded")
    check_batch(index, batch, samples, traj)
    keys = np.array([s.key for s in index.streams] + ["<pad>"])
    for i, s in enumerate(traj):
        sample = samples[s]
        row = batch.numpy("slot_stream")[batch.numpy("cu_seqlens")[i]:][:batch.numpy("seqlens")[i]]
        role_key = {g.role: f"{g.modality}:{g.tokenizer}" for g in sample.segments}
        prefix = [f"{g.modality}:{g.tokenizer}" for g in sample.segments
                  if g.role not in ("observation", "action", "reward")
                  for _ in range(g.n_tokens)]
        want = prefix + [SEPARATOR if r == "separator" else role_key[r]
                         for r, _, _ in timestep_layout(sample)]
        assert keys[row].tolist() == want, sample.id
        assert index.steps[s] == sample.segments[-1].shape[0]


# -- planners -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("size", [BatchSize(tokens=BUDGET), BatchSize(samples=16)],
                         ids=["tokens", "samples"])
def test_every_epoch_covers_each_planned_sample_once(mix, strategy, size):
    index, _ = mix
    mixture = Mixture(index.folder_sizes(), weights=[1, 1, 3, 2, 1, 5, 5], seed=1)
    for epoch in range(2):
        order = mixture.epoch(epoch)
        plan = STRATEGIES.get(strategy).plan(index, order, size)
        assert all(len(p) for p in plan)
        np.testing.assert_array_equal(np.sort(np.concatenate(plan)), np.sort(order))
        if strategy == "per-sample":
            assert all(len(p) == 1 for p in plan)


def test_packed_respects_budget_with_little_padding(mix):
    index, _ = mix
    size = BatchSize(tokens=BUDGET)
    fractions = []
    for seed in range(3):
        order = Mixture(index.folder_sizes(), seed=seed).epoch(0)
        for planned in STRATEGIES.get("packed").plan(index, order, size):
            assert index.lengths[planned].sum() <= BUDGET
            fractions.append(padding_fraction(assemble(index, planned, "packed"), size))
    assert np.mean(fractions) <= 0.02, np.mean(fractions)


@pytest.mark.parametrize("aligned", [True, False])
def test_gather_rows_copies_each_segments_token_rows(aligned):
    """A shard whose values mix vector sizes puts segments at any float offset: both paths."""
    dim, values = 4, np.arange(100, dtype=np.float32)
    start = np.array([8, 40, 20]) + (0 if aligned else 1)  # segments' first floats
    n = np.array([3, 2, 4])  # tokens per segment
    back = np.array([0, 3, 5])  # their first token in the run
    out = np.full((9, dim), np.nan, np.float32)
    _gather_rows(values, dim, start, back, n, out)
    expected = np.concatenate([values[a:a + k * dim].reshape(k, dim) for a, k in zip(start, n)])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("strategy", ["padded", "by-modality"])
def test_padded_layouts_pad_much_more(mix, strategy):
    index, _ = mix
    size = BatchSize(tokens=BUDGET)
    order = Mixture(index.folder_sizes(), seed=0).epoch(0)
    plan = STRATEGIES.get(strategy).plan(index, order, size)
    batches = [assemble(index, p, "padded") for p in plan]
    for p, batch in zip(plan, batches):  # a padded batch costs B × longest, within the budget
        assert batch.num_slots <= BUDGET or len(p) == 1
        # the padded fraction is exactly the share of empty slots
        assert padding_fraction(batch, size) == pytest.approx(
            (batch.num_slots - index.lengths[p].sum()) / batch.num_slots)
    assert np.mean([padding_fraction(b, size) for b in batches]) > 0.30


def test_by_modality_batches_hold_one_signature_each(mix):
    index, _ = mix
    order = Mixture(index.folder_sizes(), seed=0).epoch(0)
    for size in (BatchSize(tokens=BUDGET), BatchSize(samples=8)):
        plan = STRATEGIES.get("by-modality").plan(index, order, size)
        assert all(len(np.unique(index.signature[p])) == 1 for p in plan)
        # the groups are interleaved by where their first sample stood in the mixture order
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        firsts = [rank[p[0]] for p in plan]
        assert firsts == sorted(firsts)
    assert len(np.unique(index.signature)) == 7  # the mixture really is mixed


@pytest.mark.parametrize("size", [BatchSize(tokens=BUDGET), BatchSize(samples=8)])
def test_by_modality_sorted_keeps_one_signature_per_batch_and_pads_less(mix, size):
    index, _ = mix
    order = Mixture(index.folder_sizes(), seed=0).epoch(0)

    def padding(strategy):
        plan = STRATEGIES.get(strategy).plan(index, order, size)
        assert all(len(np.unique(index.signature[p])) == 1 for p in plan)
        return np.mean([1 - index.lengths[p].sum() / (len(p) * index.lengths[p].max()) for p in plan])

    plain, bucketed = padding("by-modality"), padding("by-modality-sorted")
    assert bucketed < min(plain / 4, 0.10), (plain, bucketed)


def test_batch_samples_gives_identical_sample_sets_for_packed_and_padded(mix):
    index, _ = mix
    order = Mixture(index.folder_sizes(), seed=5).epoch(0)
    size = BatchSize(samples=12)
    packed = STRATEGIES.get("packed").plan(index, order, size)
    padded = STRATEGIES.get("padded").plan(index, order, size)
    assert len(packed) == len(padded) == -(-len(order) // 12)
    for a, b in zip(packed, padded):
        np.testing.assert_array_equal(a, b)
        x, y = assemble(index, a, "packed"), assemble(index, b, "padded")
        assert x.real_tokens == y.real_tokens
        for k in x.streams:  # same tokens, only the slots differ
            key = f"s{k}.ids" if f"s{k}.ids" in x else f"s{k}.pos"
            np.testing.assert_array_equal(x.numpy(key), y.numpy(key))


def test_check_budget_names_the_longest_sample(mix):
    index, samples = mix
    longest = int(np.argmax(index.lengths))
    check_budget(index, np.arange(len(index)), BatchSize(tokens=int(index.lengths[longest])))
    with pytest.raises(MMToolError, match="--batch-tokens 1000") as err:
        check_budget(index, np.arange(len(index)), BatchSize(tokens=1000))
    assert samples[longest].id in str(err.value) and f"({index.lengths[longest]} tokens)" in str(err.value)


def test_batch_size_needs_exactly_one():
    for bad in (dict(), dict(tokens=10, samples=2), dict(tokens=0), dict(samples=-1)):
        with pytest.raises(MMToolError, match="--batch-"):
            BatchSize(**bad)


# -- packed follows the mixture order; warnings when batches do not -----------------------------
def test_packed_bins_take_the_next_draws_of_the_order(mix):
    from mmtool.data.batching import PACK_LOOKAHEAD

    index, _ = mix
    order = Mixture(index.folder_sizes(), seed=4).epoch(0)  # a permutation: positions are unique
    plan = STRATEGIES.get("packed").plan(index, order, BatchSize(tokens=BUDGET))
    where = np.empty(len(index), np.int64)
    where[order] = np.arange(len(order))  # position of each sample in the mixture order
    placed = where[np.concatenate(plan)]  # [L] order positions, in plan order
    shift = np.arange(len(placed)) - placed  # how far packing moved each sample
    longest_bin = max(len(p) for p in plan)
    assert shift.max() <= PACK_LOOKAHEAD + longest_bin and -shift.min() <= PACK_LOOKAHEAD + longest_bin
    fills = np.array([index.lengths[p].sum() for p in plan])
    assert fills.max() <= BUDGET


def test_plan_warnings_name_single_source_batches_and_whole_epoch_windows(mix):
    from mmtool.data.batching import plan_warnings

    index, _ = mix
    size = BatchSize(tokens=BUDGET)
    mixed = Mixture(index.folder_sizes(), seed=0).epoch(0)
    plan = STRATEGIES.get("packed").plan(index, mixed, size)
    assert plan_warnings(index, mixed, plan, size, "packed") == []
    by_folder = np.sort(mixed)  # folder after folder: every batch holds one folder
    plan = STRATEGIES.get("packed").plan(index, by_folder, size)
    (line,) = plan_warnings(index, by_folder, plan, size, "packed")
    assert "of one data folder only" in line
    single = sum(len(np.unique(index.sample_folder[p])) == 1 for p in plan)
    assert line.startswith(f"{single} of {len(plan)} batches") and single > 0.1 * len(plan)
    small = mixed[:40]
    lines = plan_warnings(index, small, STRATEGIES.get("packed").plan(index, small, size), size, "packed")
    assert any("cover the whole epoch (40 samples)" in w for w in lines)
    one = np.flatnonzero(index.sample_folder == 0)
    assert plan_warnings(index, one, STRATEGIES.get("packed").plan(index, one, size), size, "packed") == []
