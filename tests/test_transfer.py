"""eval-transfer on a tiny model pretrained on real sample data: every protocol, the probe against
scikit-learn, reproducibility, `--modalities`, and the bad inputs; plus the slow headline check."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mmtool.data.batching import assemble
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.models.model import ModelConfig
from mmtool.train import TrainConfig, train
from mmtool.transfer import TransferConfig, evaluate_transfer
from mmtool.transfer.evaluate import load_models
from mmtool.transfer.protocols import Evaluation, ProtocolConfig, probe, stratified_subset
from mmtool.transfer.tasks import TASKS, Task, prepare_task, stratified_split

SMALL = ProtocolConfig(fractions=(0.5, 1.0), ks=(1, 3), episodes=8, steps=3, batch_size=16,
                       lrs=(3e-4, 1e-3), cs=(0.1, 1.0, 10.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny early-fusion model pretrained 20 steps on 400 digits and 6 cartpole episodes."""
    root = tmp_path_factory.mktemp("transfer")
    preprocess(PreprocessConfig("digits", root / "data" / "digits", max_samples=400))
    preprocess(PreprocessConfig("cartpole", root / "data" / "cartpole", options=["episodes=6", "max_steps=40"]))
    out = root / "run"
    train(TrainConfig(data=[str(root / "data" / n) for n in ("digits", "cartpole")], out=out,
                      batch_tokens=512, max_steps=20, save_every=20, warmup=4, lr=3e-3, num_workers=0,
                      model=ModelConfig(size="tiny")))
    return out


def job(run: Path, out: Path, **kw) -> TransferConfig:
    protocol = kw.pop("protocol", SMALL)
    return TransferConfig(run=run, out=out, protocol=replace(protocol), **kw)


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return evaluate_transfer(job(run, out, tasks=["digits"], protocol=replace(SMALL, lrs=(1e-3,))))


def test_every_protocol_runs_and_gives_sane_values(report):
    t = report["tasks"]["digits"]
    assert t["modalities"] == ["image"] and t["chance"] < 0.2  # image only by default
    assert set(t["results"]) == {"linear-probe", "finetune", "kshot", "zeroshot"}
    for name, res in t["results"].items():
        assert res["applicable"], name
        for row in res["rows"]:
            assert 0 <= row["pretrained"] <= 1 and 0 <= row["scratch"] <= 1
            assert row["ratio"] == pytest.approx(row["pretrained"] / row["scratch"])
    # The headline, cheap version: the probe on 20-step features is far above chance (0.1).
    # (Digits pixels are almost linearly separable, so the scratch twin scores high too.)
    assert t["results"]["linear-probe"]["rows"][0]["pretrained"] > 0.3
    assert [p["fraction"] for p in t["results"]["linear-probe"]["curve"]] == [0.5, 1.0]
    assert [r["setting"] for r in t["results"]["kshot"]["rows"]] == ["k=1", "k=3"]
    assert all(r["pretrained_ci95"] > 0 for r in t["results"]["kshot"]["rows"])
    assert t["results"]["finetune"]["detail"]["pretrained"]["lr"] == 1e-3
    assert [r["setting"] for r in t["results"]["zeroshot"]["rows"]] == ["", "calibrated"]
    sizes = t["split"]["sizes"]
    assert sizes["train"] + sizes["validation"] + sizes["test"] == 400 and t["split"]["seed"] == 0
    assert all(min(c) >= 1 for c in t["split"]["per_class"].values())  # every class in every split
    assert Path(report["plots"]["digits"]).stat().st_size > 10_000
    assert json.loads(Path(report["report"]).read_text())["tasks"]["digits"]["chance"] == t["chance"]


