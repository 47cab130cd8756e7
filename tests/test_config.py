"""Config building: defaults → YAML → flags → key=value overrides, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtool.config import build_config, from_dict, parse_weights, to_dict
from mmtool.errors import MMToolError
from mmtool.train import TrainConfig


def test_precedence_and_nesting(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("lr: 0.01\nmax_steps: 7\nmodel:\n  size: small\n  fusion: mid\n"
                   "  objectives: {next-token: 1, masked-patch: 0.25}\ndata: [a, b=2]\n")
    cfg = build_config(TrainConfig, yml, {"max_steps": 9, "model.fusion": None}, ["model.fusion_layer=2", "lr=3e-4"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 9  # override beats YAML; flag beats YAML
    assert cfg.model.size == "small" and cfg.model.fusion == "mid" and cfg.model.fusion_layer == 2
    assert cfg.model.objectives == {"next-token": 1.0, "masked-patch": 0.25}
    assert cfg.data == ["a", "b=2"]
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(MMToolError, match="unknown setting 'model.colour'.*size"):
        build_config(TrainConfig, None, None, ["model.colour=red"])
    with pytest.raises(MMToolError, match="lr='fast'"):
        build_config(TrainConfig, None, None, ["lr=fast"])
    with pytest.raises(MMToolError, match="expected key=value"):
        build_config(TrainConfig, None, None, ["lr"])
    with pytest.raises(MMToolError, match="--config"):
        build_config(TrainConfig, Path(tmp_path / "missing.yaml"))


def test_parse_weights():
    assert parse_weights("next-token=1,masked-patch=0.5", "x") == {"next-token": 1.0, "masked-patch": 0.5}
    assert parse_weights("contrastive", "x") == {"contrastive": 1.0}
    with pytest.raises(MMToolError, match="masked-patch"):
        parse_weights("masked-patch=lots", "--objectives")
