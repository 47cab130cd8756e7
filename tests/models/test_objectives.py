"""Objectives on hand-checkable cases: zero heads give known losses, masks are exact and seeded.

Data: the bundled digits (16 samples: 4 image patches + a ~20-byte caption) and 2 cartpole
episodes (50 steps: observation ×4 | separator | action | reward per step), preprocessed once per
session into pytest's temporary folder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmtool.data.batching import assemble
from mmtool.data.index import Stream
from mmtool.errors import MMToolError
from mmtool.models.encoders import PackedView
from mmtool.models.model import ModelConfig, build_model
from mmtool.models.objectives import info_nce, parse_objective, parse_objectives, segment_mask

DIGITS, EPISODES = list(range(16)), [16, 17]
TEXT = "text:bytes"


def model(index, objectives, fusion="early", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(fusion=fusion, objectives=objectives, **kw), index.streams)


def key_of(index, key):
    return index.stream_ids[key]


def test_next_token_with_zero_head_is_log_vocab_per_stream(index):
    m = model(index, {"next-token": 1.0})
    for enc in m.embedder.encoders.values():  # tied heads: zero tables → all logits 0
        if hasattr(enc, "table"):
            torch.nn.init.zeros_(enc.table.weight)
    batch = assemble(index, np.array(DIGITS[:4] + EPISODES), "packed")
    out = m(batch, torch.Generator().manual_seed(0))
    vocab = index.streams[key_of(index, TEXT)].vocab_size  # 258: bytes + 2 specials
    assert out.by_stream[f"next-token/{TEXT}"] == pytest.approx(math.log(vocab), abs=1e-4)
    assert out.by_stream["next-token/action:discrete"] == pytest.approx(math.log(2), abs=1e-5)
    # The loss is the mean over predicted tokens: every caption byte (each follows an image patch
    # or a byte) and 2 episodes × 50 actions (each follows a separator).
    n_text = batch[f"s{key_of(index, TEXT)}.ids"].shape[0]
    expected = (n_text * math.log(vocab) + 100 * math.log(2)) / (n_text + 100)
    assert out.losses["next-token"].item() == pytest.approx(expected, abs=1e-4)
    # Gato mask: no observation targets by default; with observations=true, mu-law targets appear.
    assert not any("observation" in k for k in out.by_stream)
    m2 = model(index, {"next-token:observations=true": 1.0})
    assert "next-token/observation:mulaw" in m2(batch).by_stream


def test_next_token_late_fusion_predicts_within_modality(index):
    """In late fusion the first caption token has no same-modality predecessor: it is not counted."""
    m = model(index, {"next-token:modalities=text": 1.0}, fusion="late")
    batch = assemble(index, np.array(DIGITS[:3]), "packed")
    hidden, view = m.hidden_states(batch)
    from mmtool.models.fusion import Grouping
    g = Grouping.by_modality(view, m.modality_of_stream, len(m.modalities))
    text = key_of(index, TEXT)
    src = g.prev[view.packed(batch[f"s{text}.slot"])]  # [n_text]
    assert (src >= 0).sum().item() == len(src) - 3  # all but the first byte of 3 captions
    # every counted source is the previous caption token of the same sample
    idx = view.packed(batch[f"s{text}.slot"])
    ok = src >= 0
    assert torch.equal(src[ok], idx[ok] - 1)


def test_masked_patch_zero_decoder_is_mean_square_of_masked_patches(index):
    m = model(index, {"masked-patch": 1.0}, mask_ratio=0.5)
    obj = m.objectives["masked-patch"]
    for dec in obj.decoders.values():
        torch.nn.init.zeros_(dec.weight)
        torch.nn.init.zeros_(dec.bias)
    batch = assemble(index, np.array(DIGITS[:5]), "packed")
    out = m(batch, torch.Generator().manual_seed(3))
    # The same seed gives the same mask: recompute it and the expected MSE by hand.
    k = key_of(index, "image:patches")
    mask = obj.corrupt(batch, PackedView.of(batch), torch.Generator().manual_seed(3))[k][0].mask
    assert mask.view(5, 4).sum(1).tolist() == [2] * 5  # exactly half of each image's 4 patches
    x = batch[f"s{k}.values"]  # [20, 16]
    expected = (x[mask] ** 2).mean()
    assert out.losses["masked-patch"].item() == pytest.approx(expected.item(), rel=1e-6)
    # Unmasked patches do not count: changing them leaves the loss at 0-decoder unchanged.
    assert out.by_stream == {"masked-patch/image:patches": pytest.approx(expected.item(), rel=1e-6)}


def test_masked_patch_input_is_replaced_by_the_mask_vector(index):
    """A masked patch enters the trunk as the mask vector: its own values cannot reach it."""
    m = model(index, {"masked-patch": 1.0})
    batch = assemble(index, np.array(DIGITS[:2]), "packed")
    view, k = PackedView.of(batch), key_of(index, "image:patches")
    corr = m.objectives["masked-patch"].corrupt(batch, view, torch.Generator().manual_seed(5))
    mask = corr[k][0].mask

    def shifted(which):
        out = batch.clone()
        out[f"s{k}.values"][which] += 10.0
        return out

    h = m.embedder(batch, view, corr)  # [N, d]
    assert torch.equal(h, m.embedder(shifted(mask), view, corr))  # masked inputs are invisible
    assert not torch.equal(h, m.embedder(shifted(~mask), view, corr))  # visible ones are not


def test_masked_token_zero_table_is_log_vocab_on_masked_positions(index):
    m = model(index, {"masked-token:modalities=text": 1.0}, mask_ratio=0.5)
    k = key_of(index, TEXT)
    vocab = index.streams[k].vocab_size
    torch.nn.init.zeros_(m.embedder.encoders[str(k)].table.weight)
    batch = assemble(index, np.array(DIGITS[:4]), "padded")
    out = m(batch, torch.Generator().manual_seed(1))
    assert out.losses["masked-token"].item() == pytest.approx(math.log(vocab), abs=1e-4)
    c = m.objectives["masked-token"].corrupt(batch, PackedView.of(batch), torch.Generator().manual_seed(1))
    mask, ids = c[k][0].mask, c[k][0].ids
    seg = batch["slot_segment"].long()[batch[f"s{k}.slot"].long()]  # [n] caption of each byte
    lengths = torch.bincount(seg)[torch.unique(seg)]  # [4] bytes per caption
    masked = torch.bincount(seg, weights=mask.double())[torch.unique(seg)]
    assert masked.tolist() == torch.floor(lengths * 0.5 + 0.5).tolist()  # half of each caption
    assert (ids == vocab).all()  # the [MASK] row, one past the vocabulary


def test_segment_mask_counts_and_seeds():
    seg = torch.tensor([0] * 4 + [1] * 7 + [2] * 1 + [3] * 10)  # segments of 4, 7, 1, 10 tokens
    m1 = segment_mask(seg, 4, 0.5, torch.Generator().manual_seed(0))
    per_seg = torch.zeros(4, dtype=torch.long).index_add(0, seg, m1.long())
    assert per_seg.tolist() == [2, 4, 1, 5]  # round-half-up, at least one
    assert torch.equal(m1, segment_mask(seg, 4, 0.5, torch.Generator().manual_seed(0)))
    assert not torch.equal(m1, segment_mask(seg, 4, 0.5, torch.Generator().manual_seed(1)))
    # segments need not be sorted (a stream's tokens come grouped by shard)
    perm_seg = torch.tensor([2] + [3] * 10 + [0] * 4 + [1] * 7)
    m2 = segment_mask(perm_seg, 4, 0.25, torch.Generator().manual_seed(0))
    assert torch.zeros(4, dtype=torch.long).index_add(0, perm_seg, m2.long()).tolist() == [1, 2, 1, 3]


def test_info_nce_hand_cases():
    n, s = 4, torch.tensor(1 / 0.07)
    eye = torch.eye(n)  # orthonormal rows
    valid = torch.ones(n, dtype=torch.bool)
    loss, w = info_nce(eye, eye, valid, s)
    expected = math.log(1 + (n - 1) * math.exp(-1 / 0.07))  # diagonal s, off-diagonal 0
    assert torch.allclose(loss, torch.full((2 * n,), expected), atol=1e-6) and w.sum() == 2 * n
    same = torch.nn.functional.normalize(torch.ones(n, 3), dim=1)  # all identical: chance level
    loss, _ = info_nce(same, same, valid, s)
    assert torch.allclose(loss, torch.full((2 * n,), math.log(n)), atol=1e-5)
    # Samples without the pair are neither queries nor negatives.
    part = torch.tensor([True, True, False, True])
    loss, w = info_nce(same, same, part, s)
    assert w.tolist() == [1, 1, 0, 1] * 2
    assert torch.allclose(loss[w > 0], torch.full((6,), math.log(3)), atol=1e-5)
    # A lone pair has no negatives: it does not count.
    _, w = info_nce(eye, eye, torch.tensor([True, False, False, False]), s)
    assert w.sum() == 0


def test_contrastive_in_model_and_temperature(index):
    m = model(index, {"contrastive": 1.0})
    assert m.objectives["contrastive"].log_scale.requires_grad
    assert m.objectives["contrastive"].log_scale.item() == pytest.approx(math.log(1 / 0.07))
    batch = assemble(index, np.array(DIGITS[:6] + EPISODES), "packed")
    out = m(batch)
    # image+text over 6 digits, observation/action/reward pairs over 2 episodes; nothing across.
    assert set(out.by_stream) == {"contrastive/image+text", "contrastive/action+observation",
                                  "contrastive/action+reward", "contrastive/observation+reward"}
    assert 0 < out.by_stream["contrastive/image+text"] <= math.log(6) * 3
    out.loss.backward()
    assert m.objectives["contrastive"].log_scale.grad is not None
    fixed = model(index, {"contrastive:learn_temperature=false:temperature=0.1": 1.0})
    assert not any("log_scale" in n for n, _ in fixed.named_parameters())


def test_generator_drives_masks(index):
    m = model(index, {"masked-patch": 1.0, "masked-token": 1.0, "next-token": 1.0})
    batch = assemble(index, np.array(DIGITS[:6] + EPISODES[:1]), "packed")
    a = m(batch, torch.Generator().manual_seed(7)).loss
    b = m(batch, torch.Generator().manual_seed(7)).loss
    c = m(batch, torch.Generator().manual_seed(8)).loss
    assert a.item() == b.item() and a.item() != c.item()


def test_objectives_the_streams_cannot_feed():
    text = Stream("text:wordpiece", "text", "ids", vocab_size=100)
    image = Stream("image:patches", "image", "values", dim=16)
    obs = Stream("observation:mulaw", "observation", "ids", vocab_size=64)
    sep = Stream("separator", "separator", "none", vocab_size=1)
    cfg = lambda objs: ModelConfig(objectives=objs)  # noqa: E731
    with pytest.raises(MMToolError, match="'contrastive' needs two modalities.*text:wordpiece"):
        build_model(cfg({"contrastive": 1}), [text, sep])
    with pytest.raises(MMToolError, match="'masked-patch' needs a patch .*image or audio"):
        build_model(cfg({"masked-patch": 1}), [text, sep])
    with pytest.raises(MMToolError, match="'next-token' needs a discrete"):
        build_model(cfg({"next-token": 1}), [image, obs, sep])
    build_model(cfg({"next-token:observations=true": 1}), [image, obs, sep])  # observations count
    with pytest.raises(MMToolError, match="unknown objective 'next-tokn'.*did you mean 'next-token'"):
        build_model(cfg({"next-tokn": 1}), [text, sep])
    with pytest.raises(MMToolError, match="no option colour"):
        build_model(cfg({"masked-token:colour=red": 1}), [text, sep])
    with pytest.raises(MMToolError, match="given twice"):
        build_model(cfg({"next-token": 1, "next-token:observations=true": 1}), [text, sep])
    with pytest.raises(MMToolError, match="mask_ratio must be in"):
        build_model(cfg({"masked-token:mask_ratio=1.5": 1}), [text, sep])


def test_parse_objective_and_flag():
    assert parse_objective("masked-patch:modalities=image+audio:mask_ratio=0.75") == \
        ("masked-patch", {"modalities": ["image", "audio"], "mask_ratio": 0.75})
    assert parse_objective("masked-patch:modalities=image,mask-ratio=0.75") == \
        ("masked-patch", {"modalities": "image", "mask_ratio": 0.75})
    assert parse_objective("next-token") == ("next-token", {})
    with pytest.raises(MMToolError, match="not key=value"):
        parse_objective("next-token:observations")
    assert parse_objectives("next-token=1,masked-patch=0.5") == {"next-token": 1.0, "masked-patch": 0.5}
    assert parse_objectives("next-token:observations=true, contrastive") == \
        {"next-token:observations=true": 1.0, "contrastive": 1.0}
    assert parse_objectives("masked-patch:mask_ratio=0.75,masked-token:mask_ratio=0.2=3") == \
        {"masked-patch:mask_ratio=0.75": 1.0, "masked-token:mask_ratio=0.2": 3.0}
    with pytest.raises(MMToolError, match="weight of 'next-token' must be a number"):
        parse_objectives("next-token=lots")


# -- masked-patch: per-stream means, norm_pix, silence (digits + spoken-digits + silent clips) ------
IMAGES, CLIPS, SILENT = [0, 1], [8, 9], [16, 17]


def zero_decoders(m):
    for dec in m.objectives["masked-patch"].decoders.values():
        torch.nn.init.zeros_(dec.weight)
        torch.nn.init.zeros_(dec.bias)
    return m.objectives["masked-patch"]


def masked_squares(obj, batch, av_index, seed, transform=lambda x: x):
    """{stream key: mean over the masked patches of mean(target²)} (a zero decoder predicts 0)."""
    corr = obj.corrupt(batch, PackedView.of(batch), torch.Generator().manual_seed(seed))
    out = {}
    for key in ("image:patches", "audio:logmel"):
        k = key_of(av_index, key)
        x = transform(batch[f"s{k}.values"].float())  # [n_k, dim]
        out[key] = ((x ** 2).mean(1)[corr[k][0].mask], corr[k][0].mask)
    return out


def test_row_denominators_per_stream_and_pooled_known_values():
    """Stream 0 has three rows of loss 1, stream 1 one row of loss 4 (a row of weight 0 ignored):
    pooled (1+1+1+4)/4 = 1.75; per stream (1 + 4)/2 = 2.5; the parts sum to the loss."""
    from mmtool.models.model import row_denominators

    loss, weight = torch.tensor([1.0, 1.0, 1.0, 4.0, 9.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    key = torch.tensor([0, 0, 0, 1, 1])
    wl = loss * weight

    def reduce(n_keys, per_stream):
        c = wl / row_denominators(weight, key, n_keys, per_stream)
        return c.sum().item(), torch.zeros(n_keys).index_add(0, key, c).tolist()

    pooled, p_parts = reduce(2, False)
    per, s_parts = reduce(2, True)
    assert pooled == pytest.approx(1.75) and p_parts == pytest.approx([0.75, 1.0])
    assert per == pytest.approx(2.5) and s_parts == pytest.approx([0.5, 2.0])
    # A stream without counted rows is left out of the per-stream mean, not counted as 0.
    per3, parts3 = reduce(3, True)
    assert per3 == pytest.approx(2.5) and parts3 == pytest.approx([0.5, 2.0, 0.0])


def test_masked_patch_averages_per_stream_then_across_streams(av_index):
    batch = assemble(av_index, np.array(IMAGES + CLIPS), "packed")
    per = model(av_index, {"masked-patch": 1.0})
    pooled = model(av_index, {"masked-patch:per_stream=false": 1.0})
    sq = masked_squares(zero_decoders(per), batch, av_index, seed=4)
    zero_decoders(pooled)
    img, _ = sq["image:patches"]
    aud, _ = sq["audio:logmel"]
    assert len(img) == 4 and len(aud) > 10  # 2 of 4 patches per image; half of each clip's patches
    out = per(batch, torch.Generator().manual_seed(4))
    assert out.by_stream == {"masked-patch/image:patches": pytest.approx(img.mean().item(), rel=1e-5),
                             "masked-patch/audio:logmel": pytest.approx(aud.mean().item(), rel=1e-5)}
    expected_per = (img.mean() + aud.mean()) / 2
    expected_pooled = torch.cat([img, aud]).mean()
    assert out.losses["masked-patch"].item() == pytest.approx(expected_per.item(), rel=1e-5)
    assert pooled(batch, torch.Generator().manual_seed(4)).losses["masked-patch"].item() == \
        pytest.approx(expected_pooled.item(), rel=1e-5)
    assert abs(expected_per - expected_pooled) > 0.05  # the two reductions really differ here


def test_masked_patch_norm_pix_targets(av_index):
    """norm_pix: each target patch is (x − mean) / sqrt(var + 1e-6) over its own entries (MAE)."""
    m = model(av_index, {"masked-patch:norm_pix=true": 1.0})
    obj = zero_decoders(m)
    batch = assemble(av_index, np.array(IMAGES + CLIPS), "packed")
    norm = lambda x: (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True) + 1e-6).sqrt()
    sq = masked_squares(obj, batch, av_index, seed=1, transform=norm)
    out = m(batch, torch.Generator().manual_seed(1))
    for key, (rows, _) in sq.items():
        # A zero prediction of a normalised patch costs (dim − 1)/dim · var/(var + 1e-6) ≤ 1 per patch.
        assert out.by_stream[f"masked-patch/{key}"] == pytest.approx(rows.mean().item(), rel=1e-5)
        assert (rows <= 1.0).all() and rows.max() > 0.9
    assert m.objectives["masked-patch"].norm_pix and not model(av_index, {"masked-patch": 1.0}).objectives[
        "masked-patch"].norm_pix


def test_silent_patches_are_never_masked_nor_scored(av_index):
    """The clips with 0.5 s of digital silence have patches entirely at the logmel floor (-1):
    they stay visible and weigh 0; every other patch is masked at the usual rate."""
    m = model(av_index, {"masked-patch": 1.0})
    obj = zero_decoders(m)
    batch = assemble(av_index, np.array(SILENT), "packed")
    k = key_of(av_index, "audio:logmel")
    assert obj.floors == {k: -1.0}  # from the tokenizer config in the manifest
    x = batch[f"s{k}.values"].float()  # [n, 320]
    silent = (x == -1.0).all(1)
    assert silent.sum() >= 20  # 0.5 s = 50 frames = 12 whole patches of silence at each end, per clip
    mask = obj.corrupt(batch, PackedView.of(batch), torch.Generator().manual_seed(2))[k][0].mask
    assert not (mask & silent).any() and mask.sum() > 0
    out = m(batch, torch.Generator().manual_seed(2))
    assert out.losses["masked-patch"].item() == pytest.approx((x[mask] ** 2).mean(1).mean().item(), rel=1e-5)
    # The mask draws are the same as without the silence rule: masked = drawn ∧ not silent.
    from mmtool.models.objectives import stream_masks
    [(_, drawn)] = list(stream_masks(batch, [k], 0.5, torch.Generator().manual_seed(2)))
    assert torch.equal(mask, drawn & ~silent)
