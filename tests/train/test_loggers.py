"""Experiment trackers for real: a tiny run that fails at step 4 (NaN), resumes from its step-2
checkpoint and finishes, then eval-transfer; every tracker is read back with its own reader and
must hold metrics.jsonl's per-step losses, once per step where the backend can drop re-done steps."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.train.loggers import CsvLogger, flatten, resolve

OPTIONAL = [n for n in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(n)]
KEYS = ("loss", "losses/next-token", "losses/masked-patch")


def _mmtool(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (module-scoped fixtures cannot use conftest's `cli`)."""
    return subprocess.run([sys.executable, "-m", "mmtool", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env})


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """(run folder, metrics.jsonl lines, eval-transfer report) of the fail → resume → eval run."""
    root = tmp_path_factory.mktemp("trackers")
    preprocess(PreprocessConfig("digits", root / "digits", max_samples=64))
    run = root / "run"
    # wandb offline with its config/cache in tmp; mlflow's default store (RUN/mlflow.db), whatever
    # this machine's environment says ("" counts as unset)
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
           "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data"),
           "WANDB_PROJECT": "", "MLFLOW_TRACKING_URI": "", "MLFLOW_EXPERIMENT_NAME": ""}
    base = ["train", "--data", root / "digits", "--out", run, "--max-steps", "4", "--save-every", "2",
            "--batch-tokens", "512", "--model", "tiny", "--num-workers", "0", "--probes", "loss",
            "--probe-every", "2", "loggers=" + ",".join(["jsonl", "csv", *OPTIONAL])]
    failed = _mmtool(*base, "fault_nan_step=4", env=env)
    assert failed.returncode == 2 and "at step 4" in failed.stderr, failed.stderr
    for args in (base + ["--resume"],
                 ["eval-transfer", run, "--protocol", "kshot", "--k", "1", "--episodes", "5",
                  "--bootstrap", "50", "--all-rows"]):
        proc = _mmtool(*args, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((run / "transfer" / "report.json").read_text())
    return run, lines, report


def _gain(report):
    row = report["tasks"]["digits"]["results"]["kshot"]["rows"][0]
    assert row["setting"] == "k=1"  # "=" is not allowed in MLflow names: every tracker gets k_1
    return "transfer/digits/kshot/k_1/gain", row["gain"]


def test_flatten_nests_with_slashes_and_skips_non_numbers():
    line = {"step": 3, "loss": 1.5, "losses": {"next-token": 2}, "ok": True, "name": "x",
            "probes": {"attention": {"layers": [0.25, 0.75]}}, "none": None}
    assert flatten(line) == {"step": 3.0, "loss": 1.5, "losses/next-token": 2.0,
                             "probes/attention/layers/0": 0.25, "probes/attention/layers/1": 0.75}


def test_unknown_logger_names_close_matches():
    with pytest.raises(MMToolError, match="did you mean 'tensorboard'"):
        resolve(["tensorbord"])
    assert resolve(["csv", "jsonl", "csv"]) == ["jsonl", "csv"]


def test_csv_header_grows_and_resume_drops_rows_past_the_checkpoint(tmp_path):
    log = CsvLogger(tmp_path, 0, {})
    log.log_step(1, {}, {"loss": 2.5})
    log.log_step(2, {}, {"loss": 2.0, "probes/x": 0.1})  # a new key: the header grows
    log.log_step(3, {}, {"loss": 1.5})
    text = (tmp_path / "metrics.csv").read_text().splitlines()
    assert text == ["step,loss,probes/x", "1,2.5,", "2,2.0,0.1", "3,1.5,"]
    CsvLogger(tmp_path, 2, {}).log_step(3, {}, {"loss": 1.25})  # resumed from step 2
    assert (tmp_path / "metrics.csv").read_text().splitlines()[-2:] == ["2,2.0,0.1", "3,1.25,"]


def test_jsonl_and_csv_hold_every_step_once(tracked):
    import csv

    run, lines, _ = tracked
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # the failed step 4 and the re-done step 3 once
    assert json.loads((run / "config.json").read_text())["loggers"][:2] == ["jsonl", "csv"]
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for line, row in zip(lines, rows):
        flat = flatten(line)
        assert {k: float(row[k]) for k in flat} == flat  # exact: repr round-trips floats
        assert any(k.startswith("probes/loss/") for k in flat) == (line["step"] in (1, 2, 4))
    evals = (run / "evals.csv").read_text()
    key, gain = _gain(tracked[2])
    assert f"4,{key},{gain!r}" in evals


def test_tensorboard_event_files_hold_the_losses(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, lines, report = tracked
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in KEYS:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3, 4]  # the failed session's step 3 was purged
        assert [e.value for e in events] == pytest.approx([x[key] if "/" not in key else
                                                          x["losses"][key.split("/")[1]] for x in lines], rel=1e-6)
    key, gain = _gain(report)
    assert [(e.step, e.value) for e in acc.Scalars(key)] == [(4, pytest.approx(gain, rel=1e-6))]


def _wandb_records(path: Path):
    """Records of a `.wandb` file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of
    checksum/length/type-framed chunks) holding `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # flat keys may arrive as a one-part nested_key


def test_wandb_offline_runs_hold_the_losses(tracked):
    pytest.importorskip("wandb")
    run, lines, report = tracked
    wid = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    sessions = sorted((run / "wandb").glob(f"offline-run-*-{wid}/run-{wid}.wandb"))
    assert len(sessions) == 3  # failed training, resumed training, eval-transfer: one run id
    history, exits, summary = {}, [], {}
    for path in sessions:
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":  # a later session's copy of a step wins
                history[r.history.step.num] = {_key(i): json.loads(i.value_json) for i in r.history.item}
            elif kind == "exit":
                exits.append(r.exit.exit_code)
            elif kind == "summary":
                summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert exits == [1, 0, 0]  # the NaN session was closed as failed
    assert sorted(history) == [1, 2, 3, 4]
    for x in lines:
        assert history[x["step"]]["loss"] == x["loss"]
        assert history[x["step"]]["losses/next-token"] == x["losses"]["next-token"]
    key, gain = _gain(report)
    assert summary[key] == gain and summary["eval_step"] == 4


def test_mlflow_store_holds_the_losses(tracked):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run, lines, report = tracked
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve()}/mlflow.db")
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.params["max_steps"] == "4"
    by_step = {x["step"]: x for x in lines}
    for key in KEYS:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        # MLflow cannot delete points: the re-done step 3 is there twice, equal (exact resume)
        assert [s for s, _ in hist] == [1, 2, 3, 3, 4]
        want = {s: x["loss"] if key == "loss" else x["losses"][key.split("/")[1]] for s, x in by_step.items()}
        assert all(v == want[s] for s, v in hist)
    key, gain = _gain(report)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(4, gain)]


@pytest.mark.parametrize("package", ["mlflow", "tensorboard"])
def test_a_missing_package_is_named_with_its_pip_command(tmp_path, package):
    # The package is made unimportable in a fresh interpreter (None in sys.modules), then the
    # real CLI runs: it must stop before training, naming the package and the pip command.
    code = (f"import sys; sys.modules[{package!r}] = None; from mmtool.cli import main; "
            f"sys.argv = ['mmtool', 'train', '--data', {str(tmp_path)!r}, '--out', "
            f"{str(tmp_path / 'run')!r}, 'loggers=csv,{package}']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert proc.returncode == 2, proc.stderr
    assert f"logger '{package}' needs the '{package}' package: pip install {package}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ablate_numbers_reach_the_trackers(tracked):
    """~25 s: `mmtool ablate RUN` logs each modality's importance and interval at the checkpoint."""
    run, _, _ = tracked
    proc = _mmtool("ablate", run, "--batches", "2", "--batch-samples", "8",
                   env={"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": "", "MLFLOW_EXPERIMENT_NAME": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run / "ablation.json").read_text())
    rows = [ln.split(",") for ln in (run / "evals.csv").read_text().splitlines()[1:]]
    logged = {key: float(value) for step, key, value in rows if key.startswith("ablation/") and step == "4"}
    want = {f"ablation/{m}/{mode}/importance": e["importance"]["value"]
            for m, modes in result["results"].items() for mode, e in modes.items()
            if math.isfinite(e["importance"]["value"])}  # NaN (nothing to score) is not logged
    assert want and all(logged[k] == v for k, v in want.items())
