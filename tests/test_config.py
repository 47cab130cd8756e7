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


def test_tuples_lists_and_required_fields_from_flags():
    from mmtool.transfer import TransferConfig

    cfg = build_config(TransferConfig, flags={"run": "r", "protocol.ks": "1, 3", "protocols": "kshot",
                                              "protocol.lrs": "1e-3"})
    assert cfg.run == Path("r") and cfg.protocol.ks == (1, 3) and cfg.protocol.lrs == (1e-3,)
    assert cfg.protocols == ["kshot"]
    with pytest.raises(MMToolError, match="--protocol.ks '1,x': expected comma-separated ints"):
        build_config(TransferConfig, flags={"run": "r", "protocol.ks": "1,x"})
    with pytest.raises(MMToolError, match="--run: required"):
        build_config(TransferConfig, flags={"tasks": "digits"})


REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_there():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "fusion", "sample-weights", "frozen-vs-learned"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_is_a_train_config(path):
    cfg = build_config(TrainConfig, path)
    assert cfg.data and all(entry.startswith("data/") for entry in cfg.data)  # relative to the repo
    assert cfg.model.size == "tiny" and str(cfg.out).startswith("runs/")
    assert path.read_text(encoding="utf-8").startswith("#")  # says what it is for and how to run it


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_is_a_sweep(path):
    from mmtool.experiments.sweep import load_spec, points

    spec = load_spec(path)
    assert spec.name == path.stem and len(points(spec)) >= 2


def test_quickstart_config_is_what_quickstart_trains():
    from mmtool.cli.quickstart import BUILTIN_MIXTURE, PROFILE_BATCH_TOKENS, QUICKSTART_MODEL

    cfg = build_config(TrainConfig, REPO / "configs" / "quickstart.yaml")
    assert cfg.data == [f"data/{source}=1" for source in BUILTIN_MIXTURE]
    assert {k: getattr(cfg.model, k) for k in QUICKSTART_MODEL} == QUICKSTART_MODEL
    assert cfg.batch_tokens == PROFILE_BATCH_TOKENS and cfg.splits == ["train"]
    assert (cfg.max_steps, cfg.warmup, cfg.save_every) == (150, 10, 75)  # quickstart --train-steps 150


def test_sample_weights_config_is_the_sweeps_middle_point():
    from mmtool.experiments.sweep import load_spec

    spec = load_spec(REPO / "configs" / "experiments" / "sample-weight.yaml")
    cfg = build_config(TrainConfig, REPO / "configs" / "sample-weights.yaml")
    middle = [e.replace("builtin:", "data/") for e in spec.grid["data"][1]]
    assert cfg.data == middle
    for key in ("batch_tokens", "max_steps", "warmup", "save_every"):
        assert getattr(cfg, key) == spec.train[key], key
