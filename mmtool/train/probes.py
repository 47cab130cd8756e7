"""Training probes: what the model attends to, where gradients go, and which losses move.

`mmtool train --probes attention,grad-norm,loss --probe-every N` adds a `probes` entry to the
`metrics.jsonl` line of step 1 and of every N-th step (step 1 gives the "before training" value
that the later ones move away from):

* `attention` — per layer, the share of attention mass that query tokens of each modality send to
  key tokens of each modality: `{"layers": [{from: {to: share}}], "queries": {from: count}}`. The
  softmax(q·kᵀ/√d_head) is recomputed from each block's own q/k (a forward hook on every
  `SelfAttention`), with the mask the block used — within the sample, or within (sample, modality)
  for the per-modality layers of mid/late fusion, causal when the model is — and averaged over
  heads and over at most `queries` query tokens per layer per micro-batch, stratified by modality
  (so a rare modality still gets queries). Each query's mass sums to 1, so every row does.
* `grad-norm` — after backward (all micro-batches) and before clipping, per modality: `params`,
  the L2 norm of the gradients of its encoders' parameters; `tokens`, the L2 norm of the loss
  gradient arriving at its encoder outputs (the token vectors that enter the trunk), and
  `per_token`, that norm per token (RMS over the modality's tokens). `params` of a discrete stream
  include its tied output head, so `per_token` is the fairer comparison between modalities: it is
  how much the loss depends on each modality's input.
* `loss` — `{"by_modality": {modality: {objective: loss}}, "by_source": {folder: loss}}`: the
  step's per-stream and per-sample losses regrouped (means over micro-batches).

Whatever `--probes` says, `train` also logs each modality's share of the loss and of the gradient
entering the trunk (`ModalityShares`): every step `loss_share` {modality: share of the step's
weighted total loss}; on step 1 and every `--probe-every`-th step `grad_share` {modality: share of
Σ over modalities of ‖∂(its weighted loss)/∂(final hidden states)‖} and `grad_trunk` (those norms).
The gradients are taken at the trunk's output, one `autograd.grad` per modality through the heads
only (the trunk is not re-run), before the step's backward; they touch no parameter's `.grad`.
Measured cost on the tiny model (digits + spoken-digits + pydocs, 4096-token batches, CPU): +29%
on the steps that take them (the text head's [tokens, 30522] product is redone per modality), so
not every step; `loss_share` is free (read with the step's other metrics).

Under `torchrun` (DDP) every probe figure is the whole step's, all ranks' micro-batches, as one
process with `--grad-accum A·W` logs it (`tests/train/test_distributed.py` checks it against one):
each probe keeps its figures as sums (`Probe.totals`), and `train` adds every rank's in the step's
one metrics all-reduce (`mmtool.train.metrics.MetricLayout.reduce`), then `Probe.load_totals`:

* `attention` — the summed attention mass and the query counts add over ranks: the shares are means
  over every rank's sampled queries (at most `queries` per micro-batch on each rank).
* `grad-norm` — `tokens` and `per_token`: squared gradients at the encoder outputs add over ranks
  (different tokens), divided by W², because each rank's backward is of its own mean loss and the
  step's loss is the mean over the W ranks (DDP averages); token counts add. `params` is read after
  backward, from gradients DDP has already averaged over the ranks: the same on every rank, kept.
* `loss` — per-micro-batch means: their sums and counts add, so each figure is the mean over every
  micro-batch of every rank.

`--shard-model` (FSDP2) refuses `--probes`: each rank holds 1/W of every parameter and gradient,
and `grad-norm` would need them whole (the sharded norms could be all-reduced in squares, not done).

Probes off (the default) register nothing: `train` never builds a `ProbeSet`, so no hook exists.
On, hooks live only during probe steps (`ProbeSet.start` / `finish`); other steps run unobserved.
Probes never touch the random generator or the computation, so the losses are identical with and
without them. The overhead: `benchmarks/probes.py`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from mmtool.errors import MMToolError
from mmtool.registry import Registry

PROBES: Registry[type["Probe"]] = Registry(
    "probes", "training probes logged under `probes` in metrics.jsonl (`mmtool train --probes a,b`)")

MAX_QUERIES = 128
"""Attention probe: query tokens per layer per micro-batch (stratified by modality)."""


class Probe:
    """A probe: hooks attached for one step, observations accumulated over its micro-batches.

    Args:
        model: the (unwrapped) `UnifiedModel`.
        folders: data folder names, in `sample_folder` order.
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, folders: list[str]):
        self.model, self.folders = model, folders
        self.handles: list[Any] = []

    def start(self) -> None:
        """Registers hooks and clears the accumulators (called before the step's first forward)."""

    def after_forward(self, batch: Any, output: Any) -> None:
        """Sees each micro-batch's batch and `ModelOutput`."""

    def after_backward(self) -> None:
        """Reads gradients: all micro-batches are backpropagated, nothing is clipped yet."""

    def result(self) -> dict[str, Any]:
        raise NotImplementedError

    def totals(self) -> Tensor:
        """[n] float64: the sums `result` is computed from, in a fixed order and size (the same on
        every rank, whatever its data): what the all-reduce adds across ranks. Default: none."""
        return torch.zeros(0, dtype=torch.float64)

    def load_totals(self, flat: Tensor, world: int) -> None:
        """Replaces this rank's sums by every rank's (`flat`: `totals` summed over `world` ranks)."""

    def stop(self) -> None:
        """Removes every hook."""
        for h in self.handles:
            h.remove()
        self.handles = []


