"""`mmtool sweep`: grid × seeds of real tiny runs, resumable points, the report's numbers.

The fast tests train a tiny model for a few steps per point (the default suite); the slow ones run
every shipped experiment in configs/experiments/ at its default size.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmtool.errors import MMToolError
from mmtool.experiments.sweep import load_spec, points, run_sweep
from mmtool.experiments.sweep_evals import EVALUATIONS

REPO = Path(__file__).resolve().parents[2]
TINY = {"model": {"size": "tiny", "objectives": {"contrastive": 1, "next-token": 1}},
        "batch_samples": 16, "batch_tokens": None, "max_steps": 3, "warmup": 1, "num_workers": 0,
        "save_every": 3}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A 2 × 2 grid (fusion × batch size) × 2 seeds on built-in digits (weight 2) + spoken-digits,
    each run evaluated by k-shot transfer."""
    work = tmp_path_factory.mktemp("sweep")
    cfg = _write(work / "grid.yaml", {
        "train": {**TINY, "data": ["builtin:digits=2", "builtin:spoken-digits"]},
        "sweep": {"name": "grid", "grid": {"model.fusion": ["early", "late"], "batch_samples": [8, 16]},
                  "seeds": [0, 1], "baseline": {"model.fusion": "late", "batch_samples": 16}},
        "evaluate": [{"eval-transfer": {"task": "digits", "protocols": ["kshot"], "ks": [1],
                                        "episodes": 3, "bootstrap": 50}}]})
    spec = load_spec(cfg)
    said = []
    result = run_sweep(spec, work / "out", say=said.append)
    return spec, work / "out", result, said


def test_grid_runs_every_point_and_reports_intervals(grid_sweep):
    spec, out, result, _ = grid_sweep
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert len(names) == 8 and "fusion-early_batch_samples-8-s0" in names and "fusion-late_batch_samples-16-s1" in names
    assert sorted(result["ran"]) == names and not result["missing"]
    cfg = json.loads((out / "runs" / names[0] / "config.json").read_text())
    assert cfg["data"][0] == f"{(out / 'data' / 'digits').resolve()}=2"  # builtin:digits=2, the weight kept
    assert cfg["max_steps"] == 3 and cfg["seed"] == 0
    report = json.loads((out / "sweep.json").read_text())
    assert [p["label"] for p in report["points"]] == [
        "fusion-early_batch_samples-8", "fusion-early_batch_samples-16",
        "fusion-late_batch_samples-8", "fusion-late_batch_samples-16"]
    assert report["baseline"] == "fusion-late_batch_samples-16"
    for p in report["points"]:
        for m in ("loss", "loss/digits", "tokens_per_s", "eval-transfer/digits/kshot k=1/gain"):
            e = p["metrics"][m]
            assert e["n"] == 2 and e["ci95"][0] <= e["mean"] <= e["ci95"][1], (p["label"], m)
    assert (out / "sweep.md").read_text().count("[") > 20
    assert {"loss.png", "training.png", "eval-transfer.png"} <= {p.name for p in (out / "plots").iterdir()}


def test_report_numbers_are_the_runs_numbers(grid_sweep):
    """Point means and paired differences recomputed from the run folders' own result files."""
    _, out, _, _ = grid_sweep
    report = json.loads((out / "sweep.json").read_text())

    def run_value(run, metric):
        return json.loads((out / "runs" / run / "sweep-result.json").read_text())["metrics"][metric]["value"]

    for metric in ("loss", "eval-transfer/digits/kshot k=1/pretrained"):
        a = [run_value(f"fusion-early_batch_samples-8-s{s}", metric) for s in (0, 1)]
        b = [run_value(f"fusion-late_batch_samples-16-s{s}", metric) for s in (0, 1)]
        point = next(p for p in report["points"] if p["label"] == "fusion-early_batch_samples-8")
        assert point["metrics"][metric]["mean"] == pytest.approx(np.mean(a))
        diff = next(d for d in report["differences"] if d["label"] == "fusion-early_batch_samples-8")
        e = diff["metrics"][metric]
        assert e["difference"] == pytest.approx(np.mean(a) - np.mean(b)) and e["seeds"] == [0, 1]
        assert e["t_ci95"][0] <= e["difference"] <= e["t_ci95"][1]
    # the transfer row's own interval is kept per run
    res = json.loads((out / "runs" / "fusion-late_batch_samples-16-s0" / "sweep-result.json").read_text())
    row = res["metrics"]["eval-transfer/digits/kshot k=1/gain"]
    assert len(row["ci95"]) == 2 and row["ci95"][0] <= row["value"] <= row["ci95"][1]


def test_rerun_skips_finished_points(grid_sweep):
    spec, out, _, _ = grid_sweep
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.jsonl")}
    said = []
    result = run_sweep(spec, out, say=said.append)
    assert len(result["skipped"]) == 8 and not result["ran"]
    assert all("done already, skipped" in m for m in said)
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.jsonl")}


