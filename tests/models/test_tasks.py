"""Per-folder tasks: each folder's loss covers exactly its own targets, in one shared forward pass.

The strongest check: attention never crosses samples, so a multi-task model's per-task losses on a
mixed batch must equal single-task models (same weights) run on each folder's samples alone. Any
target leaking across folders (a caption loss on actions, a mask drawn on another folder's image, a
contrastive negative from a folder without the objective) breaks the equality.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmtool.data.batching import assemble
from mmtool.errors import MMToolError
from mmtool.models.model import ModelConfig, build_model
from mmtool.models.tasks import TASK_PRESETS, build_table, check_folders, expand

DIGITS, EPISODES = list(range(16)), [16, 17]
DIGITS8, SPOKEN8 = list(range(8)), list(range(8, 16))


def build(index, objectives, folder_objectives=None, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(objectives=objectives, folder_objectives=folder_objectives or [], **kw),
                       index.streams)


def alone(multi, index, objectives, batch, seed):
    """A single-task model with `multi`'s weights, run on `batch`."""
    m = build(index, objectives)
    missing, unexpected = m.load_state_dict(multi.state_dict(), strict=False)
    assert all(k.startswith("objectives.") for k in missing + unexpected)
    return m(batch, torch.Generator().manual_seed(seed))


def test_presets_expand_to_the_masks_the_field_uses():
    assert expand("caption") == "next-token:modalities=text:after=any"
    assert expand("behaviour-cloning") == "next-token:modalities=action"
    assert expand("mae:mask_ratio=0.75") == "masked-patch:mask_ratio=0.75"
    assert expand("next-token:observations=true") == "next-token:observations=true"
    assert set(TASK_PRESETS.names()) >= {"lm", "caption", "transcribe", "behaviour-cloning", "mae",
                                         "contrastive"}


def test_table_defaults_fill_folders_without_objectives_and_names_conflicts():
    t = build_table({"next-token": 1.0}, [{"caption": 2.0, "contrastive": 0.5}, None])
    assert list(t.specs) == ["next-token", "caption", "contrastive"]
    assert t.weights.tolist() == [[0.0, 2.0, 0.5], [1.0, 0.0, 0.0]]
    assert not t.uniform
    assert build_table({"next-token": 1.0}, [None, None]).weights.shape == (1, 1)  # no own: one row
    with pytest.raises(MMToolError, match="twice with different options"):
        build_table({"next-token": 1.0}, [{"next-token:observations=true": 1.0}, None])


