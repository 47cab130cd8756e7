"""A run moved to another folder with its data deleted: eval-transfer, ablate --data, embed
checkpoint:RUN, report and export all work as real subprocesses; the export loads in a fresh
Python process and gives the checkpoint's outputs exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.train.export import load_pretrained
from mmtool.models.model import ModelConfig
from mmtool.train.rundir import load_model
from mmtool.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the documented path, then one batch of the data folder.
OUTPUTS = """
import sys, numpy as np, torch
import mmtool
from safetensors.torch import save_file
from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex
model, tokenizers = mmtool.load_pretrained(sys.argv[1])
batch = assemble(TokenIndex([sys.argv[2]]), np.arange(12), "packed")
with torch.no_grad():
    out = model(batch, generator=torch.Generator().manual_seed(7))
    pooled = model.pooled(batch)
save_file({"pooled": pooled, "loss": out.loss.reshape(1)}, sys.argv[3])
print(",".join(sorted(tokenizers)))
"""


@pytest.fixture(scope="module")
def moved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moved-run")
    preprocess(PreprocessConfig("digits", root / "data" / "digits"))  # all rows: held-out ones for transfer
    train(TrainConfig(data=[str(root / "data" / "digits")], out=root / "run", batch_tokens=512, max_steps=4,
                      save_every=4, warmup=1, num_workers=0, model=ModelConfig(size="tiny")))
    shutil.move(root / "run", root / "machine-b" / "run")
    shutil.rmtree(root / "data")
    fresh = root / "machine-b" / "digits"
    preprocess(PreprocessConfig("digits", fresh, max_samples=120))  # ablate's and embed's --data
    return {"run": root / "machine-b" / "run", "fresh": fresh, "root": root}


def _outputs(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(7))
        return {"pooled": model.pooled(batch), "loss": out.loss.reshape(1)}


@pytest.mark.slow
def test_a_moved_run_without_its_data_runs_every_stage(moved, cli, tmp_path):
    run, fresh = moved["run"], moved["fresh"]
    proc = cli("eval-transfer", run, "--task", "digits", "--protocol", "linear-probe", "--fractions", "1")
    report = json.loads((run / "transfer" / "report.json").read_text())
    digits = report["tasks"]["digits"]
    # the run's folder is gone: the task re-made the same records and still evaluates held-out rows
    assert digits["pretraining_saw"].startswith("no: held-out rows") and digits["split"]["sizes"]["test"] == 72
    assert "held-out rows" in " ".join(proc.stdout.split())

    cli("ablate", run, "--data", fresh, "--batches", "2", "--batch-samples", "8", "--json", tmp_path / "abl.json",
        "--plot", tmp_path / "abl.png")
    ablation = json.loads((tmp_path / "abl.json").read_text())
    assert set(ablation["results"]) == {"image", "text"} and ablation["samples"] == 16
    gone = cli("ablate", run, "--batches", "2", check=False)
    assert gone.returncode == 2 and "give --data DIR" in gone.stderr and "is gone" in gone.stderr

    cli("embed", fresh, "--encoder", f"checkpoint:{run}", "--out", tmp_path / "emb")
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["rows"] == 120 and "embedding" in manifest["modalities"]

    cli("report", run, "--out", tmp_path / "report")
    assert json.loads((tmp_path / "report" / "report.json").read_text())

    out = tmp_path / "export"
    said = cli("export", run, "--out", out).stdout
    assert "step 4" in said and "mmtool.load_pretrained" in said
    assert sorted(p.name for p in out.iterdir()) == [".mmtool.json", ".mmtool.lock",  # owner, writer
                                                     "README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    for text in ("library_name: mmtool", "| digits | digits | image, text |", "`next-token` × 1",
                 "fusion `early`", "checkpoint step 4 of 4", "## Transfer", "| digits | linear-probe |",
                 "mmtool.load_pretrained"):
        assert text in card, text
    row = digits["results"]["linear-probe"]["rows"][0]
    assert f"{row['pretrained']:.3f} | {row['scratch']:.3f} | {row['gain']:+.3f}" in card


def test_export_loads_in_a_fresh_process_with_identical_outputs(moved, cli, tmp_path):
    run, fresh = moved["run"], moved["fresh"]
    cli("export", run, "--out", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "mmtool" and config["model"]["folder_objectives"] == []
    assert [s["key"] for s in config["streams"]] == ["image:patches", "text:wordpiece", "separator"]
    proc = subprocess.run([sys.executable, "-c", OUTPUTS, str(tmp_path / "export"), str(fresh),
                           str(tmp_path / "out.safetensors")], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "image:patches,text:wordpiece"
    theirs = load_file(str(tmp_path / "out.safetensors"))
    model, _, _ = load_model(run)
    mine = _outputs(model, assemble(TokenIndex([fresh]), np.arange(12), "packed"))
    assert theirs["pooled"].shape == (12, 64)
    assert torch.equal(theirs["pooled"], mine["pooled"]) and torch.equal(theirs["loss"], mine["loss"])
    assert torch.isfinite(mine["loss"]).all()


def test_pretrained_batch_tokenizes_raw_samples(moved, tmp_path):
    from sklearn.datasets import load_digits

    from mmtool.train.export import export

    export(moved["run"], tmp_path / "export")
    pre = load_pretrained(tmp_path / "export")
    images = load_digits().images[:3] / 16.0  # [3, 8, 8] on [0, 1]
    batch = pre.batch([{"image": images[0], "text/caption": "a handwritten zero"}, {"image": images[1]},
                       {"image": images[2]}])
    with torch.no_grad():
        pooled = pre.model.pooled(batch)  # [3, d]
        alone = pre.model.pooled(pre.batch([{"image": images[1]}]))  # [1, d]
    assert pooled.shape == (3, 64) and torch.allclose(pooled[1], alone[0], atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])
    with pytest.raises(MMToolError, match="no audio input"):
        pre.batch([{"audio": np.zeros(100)}])


@pytest.mark.parametrize("args, message", [
    (["nowhere", "--out", "x"], "nowhere: no such folder"),
    (["RUN", "--out", "x", "--step", "3"], "--step 3: "),
    (["RUN", "--out", "RUN"], "is not an mmtool export"),
])
def test_export_bad_input_is_one_line_exit_2(moved, cli, tmp_path, args, message):
    args = [str(moved["run"]) if a == "RUN" else a for a in args]
    proc = cli("export", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_load_pretrained_refuses_a_run_folder(moved):
    with pytest.raises(MMToolError, match="not an mmtool export"):
        load_pretrained(moved["run"])