def test_linear_probe_agrees_with_sklearn_on_exported_features(run, report, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    models, rundata, _ = load_models(run, "cpu")
    task = prepare_task("digits", rundata, tmp_path, 0, None, False)
    x, y = Evaluation(task, models, SMALL).features("pretrained"), task.labels
    tr, va, te = task.splits["train"], task.splits["validation"], task.splits["test"]

    def fit(idx, c):
        scaler = StandardScaler().fit(x[idx])
        return scaler, LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x[idx]), y[idx])

    val = {c: (lambda s, m: m.score(s.transform(x[va]), y[va]))(*fit(tr, c)) for c in SMALL.cs}
    best = max(SMALL.cs, key=lambda c: (val[c], -c))
    scaler, model = fit(np.concatenate([tr, va]), best)
    expected = model.score(scaler.transform(x[te]), y[te])
    got = report["tasks"]["digits"]["results"]["linear-probe"]["detail"]["pretrained"]
    assert got["C"] == best and got["test"] == pytest.approx(expected, abs=1e-12)
    assert got["val_by_C"] == {str(c): pytest.approx(v) for c, v in val.items()}
    assert probe(1.0).fit(x[tr], y[tr]).score(x[te], y[te]) > 0.3


def test_report_is_reproducible_for_a_seed(run, tmp_path):
    cfg = dict(tasks=["digits"], protocols=["linear-probe", "kshot", "finetune"])
    budget = replace(SMALL, fractions=(1.0,), steps=2)
    evaluate_transfer(job(run, tmp_path, protocol=budget, **cfg))
    first = (tmp_path / "report.json").read_bytes()
    evaluate_transfer(job(run, tmp_path, protocol=budget, **cfg))
    assert (tmp_path / "report.json").read_bytes() == first
    assert set(json.loads(first)["tasks"]["digits"]["results"]["finetune"]["detail"]["scratch"]["val_by_lr"]) \
        == {"0.0003", "0.001"}  # the lr is chosen on validation


def test_modalities_restrict_what_the_model_sees(run, tmp_path):
    models, rundata, _ = load_models(run, "cpu")
    streams = {s.key: k for k, s in enumerate(rundata.streams)}
    image = prepare_task("digits", rundata, tmp_path, 0, None, False)
    both = prepare_task("digits", rundata, tmp_path, 0, ["image", "text"], False)
    batch = assemble(image.index, np.arange(8))
    assert batch.streams == (streams["image:patches"],)  # no caption token reaches the model
    assert set(assemble(both.index, np.arange(8)).streams) == {streams["image:patches"], streams["text:wordpiece"]}
    assert both.modalities == ["image", "text"]
    # Reading the caption, the probe finds the answer: near-perfect, unlike the image alone.
    r = evaluate_transfer(job(run, tmp_path / "r", tasks=["digits"], protocols=["linear-probe"],
                              modalities=["image", "text"]))
    assert r["tasks"]["digits"]["results"]["linear-probe"]["rows"][0]["pretrained"] > 0.97
    with pytest.raises(MMToolError, match="none of --modalities audio"):
        prepare_task("digits", rundata, tmp_path, 0, ["audio"], False)


def test_label_dir_task_and_not_applicable_zeroshot(run, tmp_path):
    digits = run.parent / "data" / "digits"
    r = evaluate_transfer(job(run, tmp_path, tasks=[f"label:{digits}"], protocols=["kshot", "zeroshot"],
                              modalities=["image"]))
    t = r["tasks"][f"label:{digits}"]
    assert t["modalities"] == ["image"] and t["classes"] == [str(c) for c in range(10)]
    assert t["results"]["zeroshot"] == {"applicable": False, "reason": "label:DIR tasks have no class prompts",
                                        "rows": [], "curve": [], "detail": {}}
    assert t["results"]["kshot"]["rows"][0]["pretrained"] > 0.3


def test_control_return_task_bins_by_train_quantiles(run, tmp_path):
    TASKS.add("pendulum-return-test", Task("pendulum", ("observation",), ("q1", "q2", "q3", "q4"),
                                           options=("episodes=40", "max_steps=30", "seed=100000"),
                                           reuse_run=False, target="episode_return"))
    r = evaluate_transfer(job(run, tmp_path, tasks=["pendulum-return-test"],
                              protocols=["linear-probe", "zeroshot"]))
    t = r["tasks"]["pendulum-return-test"]
    assert t["pretraining_saw"] == "no" and t["task_token"] == "cartpole"  # shares observations
    assert len(t["bins"]["edges"]) == 3 and sum(t["split"]["per_class"]["train"]) == 24
    assert not t["results"]["zeroshot"]["applicable"]
    assert 0 <= t["results"]["linear-probe"]["rows"][0]["pretrained"] <= 1


