"""Training probes: attention shares by hand, grad norms by hand, and probes off = nothing changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.models.model import ModelConfig, build_model
from mmtool.train.probes import (AttentionProbe, GradNormProbe, ModalityShares, ProbeSet, hook_count,
                           parse_probes, trunk_grad_norms)
from mmtool.train import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 image-then-caption samples: the image's patches, then the caption's bytes, no label token."""
    path = tmp_path_factory.mktemp("probes") / "ka"
    preprocess(PreprocessConfig("known-answer", path, tokenizers=["text=bytes"],
                                options=["samples=24", "order=image-first", "label_token=false"]))
    return path


def model_and_batch(data, fusion="early", objectives=None):
    index = TokenIndex([data])
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", fusion=fusion,
                                    objectives=objectives or {"next-token": 1.0, "masked-patch": 1.0}),
                        index.streams)
    return model, assemble(index, np.arange(6), "packed"), index


def test_uniform_attention_gives_token_count_shares(data):
    """With q = k = 0 every query attends uniformly to the keys it may see: a caption token at
    position p (causal) sends n/(p+1) of its mass to the n image patches before it."""
    model, batch, _ = model_and_batch(data)
    for block in model.trunk.blocks:
        with torch.no_grad():
            block.attn.qkv.weight[:128].zero_()  # q and k rows (d = 64)
            block.attn.qkv.bias[:128].zero_()
    probe = AttentionProbe(model, ["ka"], max_queries=10**6)  # every token is a query
    probe.start()
    model(batch, generator=torch.Generator().manual_seed(0))
    probe.stop()
    out = probe.result()
    assert hook_count(model) == 0
    pos = batch.numpy("slot_pos")
    text = np.array([model.modalities[m] == "text" for m in
                     model.modality_of_stream[torch.from_numpy(batch.numpy("slot_stream")).long()]])
    sample = batch.numpy("slot_sample")
    n_img = np.bincount(sample[~text], minlength=batch.batch_size)  # image tokens of each sample
    assert (pos[~text] < n_img[sample[~text]]).all()  # the image comes first
    expected = float(np.mean(n_img[sample[text]] / (pos[text] + 1)))
    assert out["queries"] == {"image": int((~text).sum()), "text": int(text.sum())}
    for layer in out["layers"]:
        assert layer["image"]["image"] == pytest.approx(1.0)  # image comes first: sees only images
        assert layer["text"]["image"] == pytest.approx(expected, rel=1e-6)
        assert layer["text"]["text"] == pytest.approx(1 - expected, rel=1e-6)


@pytest.mark.parametrize("fusion", ["early", "mid", "late"])
def test_every_row_sums_to_one_and_per_modality_layers_stay_inside(data, fusion):
    model, batch, _ = model_and_batch(data, fusion)
    probe = AttentionProbe(model, ["ka"], max_queries=20)
    probe.start()
    model(batch, generator=torch.Generator().manual_seed(0))
    probe.stop()
    layers = probe.result()["layers"]
    for i, layer in enumerate(layers):
        for frm, row in layer.items():
            assert sum(row.values()) == pytest.approx(1.0, abs=1e-6)  # float32 softmax
            if fusion == "late" or (fusion == "mid" and i == 0):  # within (sample, modality)
                assert row[frm] == pytest.approx(1.0)
    if fusion == "early":
        assert layers[0]["text"]["image"] > 0.1


def test_padded_batches_computed_with_padding_give_the_same_shares(data):
    model, packed, index = model_and_batch(data, "mid")
    padded = assemble(index, np.arange(6), "padded")
    results = []
    for batch, keep in ((packed, False), (padded, True)):
        model.keep_padding = keep  # padded rows + masks: the probe reads the block's mask
        probe = AttentionProbe(model, ["ka"], max_queries=10**6)
        probe.start()
        model(batch, generator=torch.Generator().manual_seed(0))
        probe.stop()
        results.append(probe.result())
    assert results[0]["queries"] == results[1]["queries"]
    for a, b in zip(results[0]["layers"], results[1]["layers"]):
        for frm in a:
            assert a[frm] == pytest.approx(b[frm], abs=1e-5)


def test_grad_norm_matches_a_manual_computation(data):
    model, batch, _ = model_and_batch(data)
    outputs = {}  # manual: the encoder outputs of one forward, and d loss / d output
    handles = [enc.register_forward_hook(lambda m, a, o, k=k: outputs.__setitem__(k, o))
               for k, enc in model.embedder.encoders.items()]
    loss = model(batch, generator=torch.Generator().manual_seed(0)).loss
    keys = sorted(outputs)
    by_key = dict(zip(keys, torch.autograd.grad(loss, [outputs[k] for k in keys])))
    for h in handles:
        h.remove()

    probe = GradNormProbe(model, ["ka"])  # the probe: the same forward again, then backward
    probe.start()
    model(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    probe.after_backward()
    probe.stop()
    out = probe.result()
    checked = 0
    for k, stream in enumerate(model.streams):
        if str(k) not in by_key:
            continue
        name = stream.modality
        manual_params = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.embedder.encoders[str(k)].parameters()))
        assert out["params"][name] == pytest.approx(float(manual_params), rel=1e-5)
        g = by_key[str(k)]  # [n_k, d]
        assert out["tokens"][name] == pytest.approx(float(g.norm()), rel=1e-5)
        assert out["per_token"][name] == pytest.approx(float(g.norm()) / g.shape[0] ** 0.5, rel=1e-5)
        checked += 1
    assert checked == 2 and hook_count(model) == 0


