"""Sample schema: segments validate their shape, and samples survive an Arrow round trip."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mmtool.data.schema import (ARROW_SCHEMA, Sample, Segment, assign_split, rows_to_samples,
                                samples_to_batch, timestep_layout)


def sample(i: int) -> Sample:
    text = Segment("text", "caption", "wordpiece", (3,), ids=np.array([101, 7 + i, 102]))
    image = Segment("image", "image", "patches", (2, 2, 3), values=np.arange(12, dtype=np.float32) * i)
    return Sample(id=f"s{i}", source="test", task="caption", split="train",
                  segments=[image, text], label=i if i % 2 else None, meta={"i": i})


def test_segment_counts_tokens_and_checks_shape():
    seg = Segment("image", "image", "patches", (2, 3, 16), values=np.zeros(96))
    assert seg.n_tokens == 6 and seg.nbytes == 96 * 4 and seg.values.dtype == np.float32
    assert Segment("text", "t", "bytes", (5,), ids=np.arange(5)).n_tokens == 5
    with pytest.raises(ValueError, match="shape"):
        Segment("text", "t", "bytes", (4,), ids=np.arange(5))
    with pytest.raises(ValueError, match="exactly one"):
        Segment("text", "t", "bytes", (1,), ids=np.arange(1), values=np.zeros(1))


def test_arrow_round_trip_keeps_every_value():
    samples = [sample(i) for i in range(4)]
    batch = samples_to_batch(samples)
    assert batch.schema.equals(ARROW_SCHEMA) and batch.num_rows == 4
    back = rows_to_samples(batch)
    for a, b in zip(samples, back):
        assert (a.id, a.label, a.meta, a.split) == (b.id, b.label, b.meta, b.split)
        for sa, sb in zip(a.segments, b.segments):
            assert (sa.modality, sa.role, sa.tokenizer, sa.shape) == (sb.modality, sb.role, sb.tokenizer, sb.shape)
            if sa.ids is not None:
                np.testing.assert_array_equal(sa.ids, sb.ids)
                assert sb.values is None
            else:
                np.testing.assert_array_equal(sa.values, sb.values)
                assert sb.ids is None
    # token buffers are flat and contiguous: one child array across all rows
    ids = batch.column("segments").flatten().field("ids").flatten()
    assert ids.to_pylist() == [101, 7, 102, 101, 8, 102, 101, 9, 102, 101, 10, 102]
    assert pa.types.is_int32(ids.type)


def test_timestep_layout_interleaves_with_separators():
    obs = Segment("observation", "observation", "mulaw", (2, 3), ids=np.arange(6))
    act = Segment("action", "action", "discrete", (2, 1), ids=np.array([0, 1]))
    s = Sample("e", "cartpole", "control", "train", [obs, act])
    assert timestep_layout(s) == [
        ("observation", 0, 0), ("observation", 0, 1), ("observation", 0, 2), ("separator", 0, 0),
        ("action", 0, 0),
        ("observation", 1, 0), ("observation", 1, 1), ("observation", 1, 2), ("separator", 1, 0),
        ("action", 1, 0),
    ]


def test_split_assignment_is_stable_and_near_80_10_10():
    splits = [assign_split("digits", f"digits-{i}") for i in range(5000)]
    assert splits == [assign_split("digits", f"digits-{i}") for i in range(5000)]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["validation"] - 0.1) < 0.02