def test_one_point_per_process_and_report_only(grid_sweep, tmp_path):
    """--point I runs only that point (no report until all are done); --report-only reports what is done."""
    _, out, _, _ = grid_sweep
    data = str((out / "data" / "digits").resolve())
    spec = load_spec(None, grid=["model.fusion=early,late"], seeds=[0, 1],
                     sets=[f"data={data}", "model.size=tiny", "batch_samples=8", "batch_tokens=none",
                           "max_steps=2", "num_workers=0", "model.objectives=contrastive"])
    assert [p.run_name for p in points(spec)] == ["fusion-early-s0", "fusion-early-s1", "fusion-late-s0", "fusion-late-s1"]
    result = run_sweep(spec, tmp_path, point=2)
    assert result["ran"] == ["fusion-late-s0"] and len(result["missing"]) == 3 and result["report"] is None
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fusion-late-s0"]
    report = run_sweep(spec, tmp_path, report_only=True)["report"]
    (late,) = [p for p in report["points"] if p["metrics"]]
    assert late["label"] == "fusion-late" and late["metrics"]["loss"]["note"] == "n=1, no interval"
    assert "Not finished** (3)" in (tmp_path / "sweep.md").read_text()
    with pytest.raises(MMToolError, match=r"--point 4: this sweep has points 0..3"):
        run_sweep(spec, tmp_path, point=4)
    spec2 = load_spec(None, grid=["model.fusion=early,late"], seeds=[0, 1],
                      sets=[f"data={data}", "model.size=tiny", "batch_samples=8", "batch_tokens=none",
                            "max_steps=4", "num_workers=0", "model.objectives=contrastive"])
    with pytest.raises(MMToolError, match="holds a run of other settings.*max_steps"):
        run_sweep(spec2, tmp_path, point=2)


def test_bad_input_names_the_key(tmp_path):
    base = {"train": {**TINY, "data": ["builtin:digits"]}}
    with pytest.raises(MMToolError, match=r"unknown setting 'model.fuson' \(settings: model.size, .*model.fusion"):
        load_spec(_write(tmp_path / "a.yaml", {**base, "sweep": {"grid": {"model.fuson": ["early"]}}}))
    with pytest.raises(MMToolError, match="unknown setting 'fusion'.*sweep settings: text_encoder"):
        load_spec(_write(tmp_path / "b.yaml", base), grid=["fusion=early,late"])
    with pytest.raises(MMToolError, match="unknown sweep-evaluation 'transfer'"):
        load_spec(_write(tmp_path / "c.yaml", {**base, "evaluate": [{"transfer": {}}]}))
    with pytest.raises(MMToolError, match=r"evaluate\[0\] ablate: unknown setting 'batchs' \(settings: .*batches"):
        load_spec(_write(tmp_path / "d.yaml", {**base, "evaluate": [{"ablate": {"batchs": 2}}]}))
    with pytest.raises(MMToolError, match="labels model.fusion: give a list with one label per value"):
        load_spec(_write(tmp_path / "e.yaml", {**base, "sweep": {"grid": {"model.fusion": ["early", "late"]},
                                                                "labels": {"model.fusion": ["e"]}}}))
    with pytest.raises(MMToolError, match="'seed' is set by the sweep"):
        load_spec(_write(tmp_path / "f.yaml", {**base, "sweep": {"grid": {"seed": [1, 2]}}}))
    with pytest.raises(MMToolError, match="baseline .*no grid point"):
        load_spec(_write(tmp_path / "g.yaml", {**base, "sweep": {"grid": {"model.fusion": ["early"]},
                                                                "baseline": {"model.fusion": "mid"}}}))
    assert {"eval-transfer", "ablate"} <= set(EVALUATIONS.names())


def test_list_values_labels_and_scale(tmp_path):
    """A grid value may be a whole data list (labelled), a mapping sets several keys; --scale steps."""
    doc = {"train": {**TINY, "data": ["builtin:digits"], "max_steps": 10, "warmup": 2, "save_every": 5},
           "sweep": {"grid": {"data": [["builtin:digits"], ["builtin:digits=1", "builtin:spoken-digits=0.25"]],
                              "model": [{"fusion": "mid", "fusion_layer": 1}, {"fusion": "late"}]},
                     "labels": {"data": ["digits", "with-speech"], "model": ["mid1", "late"]}}}
    spec = load_spec(_write(tmp_path / "l.yaml", doc), scale=2.5)
    labels = [p.label for p in points(spec)]
    assert labels == ["data-digits_model-mid1", "data-digits_model-late",
                      "data-with-speech_model-mid1", "data-with-speech_model-late"]
    from mmtool.experiments.sweep import train_config

    cfg = train_config(spec, points(spec)[2], tmp_path)
    assert cfg.data == ["builtin:digits=1", "builtin:spoken-digits=0.25"]
    assert (cfg.model.fusion, cfg.model.fusion_layer) == ("mid", 1)
    assert (cfg.max_steps, cfg.warmup, cfg.save_every) == (25, 5, 12)


