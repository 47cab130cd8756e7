"""Tasks: which objectives each data folder trains, with what loss weight, and how tasks are balanced.

A *task* is one objective applied to one data folder. The run's `ModelConfig.objectives` are the
default task set; a folder may name its own (`--data DIR=W:objectives=caption,contrastive=0.5`, or
`objectives:` in a mixture YAML), which replaces the defaults for that folder — the multi-task setup
of Gato and Unified-IO: "digits: caption the image; cartpole: behaviour cloning on actions; pydocs:
language modelling; spoken-digits: transcribe", side by side in one packed batch and one forward pass.

Presets (`mmtool ls tasks`) name the loss masks the field uses, each an objective with options:

==================  ==================================================  ==============================
preset              objective                                           loss on
==================  ==================================================  ==============================
lm                  next-token:modalities=text                          all text tokens
caption             next-token:modalities=text:after=any                text after another modality
transcribe          next-token:modalities=text:after=audio              text after audio
behaviour-cloning   next-token:modalities=action                        actions only (Gato's mask)
chat                next-token:modalities=text:roles=assistant          assistant turns only
mae                 masked-patch                                        masked image/audio patches
contrastive         contrastive                                         modality pairs of a sample
==================  ==================================================  ==============================

**Two knobs, two meanings.** A folder's *sample weight* (`DIR=W`) sets its share of the tokens (or
samples) the mixture draws, hence its share of each objective's targets; its *loss weight* (the
`=WEIGHT` of each objective) multiplies the loss of its targets. Each objective's loss is the mean
over its own targets in the batch (masked-patch: per stream, then across streams), each target
counted with its task's loss weight, so both knobs move a task's share of the gradient — the sample
weight through how many targets it has, the loss weight through how much each counts. The logged
per-task loss (`by_task` in metrics.jsonl) is the plain mean over the task's targets.

**Balancing** (`ModelConfig.task_balance`, `mmtool ls balancers`) rescales each task's targets by
its loss scale, so that a task with large losses (an MSE on patches) does not swamp one with small
ones: `loss-scale` divides by a running mean of the task's own loss; `uncertainty` learns a
log-variance per task (Kendall et al., 2018). Both keep the sample weight's meaning (share of
targets) and leave the loss weight as a multiplier on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from mmtool.data.index import Stream
from mmtool.errors import MMToolError
from mmtool.registry import Registry

TASK_PRESETS: Registry[str] = Registry(
    "task-presets", "objectives with the loss mask the field uses (--data DIR=W:objectives=caption)")

for _name, _spec, _what in (
        ("lm", "next-token:modalities=text", "language modelling: next-token on all text"),
        ("caption", "next-token:modalities=text:after=any", "next-token on text after another modality"),
        ("transcribe", "next-token:modalities=text:after=audio", "next-token on text after audio"),
        ("behaviour-cloning", "next-token:modalities=action", "next-token on actions only (Gato's mask)"),
        ("chat", "next-token:modalities=text:roles=assistant",
         "next-token on a conversation's assistant turns only (user turns and images are context)"),
        ("mae", "masked-patch", "reconstruct masked image/audio patches"),
        ("contrastive", "contrastive", "InfoNCE between the modalities of a sample")):
    TASK_PRESETS.add(_name, _spec, f"{_what} = {_spec}")


def expand(spec: str) -> str:
    """A preset name (with optional extra `:key=value` options) → its objective spec; else `spec`.

    `caption` → `next-token:modalities=text:after=any`; `mae:mask_ratio=0.75` →
    `masked-patch:mask_ratio=0.75`. An objective name (`next-token:...`) is returned unchanged.
    """
    name, sep, options = spec.partition(":")
    if name.strip() not in TASK_PRESETS:
        return spec
    base = TASK_PRESETS.get(name.strip())
    return f"{base}:{options}" if sep and options else base


def task_name(spec: str) -> str:
    """The name a task's objective is logged and stored under: the preset or objective name."""
    return spec.partition(":")[0].strip()


@dataclass
class TaskTable:
    """Objectives of a run and the loss weight of each (folder, objective) task.

    Attributes:
        specs: {name: full objective spec}, in build order (defaults first, then new ones by folder).
        weights: float [F, O] loss weight of objective o on folder f (0 where f does not train o);
            F = 1 (every folder alike) when no folder has objectives of its own.
        member: bool [F, O] folder f trains objective o.
    """

    specs: dict[str, str]
    weights: Tensor
    member: Tensor

    @property
    def uniform(self) -> bool:
        """Every folder trains every objective (no per-folder masks needed)."""
        return bool(self.member.all())

    def default_weights(self) -> dict[str, float]:
        """Per objective, its mean loss weight over the folders that train it."""
        out = {}
        for o, name in enumerate(self.specs):
            used = self.weights[:, o][self.member[:, o]]
            out[name] = float(used.mean()) if len(used) else 0.0
        return out


