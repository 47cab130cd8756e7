"""Ablations: rebuilt batches (identity, drop, permute) and the ablate job on a trained tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmtool.analysis.ablate import AblateConfig, ablate, cannot_change_others, rank, untrained_twin
from mmtool.analysis.ablated_batches import ABLATIONS, Ablation, ablated_orders, derangement, rebuild, sample_slots
from mmtool.stats import hierarchical_ci, ratio_bootstrap_ci
from mmtool.train.checkpoint import list_checkpoints, load
from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.models.model import ModelConfig, build_model
from mmtool.analysis.report import plot_ablation
from mmtool.train import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ablate") / "ka"
    preprocess(PreprocessConfig("known-answer", path, tokenizers=["text=bytes"],
                                options=["samples=96", "classes=3", "words=3"]))
    return path


def setup(data):
    index = TokenIndex([data])
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny"), index.streams).eval()
    batch = assemble(index, np.arange(12), "packed")
    stream = batch.numpy("slot_stream")
    slot_mod = model.modality_of_stream.numpy()[stream]
    return index, model, batch, slot_mod


def tokens_of(batch, k, i):
    """(ids or values) of stream k in sample i, in slot order."""
    slot = batch.numpy(f"s{k}.slot")
    mine = batch.numpy("slot_sample")[slot] == i
    part = "ids" if f"s{k}.ids" in batch else "values"
    return batch.numpy(f"s{k}.{part}")[mine][np.argsort(slot[mine])]


def test_identity_rebuild_is_the_same_batch(data):
    index, model, batch, _ = setup(data)
    same = rebuild(batch, sample_slots(batch), list(range(batch.batch_size)))
    for name in ("slot_sample", "slot_pos", "slot_stream", "slot_segment", "cu_seqlens", "label", "sample_index"):
        assert np.array_equal(same.numpy(name), batch.numpy(name)), name
    with torch.no_grad():
        a = model(batch, generator=torch.Generator().manual_seed(1))
        b = model(same, generator=torch.Generator().manual_seed(1))
    assert a.by_stream == pytest.approx(b.by_stream, rel=1e-6)


def test_drop_removes_the_modality_and_keeps_positions(data):
    index, model, batch, slot_mod = setup(data)
    image = model.modalities.index("image")
    chosen, intact, dropped = ablated_orders(batch, slot_mod, image, "drop", index.signature, np.random.default_rng(0))
    assert chosen == list(range(12))  # every sample has image, text and label
    z = rebuild(batch, dropped, chosen, keep_positions=True)
    k_img = next(k for k, s in enumerate(index.streams) if s.modality == "image")
    k_txt = next(k for k, s in enumerate(index.streams) if s.modality == "text")
    assert f"s{k_img}.values" not in z and k_img not in z.streams
    for i in range(12):
        assert np.array_equal(tokens_of(z, k_txt, i), tokens_of(batch, k_txt, i))  # the rest unchanged
    old_pos = batch.numpy("slot_pos")[np.concatenate(dropped)]
    assert np.array_equal(z.numpy("slot_pos"), old_pos)  # ... and where it was
    assert z.real_tokens == batch.real_tokens - int((slot_mod == image).sum())
    with torch.no_grad():  # the model runs on it, and never sees the image
        out = model(z, generator=torch.Generator().manual_seed(1))
    assert not any("image" in k for k in out.by_stream) and torch.isfinite(out.loss)


def test_permute_swaps_between_samples_and_keeps_every_token(data):
    index, model, batch, slot_mod = setup(data)
    text = model.modalities.index("text")
    chosen, intact, perm = ablated_orders(batch, slot_mod, text, "permute",
                                          index.signature[np.arange(12)], np.random.default_rng(0))
    z = rebuild(batch, perm, chosen)
    k_txt = next(k for k, s in enumerate(index.streams) if s.modality == "text")
    k_img = next(k for k, s in enumerate(index.streams) if s.modality == "image")
    captions = [tuple(tokens_of(batch, k_txt, i)) for i in range(12)]
    got = [tuple(tokens_of(z, k_txt, i)) for i in range(12)]
    assert sorted(got) == sorted(captions)  # the same captions, redistributed
    kept = sum(g == c for g, c in zip(got, captions))  # no sample keeps its own caption, unless
    assert kept <= sum(captions.count(c) > 1 for c in captions)  # another sample has the same one
    for i in range(12):  # images stay with their sample and their label
        assert np.array_equal(tokens_of(z, k_img, i), tokens_of(batch, k_img, i))
    assert np.array_equal(z.numpy("label"), batch.numpy("label"))
    d = derangement(7, np.random.default_rng(3))
    assert sorted(d) == list(range(7)) and not (d == np.arange(7)).any()


def test_bootstrap_interval_contains_the_estimate():
    rng = np.random.default_rng(0)
    est, lo, hi = ratio_bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]), None, rng, 500)
    assert est == 2.5 and lo <= est <= hi and lo >= 1 and hi <= 4
    est, lo, hi = ratio_bootstrap_ci(np.array([3.0, 1.0]), np.array([4.0, 4.0]), rng, 200)  # ratio of sums
    assert est == 0.5 and 0.25 <= lo <= hi <= 0.75


def test_rank_lists_only_intervals_above_zero_and_groups_ties():
    imp = {"image": {"value": 0.50, "ci95": [0.40, 0.60]},
           "audio": {"value": 0.45, "ci95": [0.30, 0.55]},  # overlaps image's interval: tied with it
           "text": {"value": 0.20, "ci95": [0.10, 0.30]},  # below image's interval: next rank
           "reward": {"value": 0.05, "ci95": [-0.02, 0.12]},  # interval covers 0: not ranked
           "action": {"value": -0.20, "ci95": [-0.30, -0.10]},  # ablating helps
           "caption": {"value": 0.0, "ci95": [0.0, 0.0], "structural_zero": True},
           "observation": {"value": float("nan"), "ci95": [float("nan")] * 2}}
    ranked, groups, status = rank(imp)
    assert ranked == ["image", "audio", "text"] and groups == [["image", "audio"], ["text"]]
    assert status == {"image": "rank 1 (tied)", "audio": "rank 1 (tied)", "text": "rank 2",
                      "reward": "indistinguishable from 0", "action": "negative",
                      "caption": "structural zero", "observation": "not measured"}
    # one batch: no interval, no rank
    assert rank({"a": {"value": 0.3, "ci95": [float("nan")] * 2}})[1:] == ([], {"a": "no interval (one batch)"})


def test_structural_zero_needs_the_modality_after_every_other_under_causal_attention():
    # slots of two samples: modality 0 = image, 1 = text, -1 = separator
    slot_mod = np.array([0, 0, -1, 1, 1, 0, -1, 1])
    last = [np.arange(0, 5), np.arange(5, 8)]  # text after the image in both samples
    assert cannot_change_others(slot_mod, last, 1, causal=True, cross=True)
    assert not cannot_change_others(slot_mod, last, 0, causal=True, cross=True)  # text reads the image
    assert not cannot_change_others(slot_mod, last, 1, causal=False, cross=True)  # bidirectional: it can
    assert cannot_change_others(slot_mod, last, 0, causal=False, cross=False)  # late fusion: never
    first = [np.arange(0, 5), np.array([7, 6, 5])]  # the second sample has the text first
    assert not cannot_change_others(slot_mod, first, 1, causal=True, cross=True)


def test_hierarchical_interval_resamples_batches_and_samples():
    rng = np.random.default_rng(0)
    v = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    est, lo, hi = hierarchical_ci(v, np.array([0, 0, 1, 1, 2, 2]), rng, 2000)
    assert est == 0.5 and 0 <= lo < 0.5 < hi <= 1
    # one batch of identical rows resampled at two levels: no spread; a lone batch: no interval
    assert hierarchical_ci(np.ones(4), np.array([0, 0, 1, 1]), rng, 200) == (1.0, 1.0, 1.0)
    assert np.isnan(hierarchical_ci(v, np.zeros(6), rng, 200)[1])


def test_twin_is_the_runs_initial_weights(data, tmp_path):
    """One step at a vanishing learning rate leaves the initial weights (to 1e-9): the twin must
    equal them; a twin of another seed must not."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=[str(data)], out=run, batch_samples=8, batch_tokens=None, max_steps=1, warmup=0,
                      lr=1e-12, num_workers=0, save_every=1, seed=3, model=ModelConfig(size="tiny"))
    train(cfg)
    state, _, _ = load(list_checkpoints(run)[-1])
    streams = TokenIndex([data]).streams
    twin = untrained_twin(cfg, streams).state_dict()
    assert set(twin) == set(state)
    assert all(torch.allclose(twin[k], state[k], atol=1e-9, rtol=0) for k in state)
    cfg.seed = 4
    other = untrained_twin(cfg, streams).state_dict()
    assert not all(torch.equal(other[k], state[k]) for k in state)


