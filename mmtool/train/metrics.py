"""One optimizer step's metrics: accumulated over its micro-batches, then over every rank.

Every figure is kept as a (numerator, denominator) pair of sums, so that adding micro-batches and
adding ranks are the same operation: a step of A micro-batches on each of W ranks logs exactly what
one process logs for the same A·W micro-batches (float summation order aside). The means are
token-weighted — each micro-batch's mean loss weighs by the targets behind it:

    loss                 mean over micro-batches of the micro-batch loss (what the gradient is of)
    losses[OBJ]          Σ loss · targets / Σ targets (an objective with no targets is left out)
    by_stream[OBJ/KEY]   Σ mean · targets / Σ targets of the row group
    by_task[FOLDER/OBJ]  Σ mean · targets / Σ targets of the (folder, objective) task
    by_source[FOLDER]    Σ mean sample loss · real tokens / Σ real tokens of the folder
    tokens, token_share  real tokens of the step, each folder's share of them

These figures are each rank's own before they are reduced:

    data_wait            the largest rank's share of its step spent waiting for its loader: the
                         slowest rank stalls every other at the gradient all-reduce, so the max is
                         what the step lost
    data_wait_mean       the mean over ranks of that share (= data_wait in one process)
    epoch                the smallest rank's loader epoch (an epoch of batches not a multiple of W
                         gives the ranks unequal shares, and they reach its end at different steps)
    seconds              the slowest rank's step time; `tokens_per_s` is every rank's real tokens
                         over it

Under DDP, `MetricLayout.reduce` packs the sums — and `ModalityShares`' sums, and on probe steps the
probes' (`mmtool.train.probes`) — into one float64 tensor with a fixed layout (every key the model
can produce, known at setup) and all-reduces it (SUM) once per step; then a second, 3-element
all-reduce (MAX) of (data wait, −epoch, seconds) gives the maxima and the min, which no sum can
carry. Those two collectives per step are all the metrics cost; rank 0 then logs the all-rank values.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmtool.errors import MMToolError

GROUPS = ("losses", "by_stream", "by_task", "by_source")
SHARE_SUMS = ("loss", "sq", "task_loss", "task_sq")  # `ModalityShares` dicts of sums


def _by_source(out_samples: torch.Tensor, folders: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Mean sample loss per folder of one micro-batch."""
    loss = out_samples.detach().float().cpu().numpy()
    fold = folders.cpu().numpy()
    return {names[int(f)]: float(loss[fold == f].mean()) for f in np.unique(fold)}


class StepMetrics:
    """One optimizer step's metrics, accumulated over its micro-batches (`add`), then `result`."""

    def __init__(self, names: list[str]):
        self.names = names
        self.wait, self.tokens, self.total, self.micro = 0.0, 0, 0.0, 0
        self.wait_max = self.wait_mean = 0.0  # shares of the step spent waiting (`close`, `reduce`)
        self.epoch, self.seconds = 0, 0.0  # `close`, `reduce`
        # group → key → [Σ value · weight, Σ weight]
        self.sums: dict[str, dict[str, list[float]]] = {g: {} for g in GROUPS}

    def _add(self, group: str, key: str, value: float, weight: float) -> None:
        pair = self.sums[group].setdefault(key, [0.0, 0.0])
        pair[0] += value * weight
        pair[1] += weight

    def add(self, loss: torch.Tensor, output: Any, batch: Any) -> None:
        """Adds one micro-batch's `ModelOutput` (after its backward)."""
        self.total += float(loss.detach())
        self.micro += 1
        self.tokens += output.tokens
        for k in output.counted:  # an objective with nothing in the batch has no loss to log
            self._add("losses", k, float(output.losses[k].detach()), output.counts[k])
        for k, v in output.by_stream.items():
            self._add("by_stream", k, v, output.counts[k])
        for (f, obj), v in output.by_task.items():
            self._add("by_task", f"{self.names[f]}/{obj}", v, output.counts[(f, obj)])
        tokens = np.bincount(batch["sample_folder"].cpu().numpy(), batch["seqlens"].cpu().numpy(),
                             len(self.names))  # [F] real tokens of the micro-batch per folder
        for name, v in _by_source(output.by_sample_loss, batch["sample_folder"], self.names).items():
            self._add("by_source", name, v, float(tokens[self.names.index(name)]))

    def close(self, seconds: float, epoch: int) -> None:
        """Ends this rank's step (`seconds` long, its loader in `epoch`): its data-wait share is both
        the max and the mean until `MetricLayout.reduce` makes them all ranks'."""
        self.wait_max = self.wait_mean = self.wait / seconds
        self.epoch = epoch
        self.seconds = seconds

    def result(self) -> dict[str, Any]:
        """The step's metrics entries (loss, per objective/stream/source/task, tokens, shares, step
        seconds and speed, data wait, epoch); after `close`."""
        means = {g: {k: n / w for k, (n, w) in self.sums[g].items() if w > 0} for g in GROUPS}
        source = {k: w for k, (_, w) in self.sums["by_source"].items() if w > 0}
        all_tokens = max(sum(source.values()), 1)
        return {"loss": self.total / max(self.micro, 1), **means, "tokens": self.tokens,
                "token_share": {k: source[k] / all_tokens for k in self.names if k in source},
                "seconds": self.seconds, "tokens_per_s": self.tokens / self.seconds,
                "data_wait": self.wait_max, "data_wait_mean": self.wait_mean, "epoch": self.epoch}