def test_caption_and_behaviour_cloning_each_cover_only_their_folder(index):
    """digits: caption; cartpole: behaviour cloning. On one packed batch of both, each task's loss
    equals the single-task model's on its folder alone, and the total is their sum."""
    multi = build(index, {"next-token": 1.0}, [{"caption": 1.0}, {"behaviour-cloning": 1.0}])
    mixed = assemble(index, np.array(DIGITS[:6] + EPISODES), "packed")
    out = multi(mixed, torch.Generator().manual_seed(0))
    cap = alone(multi, index, {"caption": 1.0}, assemble(index, np.array(DIGITS[:6]), "packed"), 0)
    bc = alone(multi, index, {"behaviour-cloning": 1.0}, assemble(index, np.array(EPISODES), "packed"), 0)
    assert out.losses["caption"].item() == pytest.approx(cap.loss.item(), rel=1e-5)
    assert out.losses["behaviour-cloning"].item() == pytest.approx(bc.loss.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(cap.loss.item() + bc.loss.item(), rel=1e-5)
    assert out.by_task[(0, "caption")] == pytest.approx(cap.loss.item(), rel=1e-5)
    assert set(out.by_task) == {(0, "caption"), (1, "behaviour-cloning")}
    # behaviour cloning scores actions only (never observations or rewards); caption only text
    assert set(out.by_stream) == {"caption/text:bytes", "behaviour-cloning/action:discrete"}


def test_caption_mask_counts_only_text_after_another_modality(index):
    """With zero output heads every predicted token costs ln V exactly, so the caption loss is
    ln V_text · (its targets) / (its targets): compare the target counts with the mask's rule."""
    m = build(index, {"caption": 1.0, "next-token:modalities=text": 1.0})
    for enc in m.embedder.encoders.values():
        if hasattr(enc, "table"):
            torch.nn.init.zeros_(enc.table.weight)
    batch = assemble(index, np.array(DIGITS[:4]), "packed")
    out = m(batch)
    vocab = index.streams[index.stream_ids["text:bytes"]].vocab_size
    assert out.losses["caption"].item() == pytest.approx(math.log(vocab), abs=1e-4)
    # digits samples are image patches, then the caption: every caption byte follows the image.
    # Text not preceded by an `after` modality is never a target: no digits caption follows actions.
    m2 = build(index, {"next-token:modalities=text:after=action": 1.0})
    assert m2(batch).counted == ()
    mixed = assemble(index, np.array(DIGITS[:4] + EPISODES), "packed")
    assert m2(mixed).counted == ()  # the episodes' actions do not make the digits' text count


def test_transcribe_and_mae_on_spoken_leave_digits_images_unmasked(av_index):
    """digits: caption + contrastive; spoken: transcribe + mae. masked-patch's draws on the digits
    images are dropped (caption sees whole images), and contrastive's negatives are digits only."""
    folders = [{"caption": 1.0, "contrastive": 0.5}, {"transcribe": 1.0, "mae": 2.0}, {"transcribe": 1.0}]
    multi = build(av_index, {"next-token": 1.0}, folders)
    mixed = assemble(av_index, np.array(DIGITS8 + SPOKEN8), "packed")
    out = multi(mixed, torch.Generator().manual_seed(3))
    digits = assemble(av_index, np.array(DIGITS8), "packed")
    spoken = assemble(av_index, np.array(SPOKEN8), "packed")
    cap = alone(multi, av_index, {"caption": 1.0, "contrastive": 0.5}, digits, 3)
    spk = alone(multi, av_index, {"transcribe": 1.0, "mae": 2.0}, spoken, 3)
    for name, ref in (("caption", cap), ("contrastive", cap), ("transcribe", spk), ("mae", spk)):
        assert out.losses[name].item() == pytest.approx(ref.losses[name].item(), rel=1e-4), name
    assert out.loss.item() == pytest.approx(cap.loss.item() + spk.loss.item(), rel=1e-4)
    # the loss weights: contrastive counts 0.5, mae 2 in the total; the plain losses are unweighted
    assert cap.loss.item() == pytest.approx(cap.losses["caption"].item() + 0.5 * cap.losses["contrastive"].item(),
                                            rel=1e-5)
    # every task's attached part of the loss sums to the total
    parts = sum(v for v in out.task_losses.values())
    assert parts.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_loss_scale_balances_each_task_to_its_weight_and_uncertainty_starts_neutral(index):
    folders = [{"caption": 1.0}, {"behaviour-cloning": 3.0}]
    batch = assemble(index, np.array(DIGITS[:6] + EPISODES), "packed")
    plain = build(index, {"next-token": 1.0}, folders)(batch)
    scaled_model = build(index, {"next-token": 1.0}, folders, task_balance="loss-scale").train()
    scaled = scaled_model(batch)
    # first sight: each task divided by its own mean loss → 1 · weight each
    assert scaled.loss.item() == pytest.approx(1.0 + 3.0, rel=1e-5)
    assert scaled.losses["caption"].item() == pytest.approx(plain.losses["caption"].item(), rel=1e-6)
    assert "balancer.scale" in scaled_model.state_dict()  # saved: a resumed run continues it
    unc_model = build(index, {"next-token": 1.0}, folders, task_balance="uncertainty")
    unc = unc_model(batch)
    assert unc.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)  # exp(0) = 1, + 0
    unc.loss.backward()
    assert unc_model.balancer.log_var.grad.abs().sum() > 0


def test_a_folder_without_the_streams_of_its_objective_is_named(index):
    with pytest.raises(MMToolError, match="digits.*behaviour-cloning"):
        table = build_table({"next-token": 1.0}, [{"behaviour-cloning": 1.0}, None])
        check_folders(table.specs, [{"behaviour-cloning": 1.0}, None],
                      [index.folder_streams(0), index.folder_streams(1)], ["data/digits", "data/cartpole"], 0.5)