def test_stratified_split_is_seeded_and_covers_every_class():
    labels = np.repeat(np.arange(4), [10, 5, 3, 20])
    a, b = stratified_split(labels, 3), stratified_split(labels, 3)
    assert (a == b).all() and not (a == stratified_split(labels, 4)).all()
    for name in ("train", "validation", "test"):
        assert set(labels[a == name]) == {0, 1, 2, 3}
    sub = stratified_subset(np.flatnonzero(a == "train"), labels, 0.1, np.random.default_rng(0))
    assert set(labels[sub]) == {0, 1, 2, 3}


# -- bad input -----------------------------------------------------------------------------------
def test_task_whose_modality_the_checkpoint_never_saw(run, tmp_path):
    with pytest.raises(MMToolError, match=r"audio input \(audio:logmel\) is a stream the checkpoint never saw"):
        evaluate_transfer(job(run, tmp_path, tasks=["spoken-digits"], protocols=["linear-probe"]))


def test_k_larger_than_the_smallest_class(run, tmp_path):
    with pytest.raises(MMToolError, match=r"--k 500: task digits's smallest class has only \d+ training"):
        evaluate_transfer(job(run, tmp_path, tasks=["digits"], protocols=["kshot"],
                              protocol=replace(SMALL, ks=(1, 500), ks_given=True)))
    # Defaults skip what does not fit, and say so.
    r = evaluate_transfer(job(run, tmp_path, tasks=["digits"], protocols=["kshot"],
                              protocol=replace(SMALL, ks=(1, 500))))
    assert "k=500 skipped" in r["tasks"]["digits"]["results"]["kshot"]["detail"]["notes"][0]


def test_checkpoint_that_does_not_load(run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    ckpt = sorted((broken / "checkpoints").iterdir())[-1]
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 64)
    with pytest.raises(MMToolError, match="model.safetensors is missing or corrupt"):
        evaluate_transfer(job(broken, tmp_path / "o"))
    shutil.rmtree(broken / "checkpoints")
    with pytest.raises(MMToolError, match="has no checkpoint"):
        evaluate_transfer(job(broken, tmp_path / "o"))
    with pytest.raises(MMToolError, match="no such folder"):
        evaluate_transfer(job(tmp_path / "missing", tmp_path / "o"))


def test_bad_flags(run, tmp_path):
    with pytest.raises(MMToolError, match="unknown protocol 'linear'"):
        evaluate_transfer(job(run, tmp_path, protocols=["linear"]))
    with pytest.raises(MMToolError, match="unknown task 'digit'"):
        evaluate_transfer(job(run, tmp_path, tasks=["digit"]))
    with pytest.raises(MMToolError, match="--fractions"):
        evaluate_transfer(job(run, tmp_path, protocol=replace(SMALL, fractions=(0.0, 1.0))))


@pytest.mark.slow
def test_headline_probe_after_a_few_hundred_steps_on_the_builtin_mixture(tmp_path):
    """The issue's check: 300 steps on the whole built-in mixture, then an image-only probe on digits."""
    from mmtool.cli.quickstart import BUILTIN_MIXTURE

    data = []
    for source, options in BUILTIN_MIXTURE.items():
        preprocess(PreprocessConfig(source, tmp_path / "data" / source, options=options, num_proc=2,
                                    max_samples=3000))  # as quickstart
        data.append(str(tmp_path / "data" / source))
    train(TrainConfig(data=data, out=tmp_path / "run", batch_tokens=2048, max_steps=300, warmup=20,
                      save_every=300, num_workers=1, model=ModelConfig(size="tiny")))
    r = evaluate_transfer(job(tmp_path / "run", tmp_path / "t", tasks=["digits"],
                              protocols=["linear-probe", "kshot", "zeroshot"],
                              protocol=ProtocolConfig(episodes=50)))
    rows = {p: res["rows"] for p, res in r["tasks"]["digits"]["results"].items()}
    print(json.dumps(rows, indent=1))
    assert rows["linear-probe"][0]["pretrained"] > 0.5  # chance: 0.10
