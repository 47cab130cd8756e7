"""The run folder: streams.json at train start, `load_model` from the run folder alone (moved, data
deleted), a chosen step, and old runs without streams.json (upgraded with data, clear error without)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmtool.data.index import TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.models.model import ModelConfig
from mmtool.train.rundir import STREAMS, load_model, read_streams
from mmtool.train import TrainConfig, train


@pytest.fixture(scope="module")
def moved(tmp_path_factory) -> dict:
    """A tiny run trained on digits, then moved to another folder with its data deleted."""
    root = tmp_path_factory.mktemp("rundir")
    preprocess(PreprocessConfig("digits", root / "data" / "digits", max_samples=200))
    streams = TokenIndex([root / "data" / "digits"]).streams
    train(TrainConfig(data=[str(root / "data" / "digits")], out=root / "run", batch_tokens=512,
                      max_steps=4, save_every=2, warmup=1, num_workers=0, model=ModelConfig(size="tiny")))
    shutil.move(root / "run", root / "elsewhere")
    shutil.rmtree(root / "data")
    preprocess(PreprocessConfig("digits", root / "fresh" / "digits", max_samples=200))
    return {"run": root / "elsewhere", "streams": streams, "fresh": root / "fresh" / "digits", "root": root}


def test_streams_json_holds_every_stream_and_the_mixture(moved):
    doc = json.loads((moved["run"] / STREAMS).read_text())
    assert [dataclasses.asdict(s) for s in moved["streams"]] == doc["streams"]
    assert [s["key"] for s in doc["streams"]] == ["image:patches", "text:wordpiece", "separator"]
    (folder,) = doc["folders"]
    assert folder["name"] == "digits" and folder["source"] == "digits" and folder["sources"] == ["digits"]
    assert folder["modalities"] == ["image", "text"] and folder["path"].endswith("data/digits")
    assert folder["preprocess"]["name"] == "digits" and folder["preprocess"]["max_samples"] == 200


def test_load_model_needs_only_the_run_folder(moved):
    run = moved["run"]
    model, cfg, info = load_model(run)
    assert info.step == 4 and info.checkpoint.name == "step-00000004" and not info.upgraded
    assert info.splits == ["train"] and cfg.max_steps == 4
    saved = load_file(str(info.checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    early, _, info2 = load_model(run, step=2)
    assert info2.step == 2
    differs = [k for k in saved if not torch.equal(early.state_dict()[k], saved[k])]
    assert differs  # two more optimizer steps changed weights
    with pytest.raises(MMToolError, match=r"--step 3: .* has no checkpoint at that step \(it has 2, 4\)"):
        load_model(run, step=3)


def test_old_run_is_upgraded_when_its_data_exists(moved, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(moved["run"], old)
    (old / STREAMS).unlink()
    cfg = json.loads((old / "config.json").read_text())
    cfg["data"] = [str(moved["fresh"])]  # the data is back (here: a fresh copy)
    (old / "config.json").write_text(json.dumps(cfg))
    _, _, info = load_model(old)
    assert info.upgraded and (old / STREAMS).is_file()
    assert info.streams == moved["streams"] and info.folders[0]["path"] == str(moved["fresh"])
    assert read_streams(old)[2] is False  # the second load reads the file


def test_old_run_without_its_data_is_a_one_line_error(moved, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(moved["run"], old)
    (old / STREAMS).unlink()
    with pytest.raises(MMToolError) as err:
        load_model(old)
    message = str(err.value)
    assert "no streams.json" in message and "data/digits" in message and "is gone" in message
    assert "put the preprocessed folder(s) back" in message and "\n" not in message


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(MMToolError, match="no such folder"):
        load_model(tmp_path / "nothing")
    with pytest.raises(MMToolError, match="not a training run"):
        load_model(tmp_path)