def test_probes_off_register_no_hook_and_losses_match(data, tmp_path, monkeypatch):
    calls = []
    real_fwd, real_tensor = torch.nn.Module.register_forward_hook, torch.Tensor.register_hook
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",
                        lambda self, *a, **k: calls.append("module") or real_fwd(self, *a, **k))
    monkeypatch.setattr(torch.Tensor, "register_hook",
                        lambda self, *a, **k: calls.append("tensor") or real_tensor(self, *a, **k))
    base = dict(data=[str(data)], batch_samples=8, batch_tokens=None, max_steps=4, warmup=1,
                num_workers=0, save_every=4, model=ModelConfig(size="tiny"))
    train(TrainConfig(out=tmp_path / "off", **base))
    assert calls == []  # probes off: not a single hook, not even for a moment
    train(TrainConfig(out=tmp_path / "on", probes=["attention", "grad-norm", "loss"], probe_every=2, **base))
    assert "module" in calls and "tensor" in calls
    off = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    on = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in off] == [x["loss"] for x in on]  # bitwise: probes only observe
    assert [x["grad_norm"] for x in off] == [x["grad_norm"] for x in on]
    assert ["probes" in x for x in on] == [True, True, False, True]  # step 1, then every 2nd
    assert not any("probes" in x for x in off)
    p = on[1]["probes"]
    assert set(p) == {"attention", "grad-norm", "loss"}
    assert set(p["loss"]["by_modality"]) == {"image", "text"} and set(p["loss"]["by_source"]) == {"ka"}
    assert p["loss"]["by_modality"]["text"]["next-token"] == pytest.approx(on[1]["by_stream"]["next-token/text:bytes"])


def test_trunk_grad_norms_are_each_modality_weighted_gradient(data):
    """‖∂(modality's weighted loss)/∂hidden‖: the per-modality gradients add up to the loss's
    gradient at the trunk output, scale with the objective weight, and leave `.grad` alone."""
    gen = lambda: torch.Generator().manual_seed(0)
    model, batch, _ = model_and_batch(data)
    out = model(batch, generator=gen())
    norms = trunk_grad_norms(out)
    assert set(norms) == {"image", "text"} and all(p.grad is None for p in model.parameters())
    g_img, g_txt, g_all = (torch.autograd.grad(x, out.hidden, retain_graph=True)[0] for x in
                           (out.modality_losses["image"], out.modality_losses["text"], out.loss))
    assert torch.allclose(g_img + g_txt, g_all, atol=1e-7)  # the parts' gradients add up to the loss's
    assert norms == {"image": pytest.approx(float(g_img.norm()), rel=1e-5),
                     "text": pytest.approx(float(g_txt.norm()), rel=1e-5)}
    heavy, _, _ = model_and_batch(data, objectives={"next-token": 1.0, "masked-patch": 3.0})  # same init
    doubled = trunk_grad_norms(heavy(batch, generator=gen()))
    assert doubled == {"image": pytest.approx(3 * norms["image"], rel=1e-5),
                       "text": pytest.approx(norms["text"], rel=1e-5)}
    shares = ModalityShares()
    shares.add(out)
    shares.add(out)  # two micro-batches: losses add, norms add in squares
    res = shares.result()
    total = sum(out.by_modality.values())
    assert res["loss_share"] == pytest.approx({k: v / total for k, v in out.by_modality.items()})
    assert res["grad_trunk"] == pytest.approx({k: v * 2**0.5 for k, v in norms.items()}, rel=1e-5)
    assert res["grad_share"] == pytest.approx({k: v / sum(norms.values()) for k, v in norms.items()}, rel=1e-5)
    assert "grad_share" not in (lambda s: (s.add(out), s.result())[1])(ModalityShares(grads=False))


def test_train_logs_loss_share_every_step_and_grad_share_on_probe_steps(data, tmp_path):
    train(TrainConfig(out=tmp_path / "run", data=[str(data)], batch_samples=8, batch_tokens=None,
                      max_steps=4, warmup=1, num_workers=0, save_every=4, probe_every=2,
                      model=ModelConfig(size="tiny", objectives={"next-token": 1.0, "masked-patch": 2.0})))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["grad_share" in x for x in lines] == [True, True, False, True]  # step 1, then every 2nd
    for x in lines:  # text is scored by next-token only, image by masked-patch (weight 2) only
        assert x["loss_share"]["text"] * x["loss"] == pytest.approx(x["losses"]["next-token"], rel=1e-4)
        assert x["loss_share"]["image"] * x["loss"] == pytest.approx(2 * x["losses"]["masked-patch"], rel=1e-4)
        if "grad_share" in x:
            assert sum(x["grad_share"].values()) == pytest.approx(1.0)
            total = sum(x["grad_trunk"].values())
            assert x["grad_share"] == pytest.approx({k: v / total for k, v in x["grad_trunk"].items()})


def test_unknown_probe_names_fail_with_close_matches():
    with pytest.raises(Exception, match="grad-norm"):
        parse_probes("attention,gradnorm")
    assert parse_probes(" attention , loss ") == ["attention", "loss"]
    with pytest.raises(Exception, match="probe-every"):
        ProbeSet(["loss"], 0, None, [])
