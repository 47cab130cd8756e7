"""`mmtool preprocess` through the real CLI: resume after kill -9, bad input, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"

BAD = SAMPLE_DATA / "jsonl" / "bad_records.jsonl"
GOOD = SAMPLE_DATA / "jsonl" / "records.jsonl"


def test_killed_run_resumes_to_identical_output(tmp_path, cli):
    args = ["preprocess", "cartpole", "--opt", "episodes=300", "--shard-size", "16KB"]
    out = tmp_path / "killed"
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmtool", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".partial").glob("part-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(list((out / ".partial").glob("part-*.json")))
    assert finished_before >= 2 and not (out / "manifest.json").exists()

    resumed = cli(*args, "--out", out).stdout
    assert "resumed" in resumed
    clean = tmp_path / "clean"
    cli(*args, "--out", clean)
    a = json.loads((out / "manifest.json").read_text())
    b = json.loads((clean / "manifest.json").read_text())
    assert a["rows"] == b["rows"] == 300 and a["rejected"] == 0
    assert a["shards"] == b["shards"]  # same rows, bytes and sha256: nothing missing or duplicated
    assert not (out / ".partial").exists()
    assert not list(out.glob(".*.tmp"))


def test_bad_records_are_rejected_counted_and_logged(tmp_path, cli):
    out = tmp_path / "bad"
    result = cli("preprocess", "jsonl", "--opt", f"path={BAD}", "--out", out, "--max-rejected", "100%")
    manifest = json.loads((out / "manifest.json").read_text())
    n_lines = len(BAD.read_bytes().splitlines())
    assert manifest["records"] == n_lines == manifest["rows"] + manifest["rejected"]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == manifest["rejected"] >= 8
    for r in rejected:
        assert r["location"].startswith(str(BAD)) and r["reason"]
    assert f"rejected {manifest['rejected']}" in result.stdout


def test_too_many_rejects_fail_with_one_line(tmp_path, cli):
    proc = cli("preprocess", "jsonl", "--opt", f"path={BAD}", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "more than --max-rejected 0.01" in proc.stderr and "rejected.jsonl" in proc.stderr
    assert (tmp_path / "o" / "rejected.jsonl").is_file()  # nothing lost: the rejects are on disk


def test_on_error_raise_names_the_record(tmp_path, cli):
    proc = cli("preprocess", "jsonl", "--opt", f"path={BAD}", "--out", tmp_path / "o",
               "--on-error", "raise", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{BAD}:1" in proc.stderr


def test_unknown_source_and_option_are_one_line_errors(tmp_path, cli):
    proc = cli("preprocess", "digit", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown source 'digit'" in proc.stderr and "did you mean 'digits'" in proc.stderr
    proc = cli("preprocess", "digits", "--out", tmp_path / "o", "--opt", "size=3", check=False)
    assert proc.returncode == 2 and "no option 'size'" in proc.stderr


def test_good_jsonl_mixes_modalities(tmp_path, cli):
    out = tmp_path / "good"
    cli("preprocess", "jsonl", "--opt", f"path={GOOD}", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"] == 0
    assert {"text", "image", "audio", "observation", "action"} <= set(manifest["modalities"])


def test_ls_lists_every_registry(cli):
    out = cli("ls").stdout
    for name in ("sources", "tokenizers", "digits", "spoken-digits", "pydocs", "wordpiece", "mulaw"):
        assert name in out
    verbose = cli("ls", "sources", "-v").stdout
    assert "--opt episodes=" in verbose and "tokenizers" not in verbose
    proc = cli("ls", "widgets", check=False)
    assert proc.returncode == 2 and "unknown registry 'widgets'" in proc.stderr


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_reruns_cheaply(tmp_path, cli):
    out = tmp_path / "qs"
    args = ("quickstart", "--out", out, "--max-samples", "120", "--num-proc", "1", "--train-steps", "4")
    first = cli(*args).stdout
    for source in ("digits", "spoken-digits", "cartpole", "acrobot", "pendulum", "pydocs"):
        manifest = json.loads((out / "data" / source / "manifest.json").read_text())
        assert manifest["rows"] > 0 and manifest["rejected"] == 0
        assert source in first
    log = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert (out / "profile.json").is_file() and (out / "profile.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "embed" / "digits" / "manifest.json").read_text())["embedding"]["encoder"] == "minilm-l6"
    transfer = json.loads((out / "transfer" / "report.json").read_text())["tasks"]["digits"]
    # Held out from pretraining (the run read the train split only), with intervals on every row.
    assert transfer["modalities"] == ["image"] and transfer["pretraining_saw"].startswith("no: held-out rows")
    assert "kshot k=1" in first and "zeroshot similarity" in first and "linear-probe" in first
    for res in transfer["results"].values():
        assert all(len(row["gain_ci95"]) == 2 for row in res["rows"])
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["model"]["fusion"] == "late" and "contrastive" in config["model"]["objectives"]
    assert config["splits"] == ["train"] and config["mix_by"] == "tokens"
    ablation = json.loads((out / "run" / "ablation.json").read_text())
    assert ablation["settings"]["modes"] == ["drop"] and {"image", "text"} <= set(ablation["results"])
    assert ablation["batches"] == 8 and (out / "run" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    entries = json.loads((out / "report" / "report.json").read_text())["entries"]
    assert [e["kind"] for e in entries] == ["run", "eval"] and "ablation" in entries[0]
    again = cli(*args).stdout
    assert again.count("up to date") >= 6
    assert f"final loss {log[-1]['loss']:.4f}" in again  # the finished run is reported, not redone
