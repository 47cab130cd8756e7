"""What `mmtool train` records about its mixture: the resolved `mix_by` and `splits` in config.json,
and each step's realised per-source token share in metrics.jsonl."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mmtool.data.loader import Loader
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.models.model import ModelConfig
from mmtool.train import TrainConfig, train


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-data")
    preprocess(PreprocessConfig("digits", root / "digits", max_samples=96))
    preprocess(PreprocessConfig("cartpole", root / "cartpole", options=["episodes=8", "max_steps=40"]))
    return root


def test_config_records_mix_by_and_splits_and_metrics_the_token_shares(folders, tmp_path):
    cfg = TrainConfig(data=[f"{folders / 'digits'}=1", f"{folders / 'cartpole'}=1"], out=tmp_path / "run",
                      batch_tokens=1024, max_steps=4, save_every=4, warmup=1, num_workers=0,
                      model=ModelConfig(size="tiny"))
    train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["mix_by"] == "tokens" and saved["splits"] == ["train"]  # resolved defaults
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loader = Loader(cfg.loader_config(0, 1, pin=False))  # the same batches, drawn independently
    names = [f.name for f in loader.index.folders]
    for line, batch in zip(log, itertools.islice(loader.forever(), 4)):
        tokens = np.bincount(batch.numpy("sample_folder"), batch.numpy("seqlens"), len(names))
        want = {n: t / tokens.sum() for n, t in zip(names, tokens) if t}
        assert line["token_share"] == pytest.approx(want)
        assert set(line["token_share"]) == set(line["by_source"])
    total = np.mean([[x["token_share"].get(n, 0) for n in names] for x in log], axis=0)
    assert total.min() > 0.2  # equal token weights: both sources trained, neither swamped


def test_resume_refuses_other_splits(folders, tmp_path):
    base = dict(data=[str(folders / "digits")], out=tmp_path / "run", batch_tokens=1024, max_steps=2,
                save_every=1, warmup=1, num_workers=0, model=ModelConfig(size="tiny"))
    train(TrainConfig(**base))
    with pytest.raises(MMToolError, match="splits"):
        train(TrainConfig(**{**base, "max_steps": 3, "splits": ["train", "validation"]}), resume=True)


def test_each_folder_trains_its_own_objectives_and_the_tasks_are_logged(folders, tmp_path, cli):
    """`--data DIR=W:objectives=...` (the flag form, through the real CLI): config.json records each
    folder's tasks, metrics.jsonl logs each task's loss and its share of the loss and trunk gradient,
    and the report shows the tasks' shares."""
    run = tmp_path / "run"
    cli("train", "--data", f"{folders / 'digits'}=1:objectives=caption,contrastive=0.5",
        "--data", f"{folders / 'cartpole'}=1:objectives=behaviour-cloning", "--out", run,
        "--batch-tokens", "1024", "--max-steps", "4", "--warmup", "1", "--num-workers", "0",
        "--probe-every", "2")
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["folder_objectives"] == [{"caption": 1.0, "contrastive": 0.5},
                                                   {"behaviour-cloning": 1.0}]
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tasks = {k for x in log for k in x["by_task"]}
    assert tasks == {"digits/caption", "digits/contrastive", "cartpole/behaviour-cloning"}
    both = [x for x in log if len(x["by_task"]) == 3]
    assert both, "no step held both folders"
    for x in both:
        assert x["by_task"]["cartpole/behaviour-cloning"] == pytest.approx(x["losses"]["behaviour-cloning"])
        assert sum(x["task_loss_share"].values()) == pytest.approx(1.0)
    assert any("task_grad_share" in x and len(x["task_grad_share"]) == 3 for x in both)
    assert not any("text" in k for x in log for k in x["by_stream"] if k.startswith("behaviour-cloning/"))
    out = cli("report", run, "--out", tmp_path / "report").stdout
    assert "digits/caption" in out and "cartpole/behaviour-cloning" in out


def test_a_task_the_folder_cannot_feed_is_refused_naming_the_folder(folders, tmp_path):
    cfg = TrainConfig(data=[f"{folders / 'digits'}=1:objectives=behaviour-cloning", str(folders / "cartpole")],
                      out=tmp_path / "run", batch_tokens=1024, max_steps=1, num_workers=0)
    with pytest.raises(MMToolError, match="digits: objective 'behaviour-cloning' cannot train"):
        train(cfg)


def test_fraction_keeps_a_seeded_nested_subset_of_one_folder(folders):
    def members(frac, seed=0):
        loader = Loader(TrainConfig(data=[f"{folders / 'digits'}=1:fraction={frac}", f"{folders / 'cartpole'}=1"],
                                    seed=seed, num_workers=0).loader_config(0, 1, pin=False))
        folder = loader.index.sample_folder[loader.members]
        return set(loader.members[folder == 0].tolist()), int((folder == 1).sum())

    full, cart = members(1.0)
    quarter, cart_q = members(0.25)
    half, _ = members(0.5)
    assert len(quarter) == round(0.25 * len(full)) and quarter < half < full  # nested subsets
    assert cart_q == cart  # the other folder untouched
    assert members(0.25, seed=1)[0] != quarter  # another seed, another subset


def test_a_balanced_multi_task_run_resumes_exactly(folders, tmp_path):
    """loss-scale keeps running means in the model's state: a run stopped after step 2 (a NaN at
    step 3) and resumed logs the same losses as one that never stopped."""
    def cfg(out, **kw):
        return TrainConfig(data=[f"{folders / 'digits'}=1:objectives=caption,contrastive=0.5",
                                 f"{folders / 'cartpole'}=1:objectives=behaviour-cloning"],
                           out=out, batch_tokens=1024, max_steps=4, save_every=2, warmup=1,
                           num_workers=0, model=ModelConfig(size="tiny", task_balance="loss-scale"), **kw)

    train(cfg(tmp_path / "straight"))
    with pytest.raises(MMToolError, match="loss is nan at step 3"):
        train(cfg(tmp_path / "stopped", fault_nan_step=3))
    train(cfg(tmp_path / "stopped"), resume=True)
    a, b = ([json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("straight", "stopped"))
    assert a == b and len(a) == 4
