"""`mmtool train`: the unified model on a weighted mixture, self-supervised, resumable, distributed.

One step = `grad_accum` micro-batches from the loader → forward (all objectives) → backward →
clip → AdamW with linear warmup and cosine decay. Every random choice of a step (masks, negatives)
comes from a generator seeded by (seed, step, micro-batch), the loader's position is part of the
checkpoint, and model and optimizer states are restored exactly, so an interrupted run resumed with
`--resume` logs the same losses as an uninterrupted one (bitwise on CPU).

Run folder::

    RUN/config.json      everything needed to rebuild the run
    RUN/streams.json     the model's streams and the mixture's folders (`mmtool.train.rundir`): with
                         config.json and a checkpoint, all `rundir.load_model` needs (no data)
    RUN/metrics.jsonl    one line per step: losses (total, per objective, per stream, per source,
                         per task `by_task` {"FOLDER/OBJECTIVE": mean over its targets}; an objective
                         with no targets in the step is left out, not logged as 0),
                         real tokens/s, data-wait fraction (`data_wait`: the slowest rank's under
                         torchrun; `data_wait_mean`), epoch, lr, grad norm, `token_share`: each
                         source folder's share of the step's real tokens (all ranks'), and each
                         modality's share of the loss and of the gradient entering the trunk
                         (`loss_share` every step; `grad_share`, `grad_trunk` on step 1 and every
                         `--probe-every` steps: they cost ~30% of a step; `probes.ModalityShares`),
                         and on those steps each task's share of that gradient (`task_grad_share`)
    RUN/checkpoints/     see `mmtool.train.checkpoint`
    RUN/trackers.json    the other trackers' run ids (`loggers`: csv, tensorboard, wandb, mlflow;
                         their files are listed in `mmtool.train.loggers`)

Distributed: under `torchrun`, each rank reads its own share of the mixture (`Loader` rank split),
gradients are averaged by DDP (gloo on CPU, NCCL on CUDA) once per step, after the last micro-batch,
or the model is sharded with FSDP2 (`--shard-model`; `mmtool.train.distributed`); every rank's
figures (the probes' too) are summed into each metrics line by one all-reduce, the data wait's and
step time's max and the epoch's min by a second of three numbers (`mmtool.train.metrics`), and rank
0 logs and saves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from mmtool import folders
from mmtool.train import checkpoint, distributed
from mmtool.config import to_dict
from mmtool.data.loader import Loader, LoaderConfig
from mmtool.data.mixture import parse_data_specs, resolve_mix_by
from mmtool.io import atomic_write_json
from mmtool.errors import Interrupted, MMToolError
from mmtool.train.loggers import open_trackers, read_metrics
from mmtool.train.loggers import resolve as resolve_loggers
from mmtool.models.builders import feedable_objectives
from mmtool.models.compile import compile_model, compile_note
from mmtool.models.compile import stats as compile_stats
from mmtool.models.model import ModelConfig, build_model
from mmtool.models.tasks import check_folders
from mmtool.train.device import (PRECISIONS, Dist, autocast, init_distributed, resolve_device,
                                 resolve_precision)
from mmtool.train.metrics import MetricLayout, StepMetrics, _by_source
from mmtool.train.probes import ModalityShares
from mmtool.train import resume as resume_rules
from mmtool.train.rundir import folder_records, read_config_doc, write_streams
from mmtool.train.stop import StopSignals


@dataclass
class TrainConfig:
    """A training run. Every field is a key of `--config` files and, but `fault_nan_step` (a testing
    aid), a flag of `mmtool train` (`--model.size` for the nested model's; generated)."""

    data: list[str] = field(default_factory=list)
    """Preprocessed folders `DIR[=WEIGHT]`, or a mixture YAML file."""
    out: Path = Path("runs/run")
    """Run folder: config.json, metrics.jsonl, checkpoints/."""
    strategy: str = "packed"
    """Batching strategy (`mmtool ls strategies`)."""
    batch_tokens: int | None = 4096
    """Token budget per micro-batch (ignored when batch_samples is set)."""
    batch_samples: int | None = None
    """Fixed samples per micro-batch instead of a token budget."""
    temperature: float | None = None
    """Mixture temperature: p ∝ weight · n^(1/T)."""
    samples_per_epoch: int | None = None
    """Draws per epoch (default: every sample once)."""
    mix_by: str | None = None
    """What a mixture weight is a share of: tokens or samples (`--mix-by`; None: the mixture YAML's
    `mix_by`, else tokens). config.json records the value used."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    """Rows read for pretraining, by their `split` column (`--splits train[,validation,test]`):
    validation and test rows stay out by default so that evaluation sees unseen data."""
    cache_dir: str | None = None
    """Local folder that shards of remote `--data` URLs (s3://, gs://, hf://, ...) are cached in,
    by sha256 (None: ~/.cache/mmtool/shards). Local folders are read in place."""
    cache_limit: str = "20GB"
    """Bytes of remote shards the cache keeps (e.g. 20GB, 500MB); least recently used out."""
    plan: str = "auto"
    """How an epoch is ordered: samples (one permutation of every draw), shards (a shard-window
    shuffle planned block by block: O(shards) memory, resume in one block), or auto (shards above
    10^7 rows). See `mmtool.data.shardplan`."""
    shard_window: int = 8
    """With --plan shards: shards whose rows are shuffled together."""
    num_workers: int = 1
    """Loader worker threads that assemble batches ahead of the model (0: on demand)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: size, fusion, attention backend, objectives (`model.size=small`, ...)."""
    max_steps: int = 100
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr · min_lr_ratio."""
    warmup: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to every parameter."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over them, so A micro-batches train like
    one batch A× larger. Under torchrun gradients synchronise once per step, after the last one."""
    shard_model: bool = False
    """Under torchrun, shard parameters, gradients and optimizer state across the ranks with FSDP2
    (`torch.distributed.fsdp.fully_shard`) instead of replicating the model (DDP): for models that
    outgrow one GPU. Checkpoints stay unsharded (`mmtool.train.distributed`). Not with `--probes`;
    `grad_share` and `grad_trunk` are not logged."""
    seed: int = 0
    """Seed of the initial weights, the mixture order and every step's masks and negatives."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints to keep."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    fault_nan_step: int | None = None
    """Testing aid: make the loss NaN at this step, to exercise the NaN stop."""
    probes: list[str] = field(default_factory=list)
    """Training probes logged under `probes` in metrics.jsonl (`mmtool ls probes`): attention,
    grad-norm, loss. Empty (default): no probe code runs and no hook is registered."""
    probe_every: int = 10
    """Probe step 1 and every N-th step; on these steps (probes or not) `grad_share` is logged too."""
    compile: bool = False
    """Compile the tied output heads' loss and, on CUDA, the trunk blocks' per-token work with
    torch.compile (`mmtool.models.compile`: rows padded to a few buckets and marked dynamic, so a
    run compiles a handful of graphs, in its first step). Same losses to float tolerance;
    metrics.jsonl counts the graphs (`compile_graphs`)."""
    precision: str = "auto"
    """Compute precision of the forward pass: fp32, bf16 (autocast: matrix products in bfloat16,
    weights, gradients and AdamW state stay float32), or auto (bf16 on CUDA, fp32 on CPU). On a CPU
    with AMX/AVX512-bf16, bf16 trains faster (README "--compile"); its losses differ from fp32's at
    the ~1e-3 level."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Experiment trackers for every step's metrics, the config and eval numbers (`mmtool ls
    loggers`): jsonl (metrics.jsonl, always on), csv, tensorboard, wandb, mlflow."""

    def loader_config(self, rank: int, world: int, pin: bool) -> LoaderConfig:
        samples = self.batch_samples
        return LoaderConfig(data=list(self.data), strategy=self.strategy,
                            batch_tokens=None if samples else self.batch_tokens,
                            batch_samples=samples, temperature=self.temperature, seed=self.seed,
                            samples_per_epoch=self.samples_per_epoch, num_workers=self.num_workers,
                            mix_by=self.mix_by, splits=list(self.splits),
                            rank=rank, world_size=world, pin_memory=pin,
                            cache_dir=self.cache_dir, cache_limit=self.cache_limit,
                            plan=self.plan, shard_window=self.shard_window)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr · min_lr_ratio` at `max_steps` (step ≥ 1)."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.max_steps - cfg.warmup, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _validate(cfg: TrainConfig) -> None:
    for name in ("max_steps", "grad_accum", "save_every"):
        if getattr(cfg, name) < 1:
            raise MMToolError(f"--{name.replace('_', '-')} must be at least 1")
    if not cfg.lr > 0:
        raise MMToolError(f"--lr must be > 0, got {cfg.lr}")
    if not cfg.data:
        raise MMToolError("no training data: give --data DIR[=WEIGHT] (repeatable)")
    if cfg.precision not in PRECISIONS:
        raise MMToolError(f"--precision {cfg.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if cfg.shard_model and cfg.probes:
        raise MMToolError("--probes with --shard-model: the probes read whole parameters and gradients, "
                          "which FSDP2 splits across the ranks; drop one of the two")


def _prepare_run(cfg: TrainConfig, resume: bool) -> tuple[Path | None, dict[str, Any]]:
    """Checks the run folder: (the checkpoint to resume from or None for a fresh start, the
    amendable settings this command changes, `mmtool.train.resume.settings_changes`)."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if not resume:
        if saved.exists():
            raise MMToolError(f"--out {out}: already holds a run; pass --resume to continue it or "
                              "choose another --out")
        return None, {}
    if not saved.exists():
        raise MMToolError(f"--resume: {out} holds no run (no config.json)")
    old = {k: v for k, v in read_config_doc(out).items() if k != resume_rules.AMENDMENTS}
    changes = resume_rules.settings_changes(old, to_dict(cfg))
    ckpts = checkpoint.list_checkpoints(out)
    return (ckpts[-1] if ckpts else None), changes


def with_folder_objectives(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `model.folder_objectives` read from the `--data` entries' `objectives=` (when any
    entry sets them; else as given), so that config.json records each folder's tasks."""
    specs = parse_data_specs(cfg.data)
    if not any(s.objectives is not None for s in specs):
        return cfg
    per_folder = [s.objectives for s in specs]
    if cfg.model.folder_objectives and cfg.model.folder_objectives != per_folder:
        raise MMToolError("model.folder_objectives and the --data entries' objectives= disagree; "
                          "give each folder's objectives in one place")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, folder_objectives=per_folder))


def with_feedable_objectives(cfg: TrainConfig, streams: list[Any]) -> tuple[TrainConfig, str | None]:
    """`cfg` with the *default* objectives cut to those the data can feed, and a note saying what
    was left out (None when nothing was). Objectives given explicitly — any value other than the
    default, or per-folder objectives — are kept as given: what the data cannot feed is an error
    at model build, naming what it needs."""
    if cfg.model.objectives != ModelConfig().objectives or cfg.model.folder_objectives:
        return cfg, None
    fit, dropped = feedable_objectives(cfg.model.objectives, streams)
    if not dropped:
        return cfg, None
    note = (f"the data cannot feed the default objective(s) {', '.join(dropped)} "
            f"({'; '.join(dropped.values())}); training {', '.join(fit)} only — choose with --model.objectives")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, objectives=fit)), note


def _restore(ckpt: Path, model: Any, optimizer: Any, loader: Loader, ddp: "Dist",
             data: list[dict[str, str]]) -> int:
    """Loads model, optimizer and this rank's loader position from `ckpt` after checking that it
    was trained on the same data (`data`: the folders' manifest sha256) by as many ranks; returns
    its step."""
    model_state, opt_state, doc = checkpoint.load(ckpt)
    resume_rules.check_data(doc.get("data"), data, ckpt)
    if len(doc["loader"]) != ddp.world:
        raise MMToolError(f"--resume: checkpoint {ckpt} was written by {len(doc['loader'])} rank(s), "
                          f"this run has {ddp.world}; resume with the same number of processes")
    try:
        distributed.load_full_state(model, optimizer, model_state, opt_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MMToolError(f"checkpoint {ckpt} does not fit this model: {exc}") from None
    try:
        loader.load_state_dict(doc["loader"][ddp.rank])
    except (KeyError, TypeError, ValueError) as exc:
        raise MMToolError(f"checkpoint {ckpt}: loader state does not fit this data ({exc!r})") from None
    return int(doc["step"])


def _nan_error(loss: torch.Tensor, output: Any, batch: Any, names: list[str], step: int,
               metrics_path: Path, last_ckpt: Path | None) -> MMToolError:
    """The stop message of a non-finite loss: the step, the folders of the batch, what is kept."""
    bad = _by_source(output.by_sample_loss, batch["sample_folder"], names)
    worst = [n for n, v in bad.items() if not math.isfinite(v)] or list(bad)
    return MMToolError(
        f"loss is {loss.item()} at step {step} (batch from {', '.join(worst)}); "
        f"stopped. Metrics up to step {step - 1} are in {metrics_path}; last "
        f"checkpoint: {last_ckpt or 'none'}. Try a lower --lr or a tighter --grad-clip 0.5.")


class _Session:
    """The objects of one training process between setup and return: model, optimizer, loader,
    trackers, probes, and the step counter. `run_step` trains one optimizer step; `save` writes a
    checkpoint (collective under DDP: every rank calls it)."""

    def __init__(self, cfg: TrainConfig, ddp: Dist, device: torch.device, loader: Loader,
                 model: Any, trained: Any, optimizer: Any, data: list[dict[str, str]]):
        self.cfg, self.ddp, self.device, self.loader = cfg, ddp, device, loader
        self.model, self.trained, self.optimizer, self.data = model, trained, optimizer, data
        self.out = Path(cfg.out)
        self.metrics_path = self.out / "metrics.jsonl"
        self.names = [f.name for f in loader.index.folders]
        self.step, self.saved_step, self.last_ckpt = 0, -1, None
        self.probes = None
        if cfg.probes:  # off by default: then nothing is built and no hook is ever registered
            from mmtool.train.probes import ProbeSet

            self.probes = ProbeSet(cfg.probes, cfg.probe_every, model, self.names)
        self.layout = MetricLayout(model, self.names) if ddp.world > 1 else None
        self.autocast = autocast(cfg.precision, device)
        self.batches = loader.forever()
        self.graphs_before = 0  # torch.compile graphs that existed before this run's model (`_setup`)

    def save(self) -> None:
        """Checkpoints the current step (all ranks call it; rank 0 writes)."""
        states = [None] * self.ddp.world
        if self.ddp.world > 1:
            dist.all_gather_object(states, self.loader.state_dict())
        else:
            states = [self.loader.state_dict()]
        model_state, opt_state = distributed.full_state(self.model, self.optimizer)  # collective if sharded
        if self.ddp.main:
            self.last_ckpt = checkpoint.save(
                self.out, self.step, model_state, opt_state,
                {"loader": states, "config": to_dict(self.cfg), "data": self.data}, self.cfg.keep_last)
        self.saved_step = self.step

    def run_step(self) -> dict[str, Any]:
        """Trains step `self.step + 1` and returns its metrics line (all ranks' figures)."""
        cfg, step = self.cfg, self.step + 1
        self.step = step
        lr = lr_at(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        acc = StepMetrics(self.names)
        probing = self.probes is not None and self.probes.due(step)
        # each modality's share of the loss (every step) and of the trunk gradient (probe cadence)
        # (not under --shard-model: the extra autograd.grad passes through FSDP2's hooks break its
        # reshard/all-gather order across ranks when gradient sync is skipped for accumulation)
        grads = (step == 1 or step % max(cfg.probe_every, 1) == 0) and not cfg.shard_model
        shares = ModalityShares(grads=grads, folders=self.names)
        if probing:
            self.probes.start()
        for micro in range(cfg.grad_accum):
            self._micro_step(step, micro, acc, shares, probing)
        if probing:
            self.probes.after_backward()  # gradients as backward left them: before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        acc.close(seconds, self.loader.epoch)
        self._reduce(acc, shares, probing)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under --shard-model
            grad_norm = grad_norm.full_tensor()
        line = {"step": step, **acc.result(), "lr": lr, "grad_norm": float(grad_norm), **shares.result()}
        if probing:
            line["probes"] = self.probes.finish()
        return line

    def _micro_step(self, step: int, micro: int, acc: StepMetrics, shares: ModalityShares,
                    probing: bool) -> None:
        """Forward and backward of micro-batch `micro` of `step`, its figures added to `acc`,
        `shares` and (when `probing`) the probes."""
        cfg = self.cfg
        tw = time.perf_counter()
        batch = next(self.batches).to(self.device)
        acc.wait += time.perf_counter() - tw
        # keyed by the micro-batch's place in the step's global batch (rank r's micro m is the
        # m·W + r-th): W ranks × A micro-batches draw what one process × A·W micro-batches draws
        place = micro * self.ddp.world + self.ddp.rank
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + place)
        with distributed.sync_unless_last(self.trained, micro, cfg.grad_accum), self.autocast:
            output = self.trained(batch, generator=gen)
        loss = output.loss
        if cfg.fault_nan_step == step:
            loss = loss * float("nan")
        if probing:
            self.probes.after_forward(batch, output)
        shares.add(output)
        if not torch.isfinite(loss):
            raise _nan_error(loss, output, batch, self.names, step, self.metrics_path, self.last_ckpt)
        with distributed.sync_unless_last(self.trained, micro, cfg.grad_accum):
            (loss / cfg.grad_accum).backward()  # DDP: all-reduces only in the last micro-batch's
        acc.add(loss, output, batch)

    def _reduce(self, acc: StepMetrics, shares: ModalityShares, probing: bool) -> None:
        """Under torchrun, every rank's figures (the probes' too on a probe step) into `acc`,
        `shares` and the probes: one SUM all-reduce and one 3-element MAX (`MetricLayout.reduce`)."""
        if self.layout is None:
            return
        summed = self.layout.reduce(acc, shares, self.probes.totals() if probing else None)
        if probing:
            self.probes.load_totals(summed, self.ddp.world)


def _write_run_files(session: _Session, start_ckpt: Path | None, changes: dict[str, Any]) -> None:
    """streams.json on every (re)start (a resumed run from before it gets one too); config.json on a
    fresh start, or with the resume's amendments appended."""
    cfg, out, loader = session.cfg, session.out, session.loader
    out.mkdir(parents=True, exist_ok=True)
    write_streams(out, loader.index.streams, folder_records(loader.index.folders, cfg.data))
    if start_ckpt is None:
        atomic_write_json(out / "config.json", to_dict(cfg))
    elif changes:
        atomic_write_json(out / "config.json",
                          resume_rules.amend(read_config_doc(out), to_dict(cfg), changes, session.step))


def _interrupted(session: _Session, stop: StopSignals) -> Interrupted:
    """Saves the current step (unless just saved) and returns the error the CLI exits 130 with."""
    if session.saved_step != session.step and session.step > 0:
        session.save()
    where = f"step {session.step}" + (f" (checkpoint {session.last_ckpt})" if session.last_ckpt else "")
    return Interrupted(f"interrupted by {stop.name} at {where}; rerun the same command with --resume")


@folders.writes_out("run")  # claim + lock cfg.out on rank 0 for the whole run (mmtool.folders)
def train(cfg: TrainConfig, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          on_start: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trains (or resumes) a run and returns a summary.

    SIGINT/SIGTERM (Ctrl-C, a cluster's preemption) stop it cleanly between steps: the step in
    flight finishes, a checkpoint is saved and `Interrupted` is raised (`mmtool.train.stop`).

    Args:
        cfg: the run.
        resume: continue from the newest checkpoint in `cfg.out` (same data and shaping settings;
            other settings are amended, `mmtool.train.resume`).
        on_step: called on rank 0 with each step's metrics line.
        on_start: called on rank 0 once the model is built (parameters, resume point, warnings,
            `amended`: the settings this resume changed, or None).

    Raises:
        MMToolError: bad settings, an `--out` mmtool did not make or another process is writing
            (`mmtool.folders`), unusable data, data or settings that changed since the
            checkpoint, an incompatible, edited or corrupt checkpoint, or a NaN loss (after saving
            what is safe: metrics up to the failing step; checkpoints untouched).
        Interrupted: a stop signal, after the checkpoint was saved.
    """
    _validate(cfg)
    session, start_ckpt, changes, notes = _setup(cfg, resume)
    cfg, ddp, model, loader = session.cfg, session.ddp, session.model, session.loader
    t_start = time.perf_counter()
    if ddp.main:
        _write_run_files(session, start_ckpt, changes)
    # metrics.jsonl and the other trackers drop lines past the checkpoint: the resumed run writes them again
    trackers = open_trackers(session.out, cfg.loggers, session.step, enabled=ddp.main)
    if ddp.main and on_start:
        on_start(_start_info(session, start_ckpt, changes, notes + trackers.notes))
    with loader, trackers, StopSignals() as stop:
        trackers.log_config(to_dict(cfg))
        total = _train_steps(session, trackers, stop, on_step)
    if ddp.world > 1:
        dist.barrier()
    if math.isnan(total) and ddp.main:  # a finished run resumed: nothing left to train
        lines, _ = read_metrics(session.out)
        total = lines[-1]["loss"] if lines else total
    return {"steps": session.step, "final_loss": total, "parameters": model.num_parameters(),
            "seconds": time.perf_counter() - t_start, "checkpoint": str(session.last_ckpt),
            "drawn": loader.drawn_by_folder(), "world_size": ddp.world, "rank": ddp.rank,
            "compile_graphs": compile_stats().graphs - session.graphs_before if cfg.compile else None}


def _setup(cfg: TrainConfig, resume: bool) -> tuple[_Session, Path | None, dict[str, Any], list[str]]:
    """Everything `train` needs before its first step: the resolved config, process group, device,
    loader, model (compiled, wrapped), optimizer, restored from the checkpoint when resuming.

    Returns:
        (session, the checkpoint resumed from or None, the settings this resume amends, warnings).
    """
    cfg = dataclasses.replace(cfg, loggers=resolve_loggers(cfg.loggers))  # jsonl added; packages checked
    cfg = dataclasses.replace(cfg, mix_by=resolve_mix_by(cfg.mix_by, cfg.data))  # recorded resolved
    cfg = with_folder_objectives(cfg)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    ddp = init_distributed(device.type)
    loader = Loader(cfg.loader_config(ddp.rank, ddp.world, pin=device.type == "cuda"))
    cfg, objectives_note = with_feedable_objectives(cfg, loader.index.streams)
    start_ckpt, changes = _prepare_run(cfg, resume)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, loader.index.streams).to(device)
    if cfg.model.folder_objectives:
        check_folders(model.table.specs, cfg.model.folder_objectives,
                      [loader.index.folder_streams(f) for f in range(len(loader.index.folders))],
                      [str(f.path) for f in loader.index.folders], cfg.model.mask_ratio)
    graphs_before = compile_stats().graphs
    if cfg.compile:  # before wrapping: the wrapper then runs the compiled functions
        compile_model(model)
    # DDP, or FSDP2 (shards `model`'s parameters in place: the optimizer must be built after), or itself
    trained = distributed.wrap(model, ddp.world, cfg.shard_model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    session = _Session(cfg, ddp, device, loader, model, trained, optimizer,
                       resume_rules.data_digests(loader.index.folders))
    session.graphs_before = graphs_before  # compile_graphs counts from here
    if start_ckpt is not None:
        session.step = session.saved_step = _restore(start_ckpt, model, optimizer, loader, ddp, session.data)
        session.last_ckpt = start_ckpt
    return session, start_ckpt, changes, [objectives_note] * bool(objectives_note) + loader.warnings()


def _start_info(session: _Session, start_ckpt: Path | None, changes: dict[str, Any],
                warnings: list[str]) -> dict[str, Any]:
    """What `train` hands `on_start`: parameters, resume point, streams, settings, warnings."""
    cfg, device, loader = session.cfg, session.device, session.loader
    return {"parameters": session.model.num_parameters(), "start_step": session.step,
            "resumed_from": str(start_ckpt) if start_ckpt else None,
            "streams": [s.key for s in loader.index.streams], "world_size": session.ddp.world,
            "mix_by": loader.mixture.mix_by, "splits": list(cfg.splits),
            "compile": compile_note(device) if cfg.compile else None,
            "precision": resolve_precision(cfg.precision, device), "warnings": warnings,
            "amended": resume_rules.describe(changes) if start_ckpt and changes else None}


def _train_steps(session: _Session, trackers: Any, stop: StopSignals,
                 on_step: Callable[[dict[str, Any]], None] | None) -> float:
    """Steps until `max_steps` (logging and checkpointing as they go) and returns the last step's
    loss (nan when there was no step left to train).

    Raises:
        Interrupted: a stop signal reached any rank, after the checkpoint was saved.
    """
    cfg, ddp = session.cfg, session.ddp
    total = float("nan")
    while session.step < cfg.max_steps:
        if stop.requested(ddp.world):
            raise _interrupted(session, stop)
        line = session.run_step()
        if cfg.compile:  # graphs compiled so far (first step: all of them, with its time)
            line["compile_graphs"] = compile_stats().graphs - session.graphs_before
        total = line["loss"]
        if ddp.main:
            trackers.log_step(line)
            if on_step:
                on_step(line)
        if session.step % cfg.save_every == 0 or session.step == cfg.max_steps:
            session.save()
    return total


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Any, TrainConfig, Loader]:
    """Deprecated: `mmtool.train.rundir.load_model(run)` rebuilds the model without the data. This
    wrapper also opens the run's data (`Loader`), for callers that really need it: (model, config,
    loader); the caller closes the loader."""
    from mmtool.train.rundir import load_model

    model, cfg, _ = load_model(run_dir, device=device)
    return model, cfg, Loader(cfg.loader_config(0, 1, pin=False))