def _modality_index(model: nn.Module) -> tuple[list[str], Tensor]:
    return list(model.modalities), model.modality_of_stream


@PROBES.register("attention")
class AttentionProbe(Probe):
    """Per layer, the share of attention mass each modality's tokens send to each modality."""

    name = "attention"

    def __init__(self, model, folders, max_queries: int = MAX_QUERIES):
        super().__init__(model, folders)
        self.max_queries = max_queries
        self.blocks = [b.attn for b in model.trunk.blocks]

    def start(self) -> None:
        m, layers = len(self.model.modalities), len(self.blocks)
        self.mass = torch.zeros(layers, m, m, dtype=torch.float64)  # [L, from, to] summed shares
        self.count = torch.zeros(layers, m, dtype=torch.float64)  # [L, from] queries
        self._view = None
        self.handles.append(self.model.embedder.register_forward_hook(self._on_embed))
        for i, attn in enumerate(self.blocks):
            self.handles.append(attn.register_forward_hook(
                lambda mod, args, out, i=i: self._on_attention(i, mod, *args)))

    def _on_embed(self, module, args, output) -> None:
        """Remembers which row is which token, and picks this micro-batch's query rows."""
        view = args[1]
        stream = view.stream.clamp(min=0)
        modality = self.model.modality_of_stream[stream]  # [N] packed order
        real = view.real if view.real is not None else torch.ones_like(stream, dtype=torch.bool)
        m = len(self.model.modalities)
        present = [k for k in range(m) if bool((real & (modality == k)).any())]
        quota = max(1, self.max_queries // max(len(present), 1))
        picks = []
        for k in present:  # evenly spaced rows of each modality: deterministic, spread over samples
            rows = torch.nonzero(real & (modality == k)).flatten()
            take = torch.linspace(0, len(rows) - 1, min(quota, len(rows))).round().long()
            picks.append(rows[take.unique()])
        self._view = (view, modality, torch.cat(picks) if picks else stream[:0])

    @torch.no_grad()
    def _on_attention(self, layer: int, attn, x: Tensor, seq, backend, causal: bool) -> None:
        view, modality, queries = self._view  # packed-order modality [N], query rows [Q]
        if queries.numel() == 0:
            return
        n, d = x.shape
        heads = attn.n_heads
        q, k, _ = attn.qkv(x.detach()).float().view(n, 3, heads, d // heads).unbind(1)  # [N, H, Dh]
        if seq.perm is not None:  # rows of x are in the grouping's order: packed row r is x[inv[r]]
            rows, mod_x = seq.inv[queries], modality[seq.perm]
        else:
            rows, mod_x = queries, modality
        scale = 1.0 / math.sqrt(d // heads)
        m = len(self.model.modalities)
        onehot = torch.nn.functional.one_hot(mod_x, m).float()  # [N, M] key modality
        if seq.mask is not None:  # padded rows computed with padding: B rows of L slots, mask given
            width = seq.mask.shape[-1]
            row = torch.div(rows, width, rounding_mode="floor")  # [Q]
            groups = [(rows[row == b], b * width, (b + 1) * width, seq.mask[b, 0][rows[row == b] - b * width])
                      for b in row.unique().tolist()]  # allowed: [q, L] the queries' mask rows
        else:  # one matmul per attention sequence that holds queries: keys are never copied
            cu = seq.cu_seqlens.long()
            which = torch.searchsorted(cu, rows, right=True) - 1  # [Q] sequence of each query
            groups = []
            for g in which.unique().tolist():
                st, en = int(cu[g]), int(cu[g + 1])
                r = rows[which == g]
                keys = torch.arange(en - st, device=x.device)
                allowed = keys[None, :] <= (r - st)[:, None] if causal else None  # [q, L]
                groups.append((r, st, en, allowed))
        shares, froms = [], []
        for r, st, en, allowed in groups:
            scores = torch.einsum("qhd,lhd->qhl", q[r], k[st:en]) * scale  # [q, H, L]
            if allowed is not None:
                scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
            shares.append(scores.softmax(-1).mean(1) @ onehot[st:en])  # [q, M] mass per key modality
            froms.append(mod_x[r])
        frm = torch.cat(froms).cpu()  # one device→host read per layer
        self.mass[layer].index_add_(0, frm, torch.cat(shares).double().cpu())
        self.count[layer].index_add_(0, frm, torch.ones(len(frm), dtype=torch.float64))

    def totals(self) -> Tensor:
        """[L·M·M + L·M]: the summed attention mass, then the query counts."""
        return torch.cat([self.mass.flatten(), self.count.flatten()])

    def load_totals(self, flat: Tensor, world: int) -> None:
        cut = self.mass.numel()
        self.mass = flat[:cut].reshape(self.mass.shape).clone()
        self.count = flat[cut:].reshape(self.count.shape).clone()

    def result(self) -> dict[str, Any]:
        names = self.model.modalities
        layers = []
        for mass, count in zip(self.mass, self.count):
            layers.append({names[i]: {names[j]: float(mass[i, j] / count[i]) for j in range(len(names))}
                           for i in range(len(names)) if count[i] > 0})
        counts = self.count[0] if len(self.count) else torch.zeros(0)
        return {"layers": layers, "queries": {names[i]: int(c) for i, c in enumerate(counts) if c > 0}}


@PROBES.register("grad-norm")
class GradNormProbe(Probe):
    """Per modality, the gradient norm of its encoders' parameters and at its encoder outputs."""

    name = "grad-norm"

    def __init__(self, model, folders):
        super().__init__(model, folders)
        names, of_stream = model.modalities, model.modality_of_stream.tolist()
        self.by_modality: dict[str, list[nn.Module]] = {}
        self.stream_modality: dict[nn.Module, str] = {}
        for k, enc in model.embedder.encoders.items():
            name = names[of_stream[int(k)]]
            self.by_modality.setdefault(name, []).append(enc)
            self.stream_modality[enc] = name

    def start(self) -> None:
        self.sq = {name: 0.0 for name in self.by_modality}  # Σ squared grads at encoder outputs
        self.tokens = {name: 0 for name in self.by_modality}
        self.params: dict[str, float] = {}
        for enc in self.stream_modality:
            self.handles.append(enc.register_forward_hook(self._on_encode))

    def _on_encode(self, module, args, output: Tensor) -> None:
        if not output.requires_grad:
            return
        name = self.stream_modality[module]
        self.tokens[name] += int(output.shape[0])

        def grad_hook(grad: Tensor) -> None:
            self.sq[name] += float(grad.detach().float().pow(2).sum())

        self.handles.append(output.register_hook(grad_hook))

    def after_backward(self) -> None:
        for name, encs in self.by_modality.items():
            grads = [p.grad.detach().float().pow(2).sum() for e in encs for p in e.parameters()
                     if p.grad is not None]
            self.params[name] = float(torch.stack(grads).sum().sqrt()) if grads else 0.0

    def totals(self) -> Tensor:
        """[2·M]: Σ squared gradients at the encoder outputs, then tokens, per modality."""
        names = list(self.by_modality)
        return torch.tensor([self.sq[n] for n in names] + [float(self.tokens[n]) for n in names],
                            dtype=torch.float64)

    def load_totals(self, flat: Tensor, world: int) -> None:
        """Each rank's activation gradients are of its own loss, W times its share of the step's
        (the mean over ranks): squares add, then scale by 1/W². `params` stays: DDP averaged them."""
        names, values = list(self.by_modality), flat.tolist()
        self.sq = {n: values[i] / world**2 for i, n in enumerate(names)}
        self.tokens = {n: int(round(values[len(names) + i])) for i, n in enumerate(names)}

    def result(self) -> dict[str, Any]:
        seen = [n for n in self.by_modality if self.tokens[n] > 0]
        return {"params": {n: self.params.get(n, 0.0) for n in seen},
                "tokens": {n: math.sqrt(self.sq[n]) for n in seen},
                "per_token": {n: math.sqrt(self.sq[n] / self.tokens[n]) for n in seen}}


@PROBES.register("loss")
class LossProbe(Probe):
    """Loss per modality (per objective) and per source (data folder)."""

    name = "loss"

    def __init__(self, model, folders):
        super().__init__(model, folders)
        self.modality = {s.key: s.modality for s in model.streams}
        pairs = [f"{a}+{b}" for a, b in itertools.permutations(model.modalities, 2)]  # contrastive
        names = list(dict.fromkeys([s.modality for s in model.streams] + pairs))
        self.keys = [(n, o) for n in names for o in model.objectives]  # every (modality, objective)

    def start(self) -> None:
        self.parts: dict[tuple[str, str], list[float]] = {}  # key → [Σ micro-batch mean, micro-batches]
        self.sources: dict[str, list[float]] = {}

    def after_forward(self, batch, output) -> None:
        for key, value in output.by_stream.items():
            objective, stream = key.split("/", 1)
            name = self.modality.get(stream, stream)  # contrastive keys ("image+text") stay as they are
            _add(self.parts, (name, objective), float(value))
        loss = output.by_sample_loss.detach().float().cpu().numpy()
        folder = batch["sample_folder"].cpu().numpy()
        for f in np.unique(folder):
            _add(self.sources, self.folders[int(f)], float(loss[folder == f].mean()))

    def totals(self) -> Tensor:
        """[2·(K + F)]: (Σ, count) of each (modality, objective) key, then of each folder."""
        unknown = set(self.parts) - set(self.keys)
        if unknown:
            raise MMToolError(f"loss probe key(s) {sorted(unknown)} are outside its all-rank layout; this is a bug")
        pairs = [self.parts.get(k, [0.0, 0.0]) for k in self.keys] + \
            [self.sources.get(f, [0.0, 0.0]) for f in self.folders]
        return torch.tensor(pairs, dtype=torch.float64).flatten()

    def load_totals(self, flat: Tensor, world: int) -> None:
        pairs = flat.reshape(-1, 2).tolist()
        self.parts = {k: v for k, v in zip(self.keys, pairs) if v[1] > 0}
        self.sources = {f: v for f, v in zip(self.folders, pairs[len(self.keys):]) if v[1] > 0}

    def result(self) -> dict[str, Any]:
        by_modality: dict[str, dict[str, float]] = {}
        for (name, objective), (total, n) in sorted(self.parts.items()):
            by_modality.setdefault(name, {})[objective] = total / n
        return {"by_modality": by_modality,
                "by_source": {k: total / n for k, (total, n) in sorted(self.sources.items())}}


def _add(table: dict[Any, list[float]], key: Any, value: float) -> None:
    """Adds `value` to the [Σ, count] pair of `key`."""
    pair = table.setdefault(key, [0.0, 0.0])
    pair[0] += value
    pair[1] += 1


def trunk_grad_norms(output: Any, losses: dict[Any, Tensor] | None = None) -> dict[Any, float]:
    """Per modality, ‖∂(its weighted loss)/∂(final hidden states)‖: the gradient its losses send into
    the trunk (`ModelOutput.modality_losses`, `ModelOutput.hidden`). Leaves parameters' `.grad` alone.

    Args:
        losses: other attached parts of the loss to measure instead (e.g. `ModelOutput.task_losses`).
    Returns:
        {modality (or key of `losses`): L2 norm} ({} when the output has no hidden states).
    """
    if output.hidden is None or not output.hidden.requires_grad:
        return {}
    names, norms = [], []
    for name, loss in (output.modality_losses if losses is None else losses).items():
        if not loss.requires_grad:
            continue
        (g,) = torch.autograd.grad(loss, output.hidden, retain_graph=True, allow_unused=True)
        names.append(name)
        norms.append(g.float().norm() if g is not None else output.hidden.new_zeros((), dtype=torch.float32))
    return dict(zip(names, torch.stack(norms).tolist())) if norms else {}


class ModalityShares:
    """One step's per-modality shares of the loss and of the trunk gradient, over its micro-batches.

    `add` each micro-batch's `ModelOutput` before its backward; `result` gives the metrics entries
    `loss_share`, and with gradients `grad_share` and `grad_trunk` (see the module docstring).
    Micro-batch losses add; gradient norms add in squares (different tokens' gradients are orthogonal
    parts of one vector).
    """

    def __init__(self, grads: bool = True, folders: list[str] | None = None):
        self.grads = grads
        self.folders = folders
        self.loss: dict[str, float] = {}
        self.sq: dict[str, float] = {}
        self.task_sq: dict[str, float] = {}
        self.task_loss: dict[str, float] = {}

    def add(self, output: Any) -> None:
        for name, value in output.by_modality.items():
            self.loss[name] = self.loss.get(name, 0.0) + value
        if self.folders is not None and len(output.by_task_part) > 1:
            for (f, obj), value in output.by_task_part.items():
                key = f"{self.folders[f]}/{obj}"
                self.task_loss[key] = self.task_loss.get(key, 0.0) + value
        if self.grads:
            for name, norm in trunk_grad_norms(output).items():
                self.sq[name] = self.sq.get(name, 0.0) + norm**2
            if self.folders is not None and len(output.task_losses) > 1:
                for (f, obj), norm in trunk_grad_norms(output, output.task_losses).items():
                    key = f"{self.folders[f]}/{obj}"
                    self.task_sq[key] = self.task_sq.get(key, 0.0) + norm**2

    def result(self) -> dict[str, dict[str, float]]:
        """`loss_share`; with gradients `grad_share`, `grad_trunk`; when the step had more than one
        (folder, objective) task, `task_loss_share` and (with gradients) `task_grad_share`
        {"FOLDER/OBJECTIVE": share}."""
        out = {"loss_share": _shares(self.loss)}
        if self.task_loss:
            out["task_loss_share"] = _shares(self.task_loss)
        if self.sq:
            norms = {n: math.sqrt(v) for n, v in self.sq.items()}
            out.update(grad_share=_shares(norms), grad_trunk=norms)
        if self.task_sq:
            out["task_grad_share"] = _shares({n: math.sqrt(v) for n, v in self.task_sq.items()})
        return out


def _shares(values: dict[str, float]) -> dict[str, float]:
    total = sum(values.values())
    return {n: v / total for n, v in sorted(values.items())} if total > 0 else {}


class ProbeSet:
    """The probes of a run and their cadence; `train` drives it only on probe steps.

    Args:
        names: registered probe names (`mmtool ls probes`).
        every: probe step 1 and every `every`-th step.
        model: the unwrapped model; folders: data folder names in `sample_folder` order.
    """

    def __init__(self, names: list[str], every: int, model: nn.Module, folders: list[str]):
        if every < 1:
            raise MMToolError(f"--probe-every must be at least 1, got {every}")
        if len(set(names)) != len(names):
            raise MMToolError(f"--probes lists a probe twice: {','.join(names)}")
        self.every = every
        self.probes = [PROBES.get(n)(model, folders) for n in names]

    def due(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def start(self) -> None:
        for p in self.probes:
            p.start()

    def after_forward(self, batch, output) -> None:
        for p in self.probes:
            p.after_forward(batch, output)

    def after_backward(self) -> None:
        for p in self.probes:
            p.after_backward()

    def totals(self) -> Tensor:
        """Every probe's `totals`, concatenated (what `train` adds over ranks)."""
        parts = [p.totals() for p in self.probes]
        self._sizes = [len(t) for t in parts]
        return torch.cat(parts)

    def load_totals(self, flat: Tensor, world: int) -> None:
        """Hands each probe its part of the all-rank `flat` (laid out as the last `totals`)."""
        for p, part in zip(self.probes, torch.split(flat, self._sizes)):
            p.load_totals(part, world)

    def finish(self) -> dict[str, Any]:
        """Removes the hooks and returns `{probe name: result}`."""
        for p in self.probes:
            p.stop()
        return {p.name: p.result() for p in self.probes}

    def abort(self) -> None:
        for p in self.probes:
            p.stop()


def parse_probes(text: str | list[str] | None) -> list[str]:
    """"attention, grad-norm" → ["attention", "grad-norm"], each checked against `PROBES`."""
    if text is None:
        return []
    items = text if isinstance(text, list) else text.split(",")
    names = [s.strip() for s in items if s and s.strip()]
    for n in names:
        PROBES.get(n)  # unknown names fail with close matches
    return names


def hook_count(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks registered on any module of `model` (tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())