class MetricLayout:
    """The fixed place of every figure a step can log, for one all-reduce of all of them.

    Args:
        model: the (unwrapped) `UnifiedModel`: its objectives, stream keys and modalities name every
            key `by_stream` can have (a stream key, or a pair of modalities "a+b").
        names: the data folders' names, in `sample_folder` order.
    """

    def __init__(self, model: Any, names: list[str]):
        objectives = list(model.objectives)
        modalities = list(model.modalities)
        pairs = [f"{a}+{b}" for a, b in itertools.permutations(modalities, 2)]  # contrastive row groups
        groups = [s.key for s in model.streams] + pairs
        tasks = [f"{n}/{o}" for n in names for o in objectives]
        self.keys: dict[tuple[str, str], list[str]] = {
            ("sums", "losses"): objectives,
            ("sums", "by_stream"): [f"{o}/{g}" for o in objectives for g in groups],
            ("sums", "by_task"): tasks, ("sums", "by_source"): list(names),
            ("shares", "loss"): modalities, ("shares", "sq"): modalities,
            ("shares", "task_loss"): tasks, ("shares", "task_sq"): tasks}
        self.size = 3 + 2 * sum(len(v) for v in self.keys.values())

    def _tables(self, acc: StepMetrics, shares: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return {(kind, g): acc.sums[g] if kind == "sums" else getattr(shares, g) for kind, g in self.keys}

    def pack(self, acc: StepMetrics, shares: Any) -> torch.Tensor:
        """[size] float64: total, micro-batches, tokens, then (Σ v·w, Σ w) — or (value, present) for
        the shares — of every key in layout order (zeros where this rank has nothing)."""
        values = [acc.total, float(acc.micro), float(acc.tokens)]
        for where, table in self._tables(acc, shares).items():
            unknown = set(table) - set(self.keys[where])
            if unknown:
                raise MMToolError(f"metric {where[1]} key(s) {sorted(unknown)} are outside the all-rank "
                                  "layout (mmtool.train.metrics.MetricLayout); this is a bug")
            for k in self.keys[where]:
                v = table.get(k)
                values += ([0.0, 0.0] if v is None else list(v)) if where[0] == "sums" \
                    else ([0.0, 0.0] if v is None else [v, 1.0])
        return torch.tensor(values, dtype=torch.float64)

    def unpack(self, flat: torch.Tensor, acc: StepMetrics, shares: Any) -> None:
        """Writes the summed `flat` back into `acc` and `shares` (keys no rank had are left out)."""
        values = flat.tolist()
        acc.total, acc.micro, acc.tokens = values[0], int(values[1]), int(values[2])
        at = 3
        for where, table in self._tables(acc, shares).items():
            table.clear()
            for k in self.keys[where]:
                a, b = values[at], values[at + 1]
                at += 2
                if b > 0:
                    table[k] = [a, b] if where[0] == "sums" else a

    def reduce(self, acc: StepMetrics, shares: Any, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sums every rank's step figures into `acc` and `shares`, and `extra` (a float64 tensor of
        further sums, the same size on every rank: the probes') with them, in one all-reduce; then
        takes the max data wait, the min epoch and the max step time in a second, 3-element one.
        Collectives: every rank calls this every step, after `acc.close`.

        Returns:
            `extra` summed over the ranks (None without `extra`).
        """
        world = dist.get_world_size()
        local = self.pack(acc, shares)
        parts = [local, torch.tensor([acc.wait_mean], dtype=torch.float64)]
        if extra is not None:
            parts.append(extra.to(torch.float64).flatten())
        flat = _all_reduce(torch.cat(parts), dist.ReduceOp.SUM)
        self.unpack(flat[:self.size], acc, shares)
        acc.wait_mean = float(flat[self.size]) / world
        peak = _all_reduce(torch.tensor([acc.wait_max, -float(acc.epoch), acc.seconds],
                                        dtype=torch.float64), dist.ReduceOp.MAX)
        acc.wait_max, acc.epoch, acc.seconds = float(peak[0]), int(-peak[1]), float(peak[2])
        return flat[self.size + 1:] if extra is not None else None


def _all_reduce(flat: torch.Tensor, op: Any) -> torch.Tensor:
    """`flat` reduced over every rank with `op`, on the CPU (NCCL reduces device tensors only)."""
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat, op=op)
    return flat.cpu()
