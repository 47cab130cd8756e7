"""`mmtool eval-transfer` end to end as a real subprocess: table, files, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.models.model import ModelConfig
from mmtool.train import TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-transfer")
    preprocess(PreprocessConfig("digits", root / "digits"))  # all 1,797: ~360 held-out rows
    out = root / "run"
    train(TrainConfig(data=[str(root / "digits")], out=out, batch_tokens=512, max_steps=4,
                      save_every=4, warmup=1, num_workers=0, model=ModelConfig(size="tiny")))
    return out


def test_eval_transfer_prints_the_table_and_writes_report_and_plot(cli, run, tmp_path):
    proc = cli("eval-transfer", run, "--task", "digits", "--protocol", "linear-probe,kshot",
                   "--k", "1,2", "--episodes", "5", "--fractions", "0.5,1", "--out", tmp_path)
    out = proc.stdout
    for text in ("digits", "image", "linear-probe", "kshot k=2", "gain", "verdict", "cc ratio", "chance"):
        assert text in out, text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tasks"]["digits"]["split"]["sizes"]["test"] == 72
    rows = [r for res in report["tasks"]["digits"]["results"].values() for r in res["rows"]]
    for row in rows:  # the table's intervals come from these
        lo, hi = row["gain_ci95"]
        assert f"{row['gain']:+.3f} [{lo:+.2f}, {hi:+.2f}]" in out and row["verdict"] in out
    # `mmtool train` read the train split only: the task's rows are the held-out ones, and it says so.
    assert "pretraining saw the test inputs? no: held-out rows" in " ".join(out.split())
    assert "not held out" not in out
    assert (tmp_path / "transfer-digits.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--task", "spoken-digits", "--protocol", "linear-probe"], "stream the checkpoint never saw"),
    (["--task", "digits", "--protocol", "kshot", "--k", "1,100"], "smallest class has only"),
    (["--task", "digits", "--protocol", "probe"], "unknown protocol 'probe'"),
    (["--task", "digits", "--k", "a"], "--protocol.ks 'a': expected comma-separated ints"),
])
def test_bad_input_is_one_line_exit_2(cli, run, tmp_path, args, message):
    proc = cli("eval-transfer", run, *args, "--out", tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_a_clear_error(cli, run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    ckpt = sorted((broken / "checkpoints").iterdir())[-1]
    (ckpt / "model.safetensors").write_bytes(b"not a tensor file")
    proc = cli("eval-transfer", broken, "--protocol", "linear-probe", check=False)
    assert proc.returncode == 2 and "model.safetensors is missing or corrupt" in proc.stderr
