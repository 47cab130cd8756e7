"""Slot-level fields are computed from the stored segment table, not shipped in the buffer.

That they hold the right values is `test_batching.check_batch`'s job (every strategy, both
layouts, against a layout built from the rows alone); here: what is stored, what crosses to the
device, and that derivation survives pickling and defers to fields a batch stores itself.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from mmtool.analysis.ablated_batches import rebuild, sample_slots
from mmtool.data.batch import ALIGN
from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex
from mmtool.data.layout import SLOT_FIELDS, _TorchOps, derive


@pytest.fixture(scope="module")
def index(data):
    return TokenIndex(data.all)


def derived_names(batch) -> list[str]:
    return [*SLOT_FIELDS, *(f"s{k}.{p}" for k in batch.streams for p in ("slot", "pos"))]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_the_buffer_holds_tokens_and_per_sample_and_per_segment_rows_only(index, layout):
    batch = assemble(index, np.arange(0, len(index), 7), layout)
    stored = {s.name for s in batch.specs}
    assert not stored & set(derived_names(batch))
    token_bytes = sum(s.nbytes for s in batch.specs if s.name.endswith((".ids", ".values")))
    b, g = batch.batch_size, len(batch.numpy("seg_order"))
    rows = 4 * (b + 1) + 4 * 5 * b + 8 * 2 * b + 4 * 8 * g  # every other stored field
    assert batch.buffer.numel() <= token_bytes + rows + ALIGN * len(batch.specs)
    # ... whereas the slot-level fields alone would take 16 bytes per slot + 8 per token.
    assert batch.buffer.numel() < token_bytes + 16 * batch.num_slots


def test_every_derived_field_is_listed_and_readable(index):
    batch = assemble(index, np.arange(40), "packed")
    assert batch.names()[-len(derived_names(batch)):] == derived_names(batch)
    for name in derived_names(batch):
        assert name in batch and batch[name].dtype.is_floating_point is False
    assert batch["slot_stream"].shape == (batch.num_slots,)
    with pytest.raises(KeyError, match="slot_stream"):  # the message lists what there is
        batch["no_such_field"]


def test_a_pickled_batch_derives_the_same_fields(index):
    """Process workers ship batches pickled: the fields are derived again on the other side."""
    batch = assemble(index, np.arange(100, 160), "padded")
    batch["slot_stream"]  # derive (and cache) before pickling: the cache must not travel
    copy = pickle.loads(pickle.dumps(batch))
    assert copy._views == {}
    for name in derived_names(batch):
        np.testing.assert_array_equal(copy.numpy(name), batch.numpy(name))


def test_a_batch_that_stores_slot_fields_is_read_as_stored(index):
    """`mmtool ablate` rebuilds batches with their own slot fields: nothing is derived."""
    batch = assemble(index, np.arange(20), "packed")
    keep = np.arange(batch.batch_size)
    orders = [s[::-1] for s in sample_slots(batch)]  # every sample reversed
    rebuilt = rebuild(batch, orders, keep, keep_positions=True)
    assert "slot_stream" in {s.name for s in rebuilt.specs}
    assert len(rebuilt.names()) == len(set(rebuilt.names()))
    np.testing.assert_array_equal(rebuilt.numpy("slot_pos"), batch.numpy("slot_pos")[np.concatenate(orders)])


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_the_device_formula_in_torch_equals_the_host_one(index, layout):
    """On a GPU the fields come from the torch path: run it here and compare with numpy's."""
    rng = np.random.default_rng(0)
    trajectories = np.flatnonzero(index.steps > 0)  # timestep placement must be exercised
    for _ in range(4):
        picked = np.r_[rng.choice(len(index), 50, replace=False), rng.choice(trajectories, 3)]
        batch = assemble(index, np.unique(picked), layout)
        assert batch.sep_stream >= 0
        host, device = derive(batch), derive(batch, ops=_TorchOps(torch.device("cpu")))
        assert host.keys() == device.keys() == set(derived_names(batch))
        for name in host:
            assert host[name].dtype == device[name].dtype == torch.int32
            assert torch.equal(host[name], device[name]), name
