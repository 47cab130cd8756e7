"""Fusion: parameter parity across fusions, and who can see whom (samples, modalities, time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtool.data.batch import Batch
from mmtool.data.batching import assemble
from mmtool.data.index import Stream
from mmtool.errors import MMToolError
from mmtool.models.builders import SIZES
from mmtool.models.encoders import PackedView
from mmtool.models.fusion import FUSIONS, Grouping
from mmtool.models.model import ModelConfig, build_model

FUSION_NAMES = ["early", "mid", "late"]
# The streams of the built-in mixture (digits + cartpole): a 30k text vocabulary, image patches,
# mu-law observations, discrete actions, raw-float rewards, separators.
STREAMS = [Stream("action:discrete", "action", "ids", vocab_size=2),
           Stream("image:patches", "image", "values", dim=16),
           Stream("observation:mulaw", "observation", "ids", vocab_size=1024),
           Stream("reward:raw-float", "reward", "values", dim=1),
           Stream("text:wordpiece", "text", "ids", vocab_size=30522),
           Stream("separator", "separator", "none", vocab_size=1)]
ALL = {"next-token": 1.0, "masked-patch": 1.0, "masked-token": 1.0, "contrastive": 1.0}


def count(size: str, fusion: str) -> tuple[int, int]:
    """(all parameters, trunk parameters) of a model built with every objective."""
    with torch.device("meta"):  # shapes only: even `base` builds in a blink
        m = build_model(ModelConfig(size=size, fusion=fusion, objectives=ALL), STREAMS)
    return m.num_parameters(), sum(p.numel() for p in m.trunk.parameters())


def test_parameter_counts_agree_across_fusions():
    lines, early = [], {}
    for size in SIZES.names():
        counts = {f: count(size, f) for f in FUSION_NAMES}
        totals = {f: c[0] for f, c in counts.items()}
        trunks = {f: c[1] for f, c in counts.items()}
        early[size] = totals["early"]
        lines.append(f"{size:>6}: " + "  ".join(f"{f} {totals[f]:,} (trunk {trunks[f]:,})"
                                               for f in FUSION_NAMES))
        for values in (totals, trunks):
            lo, hi = min(values.values()), max(values.values())
            assert hi <= 1.10 * lo, (size, values)  # the ±10% promise; they are in fact equal
    print("\nparameters (digits+cartpole streams, all objectives):\n" + "\n".join(lines))
    assert early["tiny"] < early["small"] < early["base"]


def clone(batch: Batch) -> Batch:
    return batch.clone()


def hidden(m, batch):
    with torch.no_grad():
        return m.hidden_states(batch)


def model(index, fusion, objectives):
    torch.manual_seed(0)
    return build_model(ModelConfig(fusion=fusion, objectives=objectives), index.streams)


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_causal_and_block_diagonal(index, fusion):
    """With next-token: changing the 3rd patch of sample 0 changes no earlier token and no other sample."""
    m = model(index, fusion, {"next-token": 1.0})
    batch = assemble(index, np.array([0, 16, 1]), "packed")
    k = index.stream_ids["image:patches"]
    changed = clone(batch)
    changed[f"s{k}.values"][2] += 5.0  # sample 0, patch 2 (its position 2)
    (a, view), (b, _) = hidden(m, batch), hidden(m, changed)
    moved = (a - b).abs().amax(1) > 1e-6  # [N]
    assert not moved[(view.sample == 0) & (view.pos < 2)].any()  # the past is untouched
    assert not moved[view.sample != 0].any()  # other samples are untouched
    assert moved[(view.sample == 0) & (view.pos == 2)].all()


def test_modalities_meet_only_where_the_fusion_says(index):
    """Changing image patches reaches the caption's hidden states in early and mid, never in late."""
    batch = assemble(index, np.array([0, 1]), "packed")
    k = index.stream_ids["image:patches"]
    changed = clone(batch)
    changed[f"s{k}.values"][:] += 5.0
    text = index.stream_ids["text:bytes"]
    for fusion, reaches in (("early", True), ("mid", True), ("late", False)):
        m = model(index, fusion, {"next-token": 1.0})
        (a, view), (b, _) = hidden(m, batch), hidden(m, changed)
        rows = view.stream == text
        assert ((a[rows] - b[rows]).abs().max() > 1e-6) == reaches, fusion


def test_bidirectional_without_next_token(index):
    """Without next-token the trunk is bidirectional: a later patch changes an earlier one."""
    m = model(index, "early", {"masked-patch": 1.0})
    assert not m.causal
    batch = assemble(index, np.array([0]), "packed")
    changed = clone(batch)
    changed[f"s{index.stream_ids['image:patches']}.values"][3] += 5.0
    (a, _), (b, _) = hidden(m, batch), hidden(m, changed)
    assert (a[0] - b[0]).abs().max() > 1e-6


def test_modality_grouping_by_hand():
    """Two samples: [t t i t] and [i i]; sequences (sample, modality) keep time order."""
    # streams: 0 = text (modality 0), 1 = image (modality 1)
    view = PackedView(seqlens=[4, 2], folders=[0, 0], cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32),
                      sample=torch.tensor([0, 0, 0, 0, 1, 1]), pos=torch.tensor([0, 1, 2, 3, 0, 1]),
                      stream=torch.tensor([0, 0, 1, 0, 1, 1]), slot=torch.arange(6), width=0)
    g = Grouping.by_modality(view, torch.tensor([0, 1]), 2)
    assert g.perm.tolist() == [0, 1, 3, 2, 4, 5]  # (s0 text) (s0 image) (s1 image)
    assert g.lengths == [3, 1, 2] and g.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert g.prev.tolist() == [-1, 0, -1, 1, -1, 4]  # text token 3 follows text token 1
    assert torch.equal(g.perm[g.inv], torch.arange(6))
    s = Grouping.by_sample(view)
    assert s.prev.tolist() == [-1, 0, 1, 2, -1, 4] and s.perm is None


def test_fusion_registry_and_mid_layer_bounds():
    assert set(FUSION_NAMES) <= set(FUSIONS.names())
    assert FUSIONS.get("mid")(4, 3).phases() == [(3, "modality"), (1, "sample")]
    assert FUSIONS.get("late")(4, 1).final == "modality" and FUSIONS.get("early")(4, 1).final == "sample"
    for bad in (0, 2):
        with pytest.raises(MMToolError, match="--fusion mid needs 1 ≤ --fusion-layer < layers"):
            build_model(ModelConfig(fusion="mid", fusion_layer=bad), STREAMS)
    with pytest.raises(MMToolError, match="unknown fusion 'erly'.*did you mean 'early'"):
        build_model(ModelConfig(fusion="erly"), STREAMS)