@pytest.mark.slow
def test_text_encoder_axis_and_ablate_evaluation(grid_sweep, tmp_path):
    """`text_encoder: frozen:minilm-l6` embeds the captions once (the library call behind
    `mmtool train --text-encoder`); the frozen run's loss is reported under its source's name, so it
    pairs with the learned run; the ablate evaluation's importance comes with its interval."""
    _, out, _, _ = grid_sweep
    data = str((out / "data" / "digits").resolve())
    cfg = _write(tmp_path / "fvl.yaml", {
        "train": {**TINY, "data": [data], "max_steps": 2, "save_every": 2,
                  "model": {"size": "tiny", "fusion": "late", "objectives": {"masked-patch": 1, "contrastive": 1}}},
        "sweep": {"grid": {"text_encoder": ["learned", "frozen:minilm-l6"]}, "seeds": [0, 1],
                  "labels": {"text_encoder": ["learned", "frozen"]}},
        "evaluate": [{"ablate": {"batches": 2, "batch_samples": 16, "bootstrap": 50}}]})
    report = run_sweep(load_spec(cfg), tmp_path / "out")["report"]
    frozen = json.loads((tmp_path / "out" / "runs" / "text_encoder-frozen-s0" / "config.json").read_text())
    assert frozen["data"] == [str((tmp_path / "out" / "embeddings" / "digits-minilm-l6").resolve())]
    assert len(list((tmp_path / "out" / "embeddings").iterdir())) == 1  # embedded once for both seeds
    (diff,) = report["differences"]
    assert diff["label"] == "text_encoder-frozen" and diff["metrics"]["loss/digits"]["n"] == 2
    res = json.loads((tmp_path / "out" / "runs" / "text_encoder-learned-s1" / "sweep-result.json").read_text())
    imp = res["metrics"]["ablate/image/drop/importance"]
    assert imp["status"] and len(imp["ci95"]) == 2
    assert (tmp_path / "out" / "runs" / "text_encoder-learned-s1" / "evals" / "ablate" / "ablation.json").is_file()


@pytest.mark.slow
def test_kill_mid_sweep_then_rerun_finishes_only_the_missing(grid_sweep, tmp_path):
    """A real `python -m mmtool sweep` SIGKILLed after its first run finished, then rerun."""
    _, out, _, _ = grid_sweep
    data = str((out / "data" / "digits").resolve())
    cfg = _write(tmp_path / "kill.yaml", {
        "train": {**TINY, "data": [data], "model": {"size": "tiny", "fusion": "late",
                                                     "objectives": {"contrastive": 1}}, "save_every": 5},
        "sweep": {"grid": {"max_steps": [3, 40]}, "seeds": [0]}})
    sweep_out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "mmtool", "sweep", str(cfg), "--out", str(sweep_out)]
    first, second = sweep_out / "runs" / "max_steps-3-s0", sweep_out / "runs" / "max_steps-40-s0"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not list((second / "checkpoints").glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "sweep-result.json").is_file() and not (second / "sweep-result.json").is_file()
    before = (first / "metrics.jsonl").stat().st_mtime_ns, (first / "sweep-result.json").stat().st_mtime_ns
    done = len((second / "metrics.jsonl").read_text().splitlines())
    assert 5 <= done < 40
    log = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert log.returncode == 0, log.stdout + log.stderr
    assert "[0] max_steps-3-s0: done already, skipped" in log.stdout
    assert "[1] max_steps-40-s0: resuming (40 steps)" in log.stdout
    assert before == ((first / "metrics.jsonl").stat().st_mtime_ns, (first / "sweep-result.json").stat().st_mtime_ns)
    steps = [json.loads(x)["step"] for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # each step once: resumed from its checkpoint, not restarted
    assert (sweep_out / "sweep.json").is_file() and (sweep_out / "sweep.md").is_file()


# -- the shipped experiments (slow) ---------------------------------------------------------------
EXPERIMENT_FILES = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=[p.stem for p in EXPERIMENT_FILES])
def test_shipped_experiment_runs_and_reports_intervals(path, tmp_path):
    out = tmp_path / path.stem
    proc = subprocess.run([sys.executable, "-m", "mmtool", "sweep", str(path), "--out", str(out)],
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "sweep.json").read_text())
    assert len(report["points"]) >= 2 and all(not p["missing"] for p in report["points"])
    for p in report["points"]:
        loss = p["metrics"]["loss"]
        assert loss["n"] >= 2 and loss["ci95"][0] <= loss["mean"] <= loss["ci95"][1]
    assert report["differences"] and all(d["metrics"]["loss"]["t_ci95"] for d in report["differences"])
    assert (out / "sweep.md").is_file() and list((out / "plots").glob("*.png"))
