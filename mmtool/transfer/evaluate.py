"""The eval-transfer job: load the run, build the scratch twin, run every task × protocol, report.

    OUT/report.json            everything below, atomic; the same numbers for the same seed
    OUT/transfer-<task>.png    data-efficiency curves (probe, fine-tune: score vs fraction of the
                               labelled data; k-shot: score vs k) — pretrained vs scratch vs chance
    OUT/data/task-*            the restricted task samples that were evaluated (one shard each)

The report holds no timings, so two runs with the same seed give identical files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmtool import folders
from mmtool.io import atomic_write_json, read_json_object
from mmtool.errors import MMToolError
from mmtool.transfer.protocols import PROTOCOLS, Evaluation, ProtocolConfig
from mmtool.transfer.tasks import RunData, prepare_task, resolve_task


@dataclass
class TransferConfig:
    """An eval-transfer job. Every field is a flag of `mmtool eval-transfer`."""

    run: Path
    """Training run folder (`mmtool train --out`); its newest checkpoint is evaluated."""
    tasks: list[str] = field(default_factory=lambda: ["digits"])
    """Task names (`mmtool ls tasks`) or `label:DIR`."""
    protocols: list[str] = field(default_factory=lambda: ["linear-probe", "finetune", "kshot", "zeroshot"])
    """Protocols (`mmtool ls protocols`)."""
    modalities: list[str] | None = None
    """Modalities the model sees (default: each task's own, which avoid label leaks)."""
    out: Path | None = None
    """Report folder (default RUN/transfer)."""
    held_out: bool = True
    """On a folder the run pretrained on, evaluate only the rows pretraining did not read (the
    rows whose split is not in the run's `splits`); False (`--all-rows`): every row."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """Budgets: fractions, ks, episodes, fine-tune steps, seed, device."""
    compile: bool = False
    """Compile both models' trunk blocks (`mmtool.models.compile`; on CUDA only, where it pays: on
    CPU nothing here is compiled): features and fine-tuning equal eager's within float tolerance."""

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.run) / "transfer"


def _validate(cfg: TransferConfig) -> None:
    p = cfg.protocol
    if not cfg.tasks:
        raise MMToolError("--task: give at least one task (`mmtool ls tasks`)")
    if not cfg.protocols:
        raise MMToolError("--protocol: give at least one protocol (`mmtool ls protocols`)")
    for name in cfg.protocols:
        PROTOCOLS.get(name)
    for name in cfg.tasks:
        resolve_task(name)
    if not p.fractions or any(not 0 < f <= 1 for f in p.fractions):
        raise MMToolError(f"--fractions must lie in (0, 1], got {list(p.fractions)}")
    if not p.ks or any(k < 1 for k in p.ks):
        raise MMToolError(f"--k must be positive integers, got {list(p.ks)}")
    if not p.lrs or not p.cs or min(p.lrs) <= 0 or min(p.cs) <= 0:
        raise MMToolError("the fine-tuning lr grid and the probe's C grid must be positive numbers")
    for name in ("episodes", "steps", "batch_size", "bootstrap"):
        if getattr(p, name) < 1:
            raise MMToolError(f"--{name.replace('_', '-')} must be at least 1")
    p.fractions = tuple(sorted(set(p.fractions)))
    p.ks = tuple(sorted(set(p.ks)))


def pretraining_splits(run: Path) -> list[str] | None:
    """The `split` values of the rows the run pretrained on, read raw from its config.json
    (`splits`); None when the key is missing: such runs read every row."""
    splits = (read_json_object(Path(run) / "config.json") or {}).get("splits")
    return [str(s) for s in splits] if isinstance(splits, list) else None


