"""Training end to end on real sample data: metrics, checkpoints, exact resume, NaN stop, layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.models.model import ModelConfig
from mmtool.train import TrainConfig, lr_at, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessConfig("digits", root / "digits", max_samples=96))
    preprocess(PreprocessConfig("cartpole", root / "cartpole", options=["episodes=6", "max_steps=40"]))
    preprocess(PreprocessConfig("pydocs", root / "pydocs", options=["modules=json"], max_samples=40))
    return root


def config(folders, out, **kw):
    base = dict(data=[str(folders / "digits"), str(folders / "cartpole"), str(folders / "pydocs")],
                out=out, batch_tokens=1024, max_steps=6, save_every=3, warmup=2, lr=3e-3,
                num_workers=0, model=ModelConfig(size="tiny"))
    base.update(kw)
    return TrainConfig(**base)


def lines(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 5) == pytest.approx(0.5) and lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55) and lr_at(cfg, 110) == pytest.approx(0.1)


def test_train_writes_config_metrics_checkpoints(folders, tmp_path):
    run = tmp_path / "run"
    summary = train(config(folders, run, keep_last=1))
    assert summary["steps"] == 6
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["size"] == "tiny" and saved["max_steps"] == 6
    log = lines(run)
    assert [x["step"] for x in log] == [1, 2, 3, 4, 5, 6]
    first = log[0]
    assert set(first["losses"]) <= {"next-token", "masked-patch"} and "next-token" in first["losses"]
    assert first["loss"] == pytest.approx(sum(first["losses"].values()), rel=1e-5)
    # An objective with no targets in a step is left out of its line, never logged as a 0.
    assert all(v > 0 for x in log for v in x["losses"].values())
    assert set(first["by_source"]) <= {"digits", "cartpole", "pydocs"} and first["tokens"] > 0
    assert 0 <= first["data_wait"] < 1 and first["lr"] == pytest.approx(1.5e-3)
    assert all(x["data_wait_mean"] == x["data_wait"] for x in log)  # one process: max = mean
    assert [x["epoch"] for x in log] == sorted(x["epoch"] for x in log)
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000006"]


def test_interrupted_run_resumes_bitwise(folders, tmp_path):
    straight = tmp_path / "straight"
    train(config(folders, straight))
    broken = tmp_path / "broken"
    with pytest.raises(MMToolError, match="at step 5"):
        train(config(folders, broken, fault_nan_step=5))  # dies after the step-3 checkpoint
    assert [x["step"] for x in lines(broken)] == [1, 2, 3, 4]
    train(config(folders, broken), resume=True)
    a, b = lines(straight), lines(broken)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["losses"] == y["losses"], x["step"]  # bitwise on CPU


def test_nan_stop_names_step_and_keeps_checkpoints(folders, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(MMToolError) as err:
        train(config(folders, run, fault_nan_step=4))
    msg = str(err.value)
    assert "at step 4" in msg and "step-00000003" in msg and "batch from" in msg
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]


def test_resume_refuses_other_model_and_corrupt_checkpoint(folders, tmp_path):
    run = tmp_path / "run"
    train(config(folders, run, max_steps=3))
    with pytest.raises(MMToolError, match=r"model.fusion=.early. then, .late. now"):
        train(config(folders, run, max_steps=6, model=ModelConfig(size="tiny", fusion="late")), resume=True)
    with pytest.raises(MMToolError, match="already holds a run"):
        train(config(folders, run, max_steps=6))
    ckpt = run / "checkpoints" / "step-00000003" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(MMToolError, match="corrupt"):
        train(config(folders, run, max_steps=6), resume=True)


def test_packed_and_padded_give_the_same_first_loss(folders, tmp_path):
    losses = {}
    for strategy in ("packed", "padded"):
        train(config(folders, tmp_path / strategy, strategy=strategy, batch_samples=8, batch_tokens=None,
                     max_steps=1))
        losses[strategy] = lines(tmp_path / strategy)[0]["loss"]
    assert losses["packed"] == pytest.approx(losses["padded"], abs=1e-5)


def test_torchrun_two_processes(folders, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmtool", "train", "--data", str(folders / "digits"), "--data",
           str(folders / "cartpole"), "--out", str(run), "--model", "tiny", "--max-steps", "3",
           "--batch-tokens", "1024", "--num-workers", "0", "--save-every", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = lines(run)
    assert [x["step"] for x in log] == [1, 2, 3]
    state = json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert [s["rank"] for s in state["loader"]] == [0, 1]
    # both ranks drew batches, and never the same ones
    assert all(s["batch"] > 0 or s["epoch"] > 0 for s in state["loader"])


def test_shard_size_does_not_change_the_run(folders, tmp_path):
    """Mask draws are keyed by what a token is (sample number, place), not where it is stored: the
    same data written in 1 KB shards trains to the same losses (float summation order aside)."""
    small = tmp_path / "digits-1kb"
    preprocess(PreprocessConfig("digits", small, max_samples=96, shard_size="1KB"))
    assert len(json.loads((small / "manifest.json").read_text())["shards"]) > 3
    runs = {}
    for name, data in (("one", folders / "digits"), ("many", small)):
        train(config(folders, tmp_path / name, data=[str(data)], max_steps=3, save_every=3))
        runs[name] = [x["losses"] for x in lines(tmp_path / name)]
    for a, b in zip(runs["one"], runs["many"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5)


def test_default_objectives_are_cut_to_what_the_data_feeds_and_said(folders, tmp_path, cli):
    """Text-only data: the default masked-patch cannot train, so `train` trains next-token and
    says so; an explicit --model.objectives the data cannot feed stays an error."""
    proc = cli("train", "--data", folders / "pydocs", "--out", tmp_path / "run", "--model", "tiny",
               "--max-steps", "1", "--batch-tokens", "1024", "--num-workers", "0")
    assert "cannot feed the default objective(s) masked-patch" in proc.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["objectives"] == {"next-token": 1.0}  # what was trained, recorded
    assert set(lines(tmp_path / "run")[0]["losses"]) == {"next-token"}
    proc = cli("train", "--data", folders / "pydocs", "--out", tmp_path / "explicit", "--model", "tiny",
               "--max-steps", "1", "--model.objectives", "masked-patch=1", check=False)
    assert proc.returncode == 2 and "objective 'masked-patch' needs a patch" in proc.stderr


def test_bf16_precision_on_cpu_is_autocast_near_fp32(folders, tmp_path):
    """`--precision bf16` really runs the matrix products in bfloat16 on CPU (the losses differ from
    fp32's, which they would not if autocast were off) and stays close to fp32; the weights and the
    optimizer state stay float32, so resume is exact as ever."""
    got = {}
    for precision in ("fp32", "bf16"):
        train(config(folders, tmp_path / precision, max_steps=2, save_every=2, precision=precision))
        got[precision] = [x["loss"] for x in lines(tmp_path / precision)]
    assert got["bf16"] != got["fp32"]
    assert got["bf16"] == pytest.approx(got["fp32"], rel=2e-2)
    from safetensors.torch import load_file
    weights = load_file(str(next((tmp_path / "bf16" / "checkpoints").glob("step-*")) / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    with pytest.raises(MMToolError, match="--precision 'fp16': expected one of auto, fp32, bf16"):
        train(config(folders, tmp_path / "bad", precision="fp16"))