def build_table(defaults: dict[str, float], per_folder: list[dict[str, float] | None] | None) -> TaskTable:
    """The task table of a run: `defaults` for folders without objectives of their own.

    Args:
        defaults: {spec: weight} of the run (`ModelConfig.objectives`); specs may be presets.
        per_folder: per data folder (in `--data` order), its own {spec: weight}, or None.

    Raises:
        MMToolError: a negative or non-finite weight, all weights 0 for a folder, or one name given two different specs (e.g.
            `next-token` on one folder and `next-token:observations=true` on another).
    """
    per_folder = list(per_folder or [])
    folders = per_folder if any(p is not None for p in per_folder) else [None]
    rows = [defaults if p is None else p for p in folders]
    used_defaults = any(p is None for p in folders)
    specs: dict[str, str] = {}
    for i, row in enumerate(([defaults] if used_defaults else []) + [r for r in rows if r is not defaults]):
        for spec, weight in row.items():
            name, full = task_name(spec), expand(spec)
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise MMToolError(f"objective {name!r}: weight must be a finite number ≥ 0, got {weight!r}")
            if name in specs and specs[name] != full:
                raise MMToolError(f"objective {name!r} is given twice with different options "
                                  f"({specs[name]!r} and {full!r}); give it once")
            specs[name] = full
    if not specs:
        raise MMToolError("no objectives given (--objectives next-token=1,masked-patch=1, ...)")
    names = list(specs)
    weights = torch.zeros(len(rows), len(names), device="cpu")  # cpu even under `torch.device("meta")`
    member = torch.zeros(len(rows), len(names), dtype=torch.bool, device="cpu")
    for f, row in enumerate(rows):
        for spec, weight in row.items():
            o = names.index(task_name(spec))
            weights[f, o], member[f, o] = float(weight), True
    idle = [f for f in range(len(rows)) if not weights[f].gt(0).any()]
    if idle:
        where = "--objectives" if rows[idle[0]] is defaults else f"folder {idle[0]} (--data order) objectives="
        raise MMToolError(f"{where}: every weight is 0, so the loss is identically 0 and nothing trains; "
                          "give at least one objective a positive weight (0 keeps an objective logged only)")
    return TaskTable(specs, weights, member)


def check_folders(table_specs: dict[str, str], per_folder: list[dict[str, float] | None],
                  folder_streams: list[list[Stream]], names: list[str], mask_ratio: float) -> None:
    """Checks that every folder with objectives of its own has the streams each one needs.

    Raises:
        MMToolError: naming the folder, the objective and what the folder lacks.
    """
    from mmtool.models.objectives import build_objective

    for objectives, streams, name in zip(per_folder, folder_streams, names):
        for spec in objectives or {}:
            try:
                build_objective(table_specs[task_name(spec)], streams, 8, mask_ratio)
            except MMToolError as exc:
                raise MMToolError(f"--data {name}: objective {task_name(spec)!r} cannot train on this "
                                  f"folder: {exc}") from None


# -- balancing -----------------------------------------------------------------------------------
class Balancer(nn.Module):
    """Rescales each task's targets. `forward` gets the batch's per-task mean losses and returns a
    multiplier per task (and a loss term to add); the default keeps every task as it is.

    Args:
        n_folders: F rows of the task table; n_objectives: O columns. A one-row table (no folder has
            objectives of its own) balances per objective, over all folders together.
    """

    def __init__(self, n_folders: int, n_objectives: int):
        super().__init__()

    def forward(self, mean: Tensor, present: Tensor) -> tuple[Tensor, Tensor | None]:
        """Args: mean: float [F, O] detached mean loss of each task in the batch; present: bool [F, O].

        Returns:
            (multiplier [F, O] for each task's targets, r [F, O] or None: the model adds
            Σ r · q, q [F, O] each task's share of its objective's targets in the batch).
        """
        return torch.ones_like(mean), None


BALANCERS: Registry[type[Balancer]] = Registry(
    "balancers", "task balancing (model.task_balance): how each task's loss scale is evened out")
BALANCERS.register("none")(Balancer)


@BALANCERS.register("loss-scale")
class LossScale(Balancer):
    """Divides each task's targets by a running mean of its own loss (EMA, momentum 0.95: ~20
    updates of memory), so every task enters the objective at a scale near 1 × its loss weight.

    The running means are part of the model's state (saved in checkpoints, so a resumed run
    continues them exactly); they move only in training mode, one update per forward pass.
    """

    momentum = 0.95

    def __init__(self, n_folders: int, n_objectives: int):
        super().__init__(n_folders, n_objectives)
        self.register_buffer("scale", torch.zeros(n_folders, n_objectives))  # 0: not seen yet

    def forward(self, mean, present):
        seen = self.scale > 0  # [F, O]
        first = present & ~seen
        current = torch.where(first, mean, self.scale)  # [F, O] a task seen first: its own loss
        if self.training:
            updated = torch.where(present & seen, self.momentum * self.scale + (1 - self.momentum) * mean,
                                  current)
            self.scale.copy_(torch.where(present, updated, self.scale).clamp(min=0.0))
        return 1.0 / current.clamp(min=1e-6), None


@BALANCERS.register("uncertainty")
class Uncertainty(Balancer):
    """Learned homoscedastic-uncertainty weights (Kendall, Gal & Cipolla, 2018): task t's targets
    count exp(−s_t), and s_t · q_t is added, q_t the task's share of its objective's targets; at the
    optimum exp(s_t) is the task's mean loss, i.e. the same normalisation `loss-scale` makes, learned."""

    def __init__(self, n_folders: int, n_objectives: int):
        super().__init__(n_folders, n_objectives)
        self.log_var = nn.Parameter(torch.zeros(n_folders, n_objectives))

    def forward(self, mean, present):
        return torch.exp(-self.log_var), self.log_var


def balancer(name: str, n_folders: int, n_objectives: int) -> Balancer:
    """Builds the balancer `name` (`mmtool ls balancers`)."""
    return BALANCERS.get(name)(n_folders, n_objectives)


def check_weight(value: float, where: str) -> float:
    """A loss weight: finite and ≥ 0."""
    if not math.isfinite(value) or value < 0:
        raise MMToolError(f"{where}: loss weight must be a finite number ≥ 0, got {value}")
    return value
