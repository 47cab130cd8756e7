"""Encoders: every stream's tokens land on their slots, in packed order, for both layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmtool.data.batching import assemble
from mmtool.data.index import Stream
from mmtool.errors import MMToolError
from mmtool.models.encoders import (ENCODERS, MAX_TASKS, Embedder, PackedView, PatchEmbedding,
                                    TokenEmbedding, encoder_for, sincos)
from mmtool.registry import all_registries

SAMPLES = np.array([0, 16, 1, 2, 17, 3])  # digits and cartpole episodes, interleaved


def plain_embedder(index, d=16) -> Embedder:
    """An embedder whose shared (stream, position, task) embeddings are zero: h = encoder output."""
    torch.manual_seed(0)
    emb = Embedder(index.streams, d, max_positions=512)
    for table in (emb.stream_emb, emb.pos_emb, emb.task_emb):
        nn.init.zeros_(table.weight)
    return emb


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_each_stream_scatters_to_its_slots(index, layout):
    batch = assemble(index, SAMPLES, layout)
    view = PackedView.of(batch)
    emb = plain_embedder(index)
    h = emb(batch, view)  # [N, d]
    assert h.shape == (batch.real_tokens, 16)
    seen = torch.zeros(view.n, dtype=torch.bool)
    for k in batch.streams:
        info, enc = index.streams[k], emb.encoders[str(k)]
        rows = view.packed(batch[f"s{k}.slot"])  # [n_k]
        pos = batch[f"s{k}.pos"].long()
        if info.kind == "ids":
            expected = enc.table.weight[batch[f"s{k}.ids"].long()]  # table rows of the ids
        elif info.kind == "values":
            expected = enc.proj(batch[f"s{k}.values"]) + sincos(pos, 16)  # linear + segment pos
        else:
            expected = enc.vector.expand(len(rows), -1)  # the separator vector
        assert torch.allclose(h[rows], expected, atol=1e-6), info.key
        assert (view.stream[rows] == k).all()  # the slot says it holds stream k
        seen[rows] = True
    assert seen.all()  # every real token came from exactly one stream


def test_packed_view_of_padded_batch_reads_the_real_slots(index):
    packed, padded = (assemble(index, SAMPLES, layout) for layout in ("packed", "padded"))
    vp, vd = PackedView.of(packed), PackedView.of(padded)
    assert vd.width == max(vd.seqlens) and vp.width == 0
    assert (padded["slot_sample"].long()[vd.slot] == vd.sample).all()  # no padding slot is read
    for name in ("sample", "pos", "stream"):
        assert torch.equal(getattr(vp, name), getattr(vd, name))
    assert torch.equal(vp.cu_seqlens, vd.cu_seqlens) and vp.seqlens == vd.seqlens
    emb = Embedder(index.streams, 16, 512)
    assert torch.equal(emb(packed, vp), emb(padded, vd))  # the same numbers, bit for bit
    # Keeping the padding: one row per slot, padding rows zero, real rows as before.
    vk = PackedView.of(padded, keep_padding=True)
    assert vk.n == padded.num_slots and torch.equal(vk.real, padded["slot_sample"] >= 0)
    hk = emb(padded, vk)  # [B·L, d]
    assert not hk[~vk.real].any()
    assert torch.equal(hk[vd.slot], emb(packed, vp))


def test_shared_embeddings_are_added_to_every_token(index):
    batch = assemble(index, SAMPLES, "packed")
    view = PackedView.of(batch)
    emb = plain_embedder(index)
    base = emb(batch, view)
    with torch.no_grad():
        emb.stream_emb.weight[index.stream_ids["separator"]] = 1.0  # separators +1
        emb.pos_emb.weight[3] = 2.0  # position 3 of every sample +2
        emb.task_emb.weight[1] = 4.0  # folder 1 (cartpole) +4
    delta = (emb(batch, view) - base)[:, 0]  # [N]
    expected = ((view.stream == index.stream_ids["separator"]).float() + 2.0 * (view.pos == 3).float()
                + 4.0 * (batch["sample_folder"].long()[view.sample] == 1).float())
    assert torch.allclose(delta, expected)


def test_sincos_positions():
    codes = sincos(torch.tensor([0, 1]), 6)  # [2, 6]
    assert torch.allclose(codes[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    assert codes[1, 0].item() == pytest.approx(np.sin(1.0))
    assert codes[1, 3].item() == pytest.approx(np.cos(1.0))
    assert sincos(torch.tensor([5]), 7).shape == (1, 7)  # odd widths are padded


def test_encoder_lookup_prefers_key_then_modality_then_kind():
    class Conv(PatchEmbedding):
        """A test-only encoder for the made-up 'testmodality' modality."""

    ENCODERS.add("testmodality", Conv)
    assert encoder_for(Stream("testmodality:patches", "testmodality", "values", dim=4)) is Conv
    assert encoder_for(Stream("image:patches", "image", "values", dim=4)) is PatchEmbedding
    assert encoder_for(Stream("text:bytes", "text", "ids", vocab_size=9)) is TokenEmbedding
    assert {"encoders", "fusions", "objectives", "sizes"} <= set(all_registries())


def test_limits_are_clear_errors(index):
    batch = assemble(index, SAMPLES, "packed")
    view = PackedView.of(batch)
    with pytest.raises(MMToolError, match="at most max_positions=100; raise max_positions"):
        Embedder(index.streams, 8, max_positions=100).check(view)
    view.folders = [MAX_TASKS]
    with pytest.raises(MMToolError, match=f"at most {MAX_TASKS} data folders"):
        Embedder(index.streams, 8, max_positions=512).check(view)
    with pytest.raises(MMToolError, match="no vocab_size"):
        TokenEmbedding(Stream("text:x", "text", "ids"), 8)
