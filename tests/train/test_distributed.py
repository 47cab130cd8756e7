"""Training across processes with real `torchrun` (gloo on CPU): two simulated nodes equal one process
with the same global batch; one gradient all-reduce per optimizer step; metrics summed over ranks;
`--shard-model` (FSDP2) equal to DDP and resumable.

Which runs are exactly comparable: the loader plans one global list of batches and rank r takes
batches r, r+W, r+2W, ...; so step s of W ranks × A micro-batches covers global batches
(s−1)·A·W ... s·A·W−1, which is step s of ONE process with `--grad-accum A·W`. Masks are keyed by
the micro-batch's place in that global batch (rank r's micro m is m·W + r), and the gradient is the
mean over all A·W micro-batches either way (DDP averages the ranks' means). Only the float order of
the gradient sum differs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtool.data.loader import Loader
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.train.rundir import load_model, model_state, read_config

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessConfig("digits", root / "digits", max_samples=96))
    preprocess(PreprocessConfig("cartpole", root / "cartpole", options=["episodes=6", "max_steps=40"]))
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data / "digits"), "--data", str(data / "cartpole"), "--out", str(out),
            "--model", "tiny", "--max-steps", str(STEPS), "--batch-tokens", "512", "--num-workers", "0",
            "--warmup", "1", "--lr", "3e-3", "--save-every", "2", "--keep-last", "5", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]


def torchrun(*args: str, nproc: int = 2, script: list[str] | None = None) -> subprocess.Popen:
    """A `torchrun --standalone` job on this machine running `mmtool ARGS` (or `script` + ARGS)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *(script or ["-m", "mmtool"]), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


FIGURES = ("loss", "losses", "by_stream", "by_source", "by_task", "tokens", "token_share", "loss_share")


def assert_same_figures(a: list[dict], b: list[dict], rel: float) -> None:
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in FIGURES:
            assert x[key] == pytest.approx(y[key], rel=rel), (x["step"], key)