def load_models(run: Path, device: str, compile: bool = False) -> tuple[dict[str, Any], RunData, dict[str, Any]]:
    """({"pretrained", "scratch"}, the run's streams, folders and splits, what was loaded); with
    `compile`, both models compiled (`mmtool.models.compile.compile_model`).

    The run folder alone is read (`rundir.load_model`): its data folders may be gone.
    """
    from mmtool.train.rundir import load_model, untrained_twin

    model, cfg, info = load_model(Path(run), device=device)
    # The scratch twin: same config and streams, initialised as `train` initialised this run (its
    # seed, same build order), i.e. the checkpoint's own step-0 weights: pretraining is the only
    # difference between the two models.
    scratch = untrained_twin(cfg, info.streams, device)
    if compile:
        from mmtool.models.compile import compile_model

        compile_model(model)
        compile_model(scratch)
    folders = [dict(f) for f in info.folders]  # path, name, source, modalities, preprocess, ...
    loaded = {"run": str(run), "checkpoint": str(info.checkpoint), "step": info.step,
              "model": asdict(cfg.model), "parameters": model.num_parameters(),
              "streams": [s.key for s in info.streams],
              "pretraining_folders": [{k: f[k] for k in ("name", "source", "modalities")} for f in folders],
              "pretraining_splits": info.splits if info.splits is not None else "all rows (config.json has no splits)",
              "scratch_init": f"the run's own initial weights (build_model under torch seed {cfg.seed})"}
    return {"pretrained": model, "scratch": scratch}, RunData(info.streams, folders, info.splits), loaded


def evaluate_transfer(cfg: TransferConfig,
                      on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs every task × protocol on the pretrained and scratch models; writes report.json and plots.

    Raises:
        MMToolError: bad flags, a run or checkpoint that does not load, a task whose modality the
            checkpoint never saw, a k above a task's smallest class (when --k is given), or an
            --out that mmtool did not make or another process is writing (`mmtool.folders`).
    """
    _validate(cfg)
    say = on_progress or (lambda _msg: None)
    with folders.writer(cfg.out_dir, "eval-transfer"):
        return _evaluate(cfg, cfg.out_dir, say)


def _evaluate(cfg: TransferConfig, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """`evaluate_transfer` inside its claimed, locked output folder."""
    from mmtool.transfer.plots import plot_task

    p = cfg.protocol
    say(f"loading {cfg.run}")
    models, run, loaded = load_models(Path(cfg.run), p.device, cfg.compile)
    report: dict[str, Any] = {
        **loaded, "seed": p.seed,
        "settings": {"protocols": list(cfg.protocols), "modalities": cfg.modalities,
                     "fractions": list(p.fractions), "k": list(p.ks), "episodes": p.episodes,
                     "finetune_steps": p.steps, "finetune_batch_size": p.batch_size,
                     "C_grid": list(p.cs), "lr_grid": list(p.lrs), "bootstrap": p.bootstrap,
                     "held_out": cfg.held_out, "compile": cfg.compile},
        "tasks": {}, "plots": {}}
    for name in cfg.tasks:
        say(f"{name}: preparing data")
        task = prepare_task(name, run, out, p.seed, cfg.modalities, "zeroshot" in cfg.protocols,
                            cfg.held_out)
        ev = Evaluation(task, models, p)
        entry = {**task.info, "chance": task.chance, "notes": list(task.notes), "results": {}}
        for proto in cfg.protocols:
            say(f"{name}: {proto}")
            res = PROTOCOLS.get(proto)(ev)
            entry["results"][proto] = {"applicable": res.applicable, "reason": res.reason,
                                       "rows": res.rows, "curve": res.curve, "detail": res.detail}
        report["tasks"][name] = entry
        plot = out / f"transfer-{name.replace(':', '_').replace('/', '_')}.png"
        if plot_task(name, entry, plot):
            report["plots"][name] = str(plot)
    atomic_write_json(out / "report.json", report)
    from mmtool.train.loggers import log_eval, transfer_numbers  # headline numbers → the run's trackers

    log_eval(cfg.run, report["step"], transfer_numbers(report))
    report["report"] = str(out / "report.json")
    return report