def test_ablate_a_trained_run(data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(data=[str(data)], out=run, batch_samples=16, batch_tokens=None, max_steps=3,
                      warmup=1, num_workers=0, save_every=3, model=ModelConfig(size="tiny")))
    result = ablate(AblateConfig(run=run, batches=3, batch_samples=16, bootstrap=200))
    assert set(result["results"]) == {"image", "text"}  # label tokens are the answer: not ablated
    assert result["ranking_mode"] == "drop" and result["baseline"] == "untrained twin"
    assert result["importance_metric"] == "accuracy drop"  # the source has labels
    ranked = [m for g in result["ranking_groups"] for m in g]
    assert ranked == result["ranking"] and set(ranked) <= {"image", "text"}
    for mod, modes in result["results"].items():
        assert set(modes) == {"drop", "permute"}
        for mode, e in modes.items():
            assert e["batches"] == 3 and e["samples"] > 0
            lo, hi = e["loss"]["ci95"]
            assert lo <= e["loss"]["delta"] <= hi
            acc = e["accuracy"]
            assert 0 <= acc["intact"] <= 1 and 0 <= acc["ablated"] <= 1
            assert acc["drop"] == pytest.approx(acc["intact"] - acc["ablated"])
            imp = e["importance"]  # trained − twin, both measured on the same held-out samples
            assert imp["trained"] == acc["drop"] and imp["twin"] == e["twin"]["accuracy"]["drop"]
            assert imp["value"] == pytest.approx(imp["trained"] - imp["twin"])
            assert imp["ci95"][0] <= imp["value"] <= imp["ci95"][1]
            assert e["twin"]["accuracy"]["test_samples"] == acc["test_samples"]
            assert not e["structural_zero_loss"]  # the label comes after both: either can change its loss
        assert "status" in modes["drop"]["importance"]
    json.dumps(result, allow_nan=True)
    plot_ablation(result, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
    with pytest.raises(Exception, match="unknown ablation"):
        ablate(AblateConfig(run=run, modes=["shuffle"]))
    # A plug-in mode runs through the registry: one that changes nothing must measure exactly 0.
    if "test-identity" not in ABLATIONS:
        ABLATIONS.add("test-identity", Ablation(lambda slots, is_m, cand, sig, rng: (cand, [slots[i] for i in cand])),
                      "plug-in test: the batch unchanged")
    same = ablate(AblateConfig(run=run, batches=2, batch_samples=16, bootstrap=100, modes=["test-identity"]))
    for mod, modes in same["results"].items():
        e = modes["test-identity"]
        assert e["samples"] > 0 and e["loss"]["delta"] == 0 and e["accuracy"]["drop"] == 0, mod


def test_an_untrained_model_has_zero_importance_and_a_caption_after_the_image_is_a_structural_zero(tmp_path):
    """digits: image, then its caption. Under causal attention the caption cannot change the image's
    loss: a structural zero, never ranked. The untrained model, compared with its twin (itself),
    has importance exactly 0 everywhere, and nothing is ranked."""
    digits = tmp_path / "digits"
    preprocess(PreprocessConfig("digits", digits, max_samples=64))
    cfg = TrainConfig(data=[str(digits)], out=tmp_path / "run", seed=5, model=ModelConfig(size="tiny"))
    model = untrained_twin(cfg, TokenIndex([digits]).streams)
    result = ablate(AblateConfig(run=tmp_path / "run", batches=2, batch_samples=16, bootstrap=100,
                                 modes=["drop"], metric="loss"), model=model, run_cfg=cfg)
    text, image = result["results"]["text"]["drop"], result["results"]["image"]["drop"]
    assert text["structural_zero_loss"] and text["importance"]["status"] == "structural zero"
    assert text["loss"]["delta"] == pytest.approx(0.0, abs=1e-5)  # by construction, to float noise
    assert not image["structural_zero_loss"]
    for e in (text, image):
        assert e["importance"]["value"] == 0.0 and e["importance"]["trained"] == e["importance"]["twin"]
    assert result["ranking"] == [] and result["ranking_groups"] == []