def assert_same_weights(run_a: Path, run_b: Path, atol: float) -> None:
    a = model_state(run_a / "checkpoints" / f"step-{STEPS:08d}")
    b = model_state(run_b / "checkpoints" / f"step-{STEPS:08d}")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_two_nodes_equal_one_process_with_the_same_global_batch(data, tmp_path):
    """2 nodes × 1 process (c10d rendezvous on 127.0.0.1, as on two machines) with --grad-accum 1
    against 1 process with --grad-accum 2: same losses, per-stream/source/task figures, tokens and
    final weights."""
    port, nodes = free_port(), tmp_path / "nodes"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", "mmtool-test", "-m", "mmtool", *train_args(data, nodes)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, "-m", "mmtool", *train_args(data, one, "--grad-accum", "2")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    finish(procs)
    state = json.loads((nodes / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    assert [s["rank"] for s in state["loader"]] == [0, 1] and state["config"]["grad_accum"] == 1
    assert_same_figures(lines(nodes), lines(one), rel=1e-4)
    assert_same_weights(nodes, one, atol=1e-5)


def rank_tokens(run: Path, rank: int, world: int, micro: int) -> list[tuple[int, dict[int, int], int]]:
    """Real tokens of each step on `rank`, read from a fresh loader of the run's own config:
    [(tokens, {folder: tokens}, the loader's epoch after the step)] per step."""
    with Loader(read_config(run).loader_config(rank, world, pin=False)) as loader:
        batches = loader.forever()
        steps = []
        for _ in range(STEPS):
            total, per = 0, {}
            for _ in range(micro):
                b = next(batches)
                seq, fold = b["seqlens"].tolist(), b["sample_folder"].tolist()
                total += sum(seq)
                for f, n in zip(fold, seq):
                    per[f] = per.get(f, 0) + n
            steps.append((total, per, loader.epoch))
    return steps


PROBES = ("--probes", "attention,grad-norm,loss", "--probe-every", "1")


@pytest.fixture(scope="module")
def accumulated(data, tmp_path_factory):
    """2 ranks × --grad-accum 3, every probe on every step, every DDP all-reduce counted by a comm
    hook: (run folder, counts file prefix)."""
    root = tmp_path_factory.mktemp("accumulated")
    run, counts = root / "run", root / "calls.json"
    finish([torchrun(str(counts), *train_args(data, run, "--grad-accum", "3", *PROBES),
                     script=[str(REPO / "tests" / "train" / "ddp_sync_count.py")])])
    return run, counts


def test_accumulation_all_reduces_once_per_step_and_metrics_sum_the_ranks(accumulated):
    """Each optimizer step all-reduces each gradient bucket once (not 3 times); the logged token
    counts are the sum of the two ranks' own counts (not rank 0's); `data_wait` is the slower rank's
    share and `data_wait_mean` the ranks' mean (so the other rank's, 2·mean − max, lies in
    [0, max]), `epoch` the ranks' smallest."""
    run, counts = accumulated
    for rank in (0, 1):
        buckets = json.loads(Path(f"{counts}.{rank}").read_text())["buckets"]
        assert buckets.count(0) == STEPS, buckets  # one synchronising backward per step, not 3
        assert len(buckets) == STEPS * len(set(buckets)), buckets  # every bucket once per step
    log = lines(run)
    per_rank = [rank_tokens(run, r, 2, 3) for r in (0, 1)]
    names = ["digits", "cartpole"]
    for x, r0, r1 in zip(log, *per_rank):
        assert x["tokens"] == r0[0] + r1[0] and x["tokens"] != r0[0]
        both = {names[f]: r0[1].get(f, 0) + r1[1].get(f, 0) for f in range(2)}
        assert x["token_share"] == pytest.approx({k: v / x["tokens"] for k, v in both.items() if v})
        assert x["epoch"] == min(r0[2], r1[2])
        # two ranks' loader waits (perf_counter differences) are never bitwise equal
        assert 0 < x["data_wait_mean"] < x["data_wait"] < 1, x
        assert 0 <= 2 * x["data_wait_mean"] - x["data_wait"] <= x["data_wait"]
        assert x["tokens_per_s"] == pytest.approx(x["tokens"] / x["seconds"], rel=1e-9)  # all ranks' tokens


def test_probe_figures_of_two_ranks_equal_one_process(accumulated, data, tmp_path):
    """The --probes figures of 2 ranks × --grad-accum 3 are those of one process with --grad-accum 6
    (the same global batch): attention shares and query counts over both ranks' queries, gradient
    norms at the encoder outputs of the step's (all-rank mean) loss, losses per modality and source
    over every micro-batch; the metrics too."""
    run, _ = accumulated
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, "-m", "mmtool", *train_args(data, one, "--grad-accum", "6", *PROBES)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two, ref = lines(run), lines(one)
    assert_same_figures(two, ref, rel=1e-4)
    for x, y in zip(two, ref):
        a, b = x["probes"], y["probes"]
        assert a["attention"]["queries"] == b["attention"]["queries"]
        assert len(a["attention"]["layers"]) == len(b["attention"]["layers"]) > 0
        for la, lb in zip(a["attention"]["layers"], b["attention"]["layers"]):
            assert la.keys() == lb.keys()
            for frm in la:
                assert la[frm] == pytest.approx(lb[frm], rel=1e-4, abs=1e-6), (x["step"], frm)
        for key in ("params", "tokens", "per_token"):
            assert a["grad-norm"][key] == pytest.approx(b["grad-norm"][key], rel=1e-4), (x["step"], key)
        assert a["loss"]["by_source"] == pytest.approx(b["loss"]["by_source"], rel=1e-4)
        assert a["loss"]["by_modality"].keys() == b["loss"]["by_modality"].keys()
        for name, per in a["loss"]["by_modality"].items():
            assert per == pytest.approx(b["loss"]["by_modality"][name], rel=1e-4), (x["step"], name)
    assert sum(ref[0]["probes"]["attention"]["queries"].values()) > 0


def test_shard_model_is_refused_in_one_process(data, tmp_path, cli):
    proc = cli(*train_args(data, tmp_path / "run", "--shard-model"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--shard-model: it shards the model across the ranks of a torchrun job" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli(*train_args(data, tmp_path / "probed", "--shard-model", "--probes", "grad-norm"), check=False)
    assert proc.returncode == 2 and "--probes with --shard-model" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_shard_model_equals_ddp_and_resumes(data, tmp_path):
    """FSDP2 on 2 CPU ranks (gloo), 2 micro-batches a step, trains what DDP trains (same losses and
    weights to float tolerance), writes unsharded checkpoints that `load_model` reads in one
    process, and a run resumed from its step-2 checkpoint, sharded or with DDP, logs the same step 3."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    finish([torchrun(*train_args(data, fsdp, "--shard-model", "--grad-accum", "2"))])
    finish([torchrun(*train_args(data, ddp, "--grad-accum", "2"))])
    assert_same_figures(lines(fsdp), lines(ddp), rel=1e-4)
    assert_same_weights(fsdp, ddp, atol=1e-5)
    model, cfg, _ = load_model(fsdp)  # the unsharded format: no torchrun needed to use it
    assert cfg.shard_model and model.num_parameters() > 0
    uninterrupted = lines(fsdp)
    shutil.rmtree(fsdp / "checkpoints" / f"step-{STEPS:08d}")
    finish([torchrun(*train_args(data, fsdp, "--shard-model", "--grad-accum", "2"), "--resume")])
    resumed = lines(fsdp)
    assert len(resumed) == STEPS
    assert resumed[-1]["losses"] == pytest.approx(uninterrupted[-1]["losses"], rel=1e-6)
    assert resumed[-1]["grad_norm"] == pytest.approx(uninterrupted[-1]["grad_norm"], rel=1e-6)
    assert_same_weights(fsdp, ddp, atol=1e-5)
    shutil.rmtree(fsdp / "checkpoints" / f"step-{STEPS:08d}")  # the same checkpoint resumes unsharded
    finish([torchrun(*train_args(data, fsdp, "--grad-accum", "2"), "--resume")])
    assert lines(fsdp)[-1]["losses"] == pytest.approx(uninterrupted[-1]["losses"], rel=1e-6)
    assert_same_weights(fsdp, ddp, atol=1e-5)


def test_step_figures_of_split_micro_batches_sum_to_the_whole(data):
    """The reduction's algebra on real model outputs, in one process: 4 micro-batches accumulated by
    one `StepMetrics`, or split 2 + 2 over two and their packed sums unpacked (what the all-reduce
    does), give the same metrics line; the token-weighted means differ from plain means over
    micro-batches (so the weighting is not a no-op)."""
    from mmtool.models.model import ModelConfig, build_model
    from mmtool.train import TrainConfig
    from mmtool.train.metrics import MetricLayout, StepMetrics
    from mmtool.train.probes import ModalityShares

    cfg = TrainConfig(data=[str(data / "digits"), str(data / "cartpole")], batch_tokens=512, num_workers=0,
                      mix_by="tokens", model=ModelConfig(size="tiny"))
    with Loader(cfg.loader_config(0, 1, pin=False)) as loader:
        torch.manual_seed(0)
        model = build_model(cfg.model, loader.index.streams)
        names = [f.name for f in loader.index.folders]
        batches = loader.forever()
        outputs = []
        for m in range(4):
            batch = next(batches)
            with torch.no_grad():
                outputs.append((model(batch, generator=torch.Generator().manual_seed(m)), batch))
    whole, parts = StepMetrics(names), [StepMetrics(names), StepMetrics(names)]
    whole_shares = ModalityShares(grads=False, folders=names)
    part_shares = [ModalityShares(grads=False, folders=names) for _ in parts]
    for m, (out, batch) in enumerate(outputs):
        for acc, shares in ((whole, whole_shares), (parts[m % 2], part_shares[m % 2])):
            acc.add(out.loss, out, batch)
            shares.add(out)
    layout = MetricLayout(model, names)
    layout.unpack(layout.pack(parts[0], part_shares[0]) + layout.pack(parts[1], part_shares[1]),
                  parts[0], part_shares[0])
    whole.close(1.0, 0)
    parts[0].close(1.0, 0)
    a, b = whole.result(), parts[0].result()
    for key in ("loss", "losses", "by_stream", "by_task", "by_source", "tokens", "token_share"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    got, want = part_shares[0].result(), whole_shares.result()
    assert got.keys() == want.keys() and "task_loss_share" in want
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert a["tokens"] == sum(int(batch["seqlens"].sum()) for _, batch in outputs)
    plain = {k: sum(float(o.losses[k]) for o, _ in outputs if k in o.counted) /
             sum(k in o.counted for o, _ in outputs) for k in a["losses"]}
    assert any(abs(plain[k] - a["losses"][k]) > 1e-6 for k in plain)


@pytest.mark.slow
def test_compile_under_shard_model_trains_what_eager_trains(data, tmp_path):
    """`--compile --shard-model` (inductor, the default backend, on 2 gloo ranks): the compiled tied
    head runs inside FSDP2's hooks and trains the same losses and weights as the eager sharded run,
    and FSDP2 has no view tensor of the model's outputs to warn about."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    finish([torchrun(*train_args(data, eager, "--shard-model"))])
    job = torchrun(*train_args(data, compiled, "--shard-model", "--compile"))
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    assert "returned a view tensor" not in err
    got = lines(compiled)
    assert got[0]["compile_graphs"] >= 1 and got[-1]["compile_graphs"] <= 8
    assert_same_figures(got, lines(eager), rel=1e-4)
    assert_same_weights(compiled, eager, atol=1e-5)
