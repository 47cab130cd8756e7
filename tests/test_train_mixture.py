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
