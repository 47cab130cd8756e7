"""What `--resume` refuses and what it records, through the real CLI: changed data, changed
settings, edited checkpoints, torn metrics, and SIGTERM at random moments (fault injection)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.folder_state import changed, snapshot

TRAIN = ["--model", "tiny", "--batch-tokens", "1024", "--num-workers", "0", "--warmup", "2",
         "--lr", "3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    run_cli("preprocess", "digits", "--out", root / "digits", "--max-samples", "96")
    run_cli("preprocess", "cartpole", "--out", root / "cartpole", "--opt", "episodes=6",
            "--opt", "max_steps=40")
    return root


def train_args(data, run, *extra):
    return ["train", "--data", data / "digits", "--data", data / "cartpole", "--out", run, *TRAIN, *extra]


def weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_resume_refuses_rebuilt_data_and_keeps_the_run(data, tmp_path):
    copy = tmp_path / "digits"
    run_cli("preprocess", "digits", "--out", copy, "--max-samples", "96")
    run = tmp_path / "run"
    run_cli("train", "--data", copy, "--out", run, *TRAIN, "--max-steps", "2")
    run_cli("preprocess", "digits", "--out", copy, "--max-samples", "80", "--overwrite")
    before = snapshot(run)
    proc = run_cli("train", "--data", copy, "--out", run, *TRAIN, "--max-steps", "4", "--resume",
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert f"data folder {copy} changed since checkpoint step-00000002" in proc.stderr
    assert changed(before, snapshot(run)) == []


def test_resume_refuses_shaping_settings_and_amends_the_others(data, tmp_path):
    run = tmp_path / "run"
    run_cli(*train_args(data, run, "--max-steps", "2"))
    before = snapshot(run)
    proc = run_cli(*train_args(data, run, "--max-steps", "4", "--seed", "1", "--resume"), check=False)
    assert proc.returncode == 2 and "seed=0 then, 1 now" in proc.stderr
    assert changed(before, snapshot(run)) == []
    proc = run_cli(*train_args(data, run, "--max-steps", "4", "--resume"))
    assert "amended settings: max_steps 2 → 4" in proc.stdout
    doc = json.loads((run / "config.json").read_text())
    assert doc["max_steps"] == 4  # config.json holds the settings in force ...
    [amendment] = doc["amendments"]  # ... and how they got there
    assert amendment["step"] == 2 and amendment["changes"] == {"max_steps": {"from": 2, "to": 4}}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    run_cli("report", run, "--out", tmp_path / "report")  # readers accept the amended config.json


@pytest.mark.parametrize("edit, message", [
    (lambda doc: doc.update(step=1), "modified after it was written"),
    pytest.param(lambda doc: doc["loader"][0].update(batch=doc["loader"][0]["batch"] + 1),
                 "modified after it was written", marks=pytest.mark.slow),  # same digest check as step
    (lambda doc: doc.pop("sha256"), "has no 'sha256'"),
    pytest.param(lambda doc: doc.clear(), "has no 'step'", marks=pytest.mark.slow),
])
def test_resume_refuses_an_edited_checkpoint(data, tmp_path, edit, message):
    run = tmp_path / "run"
    run_cli(*train_args(data, run, "--max-steps", "2"))
    state = run / "checkpoints" / "step-00000002" / "state.json"
    doc = json.loads(state.read_text())
    edit(doc)
    state.write_text(json.dumps(doc))
    before = snapshot(run)
    proc = run_cli(*train_args(data, run, "--max-steps", "3", "--resume"), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert changed(before, snapshot(run)) == []


def test_torn_metrics_tail_is_dropped_and_noted(data, tmp_path):
    run = tmp_path / "run"
    run_cli(*train_args(data, run, "--max-steps", "3", "--save-every", "2"))
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "loss": 1.2')  # a write cut by kill -9
    proc = run_cli(*train_args(data, run, "--max-steps", "4", "--save-every", "2", "--resume"))
    assert "dropped 1 torn or unreadable line" in proc.stdout
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def _interrupt_at_random(args: list, seed: int) -> tuple[int, str]:
    """Starts `mmtool ARGS`, sends SIGTERM at a random moment after its first step, returns
    (exit status, stderr)."""
    metrics = Path(args[args.index("--out") + 1]) / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "mmtool", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.stat().st_size):
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0, 0.5))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow  # 30-step runs, ~90 s each; test_loop.test_interrupted_run_resumes_bitwise runs by default
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigterm_at_a_random_moment_then_resume_equals_a_straight_run(data, tmp_path, seed):
    steps = ["--max-steps", "30", "--save-every", "7"]
    straight = tmp_path / "straight"
    run_cli(*train_args(data, straight, *steps))
    run = tmp_path / "run"
    code, err = _interrupt_at_random(train_args(data, run, *steps), seed)
    if (run / "checkpoints" / "step-00000030").is_dir():
        # The signal came after the last step (0), or during interpreter shutdown (-15: Python
        # restores the default handlers as it exits): the work was done; nothing to resume.
        assert code in (0, -signal.SIGTERM), err
    else:
        assert code == 130, err
        assert "interrupted by SIGTERM at step" in err and "rerun the same command with --resume" in err
        stopped = int(err.split("at step ")[1].split()[0])
        assert (run / "checkpoints" / f"step-{stopped:08d}").is_dir()  # saved where it stopped
        run_cli(*train_args(data, run, *steps, "--resume"))
    a, b = weights(straight, 30), weights(run, 30)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in logged] == [json.loads(x)["loss"] for x in
                                           (straight / "metrics.jsonl").read_text().splitlines()]
