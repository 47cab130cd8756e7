"""`mmtool report` on real run folders made by `train()`, with an ablation and an eval-transfer report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtool.analysis.ablate import AblateConfig, ablate
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.io import atomic_write_json
from mmtool.models.model import ModelConfig
from mmtool.train import TrainConfig, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for name, informative in (("ka", "image"), ("kt", "text")):  # two sources: one curve each
        preprocess(PreprocessConfig("known-answer", root / name, tokenizers=["text=bytes"],
                                    options=["samples=64", "classes=3", f"informative={informative}"]))
    for fusion in ("early", "late"):
        train(TrainConfig(data=[str(root / "ka"), str(root / "kt")], out=root / "runs" / fusion, batch_samples=8,
                          batch_tokens=None, max_steps=10, warmup=1, num_workers=0, save_every=10,
                          probes=["attention", "grad-norm", "loss"], probe_every=2,
                          model=ModelConfig(size="tiny", fusion=fusion)))
    early = root / "runs" / "early"
    atomic_write_json(early / "ablation.json",
                      ablate(AblateConfig(run=early, batches=2, batch_samples=16, bootstrap=100)))
    # an eval-transfer report as that command writes it (found by file name, never imported)
    (early / "transfer").mkdir()
    atomic_write_json(early / "transfer" / "report.json", {"tasks": {"digits": {"results": {
        "linear-probe": {"rows": [{"setting": "", "pretrained": 0.8, "scratch": 0.5, "ratio": 1.6, "gain": 0.3,
                                   "gain_ci95": [0.1, 0.5], "verdict": "better"}]}}}}})
    return root


def test_report_puts_runs_side_by_side(runs, cli, tmp_path):
    out = tmp_path / "rep"
    proc = cli("report", runs / "runs" / "early", runs / "runs" / "late", "--out", out)
    assert "early" in proc.stdout and "late" in proc.stdout and "wrote" in proc.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "mmtool-report" and [e["name"] for e in rep["entries"]] == ["early", "late"]
    early, late = rep["entries"]
    assert early["config"]["fusion"] == "early" and late["config"]["fusion"] == "late"
    assert early["final"]["step"] == 10 and early["curve"]["step"] == list(range(1, 11))
    assert early["config"]["strategy"] == "packed" and early["config"]["batch_samples"] == 8
    lines = [json.loads(x) for x in (runs / "runs" / "early" / "metrics.jsonl").read_text().splitlines()]
    norms = [x["grad_norm"] for x in lines]
    assert early["final"]["grad_norm"]["mean"] == pytest.approx(np.mean(norms[1:]))  # first 10% skipped
    assert early["final"]["grad_norm"]["cv"] == pytest.approx(float(np.std(norms[1:]) / np.mean(norms[1:])))
    # the final loss: per source, the mean over the last 20% of steps that held it, with an interval
    assert early["final"]["tail_steps"] == [9, 10]
    for src in ("ka", "kt"):
        held = [x["by_source"][src] for x in lines[-2:] if src in x["by_source"]]
        fin = early["final"]["by_source"][src]
        assert fin["steps"] == len(held)
        assert fin["last_step"] == max(x["step"] for x in lines if src in x["by_source"])
        assert fin["mean"] == (pytest.approx(np.mean(held)) if held else None)
        if len(held) == 2:
            assert min(held) <= fin["ci95"][0] <= fin["mean"] <= fin["ci95"][1] <= max(held)
        curve = early["curve"]["by_source"][src]  # one curve per source, only where the source was
        assert curve["step"] == [x["step"] for x in lines if src in x["by_source"]]
        assert curve["loss"] == [x["by_source"][src] for x in lines if src in x["by_source"]]
        assert curve["smooth"][0] == curve["loss"][0]
        assert min(curve["loss"]) <= curve["smooth"][-1] <= max(curve["loss"])
    assert "ka " in proc.stdout and "kt " in proc.stdout  # the per-source final losses are printed
    assert "packed, 8 samples" in proc.stdout
    assert early["probes"]["steps"] == [1, 2, 4, 6, 8, 10]
    assert set(early["probes"]["last"]["attention_to_others"]) >= {"image", "text"}
    assert late["probes"]["last"]["attention_to_others"]["text"] == pytest.approx(0.0, abs=1e-6)  # late: no cross-modal attention
    assert set(early["ablation"]["importance"]) == {"image", "text"} and "ablation" not in late
    abl = json.loads((runs / "runs" / "early" / "ablation.json").read_text())
    for mod, modes in early["ablation"]["importance"].items():  # importance rows carry the twin
        imp, src = modes["drop"], abl["results"][mod]["drop"]["importance"]
        assert imp["baseline"] == "untrained twin" and imp["twin"] == src["twin"] and imp["ci95"] == src["ci95"]
        assert imp["status"] == src["status"]
        assert f"{mod} {imp['value']:+.2f}" in proc.stdout
    assert early["ablation"]["ranking_groups"] == abl["ranking_groups"]
    assert early["transfer"]["ratios"] == {"digits/linear-probe": 1.6}
    assert early["transfer"]["gains"]["digits/linear-probe"]["gain_ci95"] == [0.1, 0.5]
    from mmtool.cli.report import transfer_cell
    assert transfer_cell(early["transfer"]) == "digits/linear-probe +0.30 [+0.10, +0.50] better"
    assert "digits/linear-probe +0.30 [+0.10," in proc.stdout  # the cell, wrapped in the table
    for name in ("loss_curves.png", "importance.png"):
        assert (out / name).stat().st_size > 5000


def test_report_expands_a_folder_of_runs_and_ignores_its_own_reports(runs, cli, tmp_path):
    out = runs / "runs" / "summary"  # a report written inside the folder must not confuse the next
    cli("report", runs / "runs", "--out", out)
    cli("report", runs / "runs", "--out", tmp_path / "again")
    rep = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [e["name"] for e in rep["entries"]] == ["early", "late"]
    bad = cli("report", tmp_path / "missing", check=False)
    assert bad.returncode == 2 and "no such folder" in bad.stderr
