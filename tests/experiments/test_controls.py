"""The positive controls (`mmtool experiment controls`): each instrument finds a known answer.

They train real models on the built-in data, so they are `slow` (run by CI after the default suite:
`pytest -m slow`). A failure here means an instrument is broken, not that a hypothesis is false.
"""

import json
import subprocess
import sys

import pytest

from mmtool.errors import MMToolError
from mmtool.experiments import EXPERIMENTS, ExperimentConfig, run_experiment


def test_registry_lists_the_controls():
    assert {"control-transfer", "control-zeroshot", "control-importance", "controls"} <= set(EXPERIMENTS.names())
    with pytest.raises(MMToolError, match="unknown experiment 'control'"):
        run_experiment("control", ExperimentConfig())


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    work = tmp_path_factory.mktemp("controls")
    return work, {r.name: r for r in run_experiment("controls", ExperimentConfig(workdir=work))}


def _failed(result):
    return [c for c in result.checks if not c.passed]


@pytest.mark.slow
def test_control_transfer(controls):
    _, results = controls
    r = results["control-transfer"]
    assert r.passed, _failed(r)
    for k in ("1", "5", "10"):
        assert r.numbers["kshot"][k]["gain_ci95"][0] > 0


@pytest.mark.slow
def test_control_zeroshot(controls):
    _, results = controls
    r = results["control-zeroshot"]
    assert r.passed, _failed(r)
    assert r.numbers["pretrained"]["ci95"][0] > 2 * r.numbers["chance"]


@pytest.mark.slow
def test_control_importance_and_the_untrained_model_fails(controls):
    _, results = controls
    r = results["control-importance"]
    assert r.passed, _failed(r)
    assert r.numbers["untrained"]["passed"] is False


@pytest.mark.slow
def test_cli_reuses_finished_work_and_prints_the_checks(controls):
    work, _ = controls
    proc = subprocess.run([sys.executable, "-m", "mmtool", "experiment", "control-transfer",
                           "--workdir", str(work)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "control-transfer: passed" in proc.stdout
    doc = json.loads((work / "control-transfer" / "result.json").read_text())
    assert doc["passed"] and len(doc["checks"]) == 3
