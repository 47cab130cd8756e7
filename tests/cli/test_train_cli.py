"""`mmtool train --config configs/...`: a shipped config, then the generated flags, then key=value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtool.data.preprocess import PreprocessConfig, preprocess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cli")
    preprocess(PreprocessConfig("digits", root / "data" / "digits", max_samples=48))  # the config's data/digits
    return root


def test_shipped_config_then_flags_then_overrides(workdir, cli):
    cli("train", "--config", REPO / "configs" / "frozen-vs-learned.yaml", "--max-steps", "2",
        "--save-every", "2", "--batch-samples", "8", "--model.fusion", "early", "--device", "cpu",
        "lr=0.002", cwd=workdir)
    cfg = json.loads((workdir / "runs" / "frozen-vs-learned" / "config.json").read_text())
    assert cfg["data"] == ["data/digits"] and cfg["batch_tokens"] is None and cfg["warmup"] == 10  # the file
    assert cfg["model"]["objectives"] == {"masked-patch": 1.0, "contrastive": 1.0}
    assert cfg["batch_samples"] == 8 and cfg["model"]["fusion"] == "early" and cfg["max_steps"] == 2  # flags
    assert cfg["lr"] == 0.002  # the override
    metrics = (workdir / "runs" / "frozen-vs-learned" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]


def test_a_bad_flag_value_names_the_flag(workdir, cli):
    proc = cli("train", "--config", REPO / "configs" / "frozen-vs-learned.yaml", "--objectives",
               "masked-patch=lots", cwd=workdir, check=False)
    assert proc.returncode == 2 and "--model.objectives: weight of 'masked-patch' must be a number" in proc.stderr
