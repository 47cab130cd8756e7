"""The unified model: encoders → fusion trunk → weighted self-supervised objectives, on any `Batch`.

    batch (packed or padded)
      │  PackedView: real tokens in packed order, sample after sample
      ▼
    Embedder        h [N, d] = encoder_k(token) + stream[k] + position + task[folder]   (encoders.py)
      │  (objectives' masks replace some inputs first: [MASK] ids, learned patch mask vectors)
      ▼
    Trunk           blocks; each attends within samples or within (sample, modality)    (fusion.py)
      ▼
    objectives      next-token, masked-patch, masked-token, contrastive → Σ weight · loss (objectives.py),
                    each folder its own (tasks.py): a target counts with its task's loss weight

Decisions (the "why"):

* **Causal or bidirectional.** Attention is causal in every layer when any objective needs it
  (`next-token`), so next-token prediction is valid and one forward pass serves every objective:
  masked-patch / masked-token then predict a masked token at its own position from the visible
  context before it. Without next-token the trunk is bidirectional (proper MAE / BERT).
* **Task token.** A learned embedding per data folder (`Batch.sample_folder`, the order of
  `--data`) is added to every token of a sample: the batch carries the folder, not the task
  string, and a folder is one dataset with one task mix. (Up to `encoders.MAX_TASKS` folders.)
* **Packed = padded.** By default the model only computes on packed order: a padded batch's real
  slots are gathered into it, so padding costs nothing past the copy. Masks are drawn per stream
  token, whose order does not depend on the layout. The same samples give the same loss (to float
  tolerance) in both layouts — also with `keep_padding`, which computes on the padding (masked)
  to measure what a conventional padded model pays.
* **Late fusion and next-token.** Late fusion's per-modality streams predict their own next token:
  token t reads the hidden state of the previous token of the same modality in its sample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mmtool.data.batch import Batch
from mmtool.data.index import SEPARATOR, Stream
from mmtool.errors import MMToolError
from mmtool.models.attention import ATTENTION, AttentionBackend, default_backend, get_backend
from mmtool.models.builders import ModelSize, build_embedder, build_objectives, build_trunk, model_size
from mmtool.models.encoders import Corruption, Embedder, PackedView
from mmtool.models.fusion import Grouping, Trunk, masked_mean
from mmtool.models.objectives import Context, Rows
from mmtool.models.tasks import TaskTable, balancer, build_table


@dataclass
class ModelConfig:
    """Everything that defines a model's architecture and losses (stored in `RUN/config.json`)."""

    size: str = "tiny"
    """Size preset (`mmtool ls sizes`): tiny, small, base — d_model, layers, heads, MLP width."""
    fusion: str = "early"
    """Where modalities meet (`mmtool ls fusions`): early, mid, late."""
    fusion_layer: int = 1
    """mid fusion: layers of per-modality streams before the joint layers (1 ≤ k < layers)."""
    attention: str | None = None
    """Attention backend (`mmtool ls attention`); None: the documented fastest for the device."""
    objectives: dict[str, float] = field(default_factory=lambda: {"next-token": 1.0, "masked-patch": 1.0})
    """Objective → loss weight; names take options as `NAME:key=value:...` (`mmtool ls objectives`;
    `objectives.parse_objectives` reads the flag form `next-token=1,masked-patch:mask_ratio=0.75=1`)."""
    folder_objectives: list[dict[str, float] | None] = field(default_factory=list)
    """Per data folder (in `--data` order), its own objectives → loss weights, replacing
    `objectives` for that folder (None: the run's). Filled from `--data DIR=W:objectives=...`
    and mixture YAMLs by `mmtool train`; names may be task presets (`mmtool ls task-presets`)."""
    task_balance: str = "none"
    """How tasks' loss scales are evened out (`mmtool ls balancers`): none, loss-scale, uncertainty."""
    mask_ratio: float = 0.5
    """Share of each segment's tokens that masked-patch / masked-token mask."""
    max_positions: int = 4096
    """Longest sample (in tokens) the learned position table covers."""


@dataclass
class ModelOutput:
    """What one forward pass returns.

    Attributes:
        loss: scalar Σ weight · objective loss.
        losses: per objective name, the scalar (attached) loss: the mean over its counted rows
            (predicted tokens, masked patches, contrastive rows); 0 (attached) when the batch has none.
        by_stream: detached mean loss per "objective/stream key" (e.g. "next-token/text:wordpiece")
            or "contrastive/modA+modB", only for groups that the batch has.
        by_sample_loss: [B] detached Σ weight · (the sample's mean loss under each objective).
        tokens: real tokens in the batch.
        counted: the objectives that had rows in this batch (the others' losses are the zeros).
        by_modality: detached share of `loss` that each scored modality's rows make up: Σ over
            objectives of weight · (its rows' part of the objective loss), a pair's rows ("image+text")
            split half and half. The values sum to `loss`. Only modalities with counted rows.
        modality_losses: the same, attached (for gradients per modality, `probes.trunk_grad_norms`).
        hidden: the final hidden states `[N, d]` (attached): where the objectives' gradients enter the trunk.
        by_task: detached mean loss of each (folder, objective) task over its targets in the batch.
        task_losses: per (folder, objective), its attached part of `loss` (for gradient shares).
        by_task_part: the same, detached (Σ = `loss` without a balancer's extra term).
        counts: Σ row weight (counted targets) behind each figure: per objective name, per
            "objective/stream key" of `by_stream`, and per (folder, objective) of `by_task` — what
            a token-weighted mean over micro-batches and ranks weighs them by (`train.metrics`).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    by_stream: dict[str, float]
    by_sample_loss: Tensor
    tokens: int
    counted: tuple[str, ...] = ()
    by_modality: dict[str, float] = field(default_factory=dict)
    modality_losses: dict[str, Tensor] = field(default_factory=dict)
    hidden: Tensor | None = None
    by_task: dict[tuple[int, str], float] = field(default_factory=dict)
    task_losses: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    by_task_part: dict[tuple[int, str], float] = field(default_factory=dict)
    counts: dict[Any, float] = field(default_factory=dict)


class UnifiedModel(nn.Module):
    """One transformer over every stream of a mixture, trained by weighted objectives.

    Build it with `build_model`; see the module docstring for the design decisions.

    Attributes:
        keep_padding: compute padded batches *with* their padding — linear layers on all B·L
            slots, attention as one SDPA with key-padding masks — instead of gathering the real
            slots first (the default). Same losses either way (to float tolerance); set it to
            measure what padding costs a conventional padded implementation (benchmarks).
    """

    keep_padding: bool = False

    def __init__(self, cfg: ModelConfig, streams: list[Stream], size: ModelSize, embedder: Embedder,
                 trunk: Trunk, objectives: nn.ModuleDict, table: TaskTable):
        super().__init__()
        self.cfg, self.streams, self.size = cfg, list(streams), size
        self.embedder, self.trunk, self.objectives = embedder, trunk, objectives
        self.table = table
        self.weights = table.default_weights()
        self.register_buffer("task_weight", table.weights.clone(), persistent=False)  # [F, O]
        self.register_buffer("task_member", table.member.clone(), persistent=False)  # [F, O]
        self.balancer = balancer(cfg.task_balance, *table.weights.shape)
        self.fusion = trunk.fusion
        self.causal = any(o.causal for o in objectives.values())
        self.modalities, mod = embedder.modality_of_stream()
        self._stream_modality = {st.key: st.modality for st in self.streams}
        self._shares_cache: dict[tuple, Tensor] = {}
        self.register_buffer("modality_of_stream", torch.tensor(mod, dtype=torch.long), persistent=False)
        self._backends: dict[str, AttentionBackend] = {}
        self.init_weights()

    # -- setup -----------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """N(0, 0.02) for linears and tables, zero biases, depth-scaled residual projections."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for enc in self.embedder.encoders.values():
            if hasattr(enc, "vector"):
                nn.init.normal_(enc.vector, std=0.02)
        self.trunk.init_weights()

    def backend(self, device: torch.device) -> AttentionBackend:
        """The attention backend for `device` (checked once per device)."""
        key = str(device)
        if key not in self._backends:
            if self.cfg.attention is None:
                self._backends[key] = default_backend(device, requires_grad=True)
            else:
                self._backends[key] = get_backend(self.cfg.attention, device, requires_grad=True,
                                                  causal=self.causal)
        return self._backends[key]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the forward pass ------------------------------------------------------------------------
    def _groupings(self, view: PackedView) -> dict[str, Grouping]:
        out = {}
        for _, kind in self.fusion.phases():
            if kind not in out:
                out[kind] = Grouping.by_sample(view, self.causal) if kind == "sample" else \
                    Grouping.by_modality(view, self.modality_of_stream, len(self.modalities), self.causal)
        return out

    def _trunk(self, batch: Batch, view: PackedView,
               corruptions: dict[int, list[Corruption]] | None) -> tuple[Tensor, Grouping]:
        """(final normed hidden states [N, d] in packed order, the last layer's grouping)."""
        self.embedder.check(view)
        h = self.embedder(batch, view, corruptions)  # [N, d]
        groupings = self._groupings(view)
        hidden = self.trunk(h, groupings, self.backend(h.device), self.causal)  # [N, d]
        return hidden, groupings[self.fusion.final]

    @staticmethod
    def _means(view: PackedView, hidden: Tensor, group: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Mean hidden state per group id `[N]` (padding rows left out) → ([n, d], counts [n])."""
        if view.real is not None:
            group = torch.where(view.real, group, n)  # padding rows: a group of their own, dropped
        means, counts = masked_mean(hidden, group, n + 1)  # [n+1, d], [n+1]
        return means[:n], counts[:n]

    def _modality_pools(self, view: PackedView, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(mean hidden state of each modality of each sample [B, M, d], present bool [B, M])."""
        m = len(self.modalities)
        group = view.sample * m + self.modality_of_stream[view.stream.clamp(min=0)]  # [N]
        pools, counts = self._means(view, hidden, group, view.batch_size * m)  # [B·M, d], [B·M]
        real = torch.tensor([name != SEPARATOR for name in self.modalities], device=hidden.device)
        present = (counts.view(-1, m) > 0) & real[None, :]  # [B, M]
        return pools.view(-1, m, hidden.shape[1]), present

    def _tasks_of(self, view: PackedView, folder: Tensor) -> tuple[Tensor, Tensor | None]:
        """(loss weight of each sample's task per objective float [B, O], bool [B, O] whether the
        sample's folder trains the objective — None when every folder trains every objective)."""
        rows = self.task_weight.shape[0]
        if rows == 1:
            return self.task_weight.expand(len(view.folders), -1), None
        if max(view.folders, default=0) >= rows:
            raise MMToolError(f"batch has data folder {max(view.folders)} but the model's task table "
                              f"has {rows} folders (ModelConfig.folder_objectives)")
        return self.task_weight[folder], None if self.table.uniform else self.task_member[folder]

    @staticmethod
    def _restrict(batch: Batch, corruptions: dict[int, list[Corruption]],
                  active: Tensor) -> dict[int, list[Corruption]]:
        """Corruptions limited to the tokens of `active` samples (bool [B])."""
        out = {}
        for k, cs in corruptions.items():
            keep = active[batch["slot_sample"].long()[batch[f"s{k}.slot"].long()]]  # [n_k]
            out[k] = [dataclasses.replace(c, mask=c.mask & keep) for c in cs]
        return out

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> ModelOutput:
        view = PackedView.of(batch, self.keep_padding)
        folder = batch["sample_folder"].long()  # [B]
        task_w, member = self._tasks_of(view, folder)  # [B, O], bool [B, O] | None
        own, merged = self._corrupt(batch, view, generator, member)
        hidden, final = self._trunk(batch, view, merged)  # [N, d]
        n_f = max(self.task_weight.shape[0], max(view.folders, default=0) + 1)
        scored, losses, t_sum, t_cnt = self._score(batch, view, hidden, final, own, member, folder, n_f)
        if self.task_weight.shape[0] == 1:  # one task table row: balance per objective, all folders
            b_sum, b_cnt = t_sum.sum(0, keepdim=True), t_cnt.sum(0, keepdim=True)  # [1, O]
        else:
            b_sum, b_cnt = t_sum, t_cnt  # [F, O]
        mult, extra = self.balancer(b_sum / b_cnt.clamp(min=1e-12), b_cnt > 0)  # [F or 1, O] each
        total, by_sample, by_modality, task_part, stats = self._combine(
            view, hidden, scored, folder, task_w, mult, extra, b_cnt, n_f)
        by_stream, modality_loss, by_task, counted, parts, counts = self._read_metrics(
            stats, by_modality, t_sum, t_cnt, task_part)
        names = list(self.objectives)
        counts = {(k[0], names[k[1]]) if isinstance(k, tuple) else k: c for k, c in counts.items()}
        # The attached scalars are cloned, not indexed views: FSDP2 hooks every output tensor and
        # warns (once per rank and run) about views, which an in-place op could detach from its hook.
        return ModelOutput(total, losses, by_stream, by_sample.detach(), sum(view.seqlens), counted,
                           modality_loss, {m: by_modality[i].clone() for i, m in enumerate(self.modalities)
                                           if m in modality_loss}, hidden,
                           {(f, names[o]): v for (f, o), v in by_task.items()},
                           {(f, names[o]): task_part[f, o].clone() for f, o in by_task},
                           {(f, names[o]): parts[f * len(names) + o] for f, o in by_task}, counts)

    def _corrupt(self, batch: Batch, view: PackedView, generator: torch.Generator | None,
                 member: Tensor | None) -> tuple[dict[str, dict[int, list[Corruption]]], dict[int, list[Corruption]]]:
        """(each objective's input corruptions per stream, all of them per stream), drawn in
        objective order, then stream order: one draw sequence per batch. `member`: bool [B, O]
        (which samples each objective scores) or None (all)."""
        own = {}
        for o, (name, obj) in enumerate(self.objectives.items()):
            corruptions = obj.corrupt(batch, view, generator)
            own[name] = corruptions if member is None else self._restrict(batch, corruptions, member[:, o])
        merged: dict[int, list[Corruption]] = {}
        for per_stream in own.values():
            for k, cs in per_stream.items():
                merged.setdefault(k, []).extend(cs)
        return own, merged

    def _score(self, batch: Batch, view: PackedView, hidden: Tensor, final: Grouping,
               own: dict[str, dict[int, list[Corruption]]], member: Tensor | None, folder: Tensor, n_f: int
               ) -> tuple[list[tuple[int, str, Rows, Tensor, Tensor]], dict[str, Tensor], Tensor, Tensor]:
        """Each objective's rows on the hidden states `[N, d]`.

        Returns:
            (scored: (objective number, name, rows, row weights [m], each row's part of the
            objective's plain loss [m]) for objectives with rows; plain loss per objective (a zero
            that keeps the graph when it has none); [F, O] Σ weighted loss and [F, O] Σ weight per
            (folder, objective)).
        """
        cache: dict[str, tuple[Tensor, Tensor]] = {}

        def pools() -> tuple[Tensor, Tensor]:  # per-modality means, computed once if asked for
            if "pools" not in cache:
                cache["pools"] = self._modality_pools(view, hidden)
            return cache["pools"]

        scored: list[tuple[int, str, Rows, Tensor, Tensor]] = []  # (o, name, rows, row weights, c)
        t_sum = hidden.new_zeros(n_f, len(self.objectives), dtype=torch.float32)  # [F, O] Σ loss
        t_cnt = torch.zeros_like(t_sum)  # [F, O] Σ weight
        losses: dict[str, Tensor] = {}
        for o, (name, obj) in enumerate(self.objectives.items()):
            ctx = Context(batch, view, hidden, final.prev, self.embedder, own[name], pools,
                          self.modalities, self.modality_of_stream, None if member is None else member[:, o])
            rows = obj(ctx)
            if rows is None:  # nothing of this objective in the batch: a zero that keeps the graph
                losses[name] = hidden.sum() * 0.0
                continue
            w = rows.weight if member is None else rows.weight * member[rows.sample, o]  # [m]
            wl = rows.loss * w  # [m]
            c = wl / row_denominators(w, rows.key, len(rows.keys), getattr(obj, "per_stream", False))  # [m]
            losses[name] = c.sum()  # the objective's plain loss over its targets
            f = folder[rows.sample]  # [m]
            t_sum[:, o] = t_sum[:, o].index_add(0, f, wl.detach().float())
            t_cnt[:, o] = t_cnt[:, o].index_add(0, f, w.detach().float())
            scored.append((o, name, rows, w, c))
        return scored, losses, t_sum, t_cnt

    def _combine(self, view: PackedView, hidden: Tensor, scored: list[tuple[int, str, Rows, Tensor, Tensor]],
                 folder: Tensor, task_w: Tensor, mult: Tensor, extra: Tensor | None, b_cnt: Tensor, n_f: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[tuple[str, list[str], Tensor]]]:
        """The total loss — each scored row's part times its task weight and balancer multiplier
        (`mult` [F or 1, O]), plus the balancer's `extra` term — and its parts.

        Returns:
            (total, [B] loss by sample (of detached parts), [M] each modality's part (attached),
            [F, O] each task's part, per objective (name, keys, [2, K] Σ loss and Σ
            weight per key)).
        """
        b = view.batch_size
        total = hidden.new_zeros(())
        if extra is not None:  # Σ r · (each task's share of its objective's targets)
            total = total + (extra * b_cnt / b_cnt.sum(0, keepdim=True).clamp(min=1e-12)).sum()
        by_sample = torch.zeros(b, device=hidden.device)
        by_modality = hidden.new_zeros(len(self.modalities), dtype=torch.float32)  # [M] Σ = total
        task_part = hidden.new_zeros(n_f, len(self.objectives), dtype=torch.float32)  # [F, O]
        stats: list[tuple[str, list[str], Tensor]] = []
        for o, name, rows, w, c in scored:
            f = folder[rows.sample]  # [m]
            cw = c * task_w[rows.sample, o] * mult[f if len(mult) > 1 else 0, o]  # [m] each target's part
            total = total + cw.sum()
            k = len(rows.keys)
            part = torch.zeros(k, device=c.device).index_add(0, rows.key, cw.float())  # [K] attached
            by_modality = by_modality + part @ self._key_shares(rows.keys, c.device)
            task_part[:, o] = task_part[:, o].index_add(0, f, cw.float())
            d = (rows.loss * w).detach()
            s_sum = torch.zeros(b, device=d.device).index_add(0, rows.sample, d)  # [B]
            s_cnt = torch.zeros(b, device=d.device).index_add(0, rows.sample, w.detach())  # [B]
            by_sample = by_sample + task_w[:, o] * s_sum / s_cnt.clamp(min=1.0)
            k_sum = torch.zeros(k, device=d.device).index_add(0, rows.key, d)  # [K]
            k_cnt = torch.zeros(k, device=d.device).index_add(0, rows.key, w.detach())  # [K]
            stats.append((name, rows.keys, torch.stack([k_sum, k_cnt])))
        return total, by_sample, by_modality, task_part, stats

    def _read_metrics(self, stats: list[tuple[str, list[str], Tensor]], by_modality: Tensor, t_sum: Tensor,
                      t_cnt: Tensor, task_part: Tensor) -> tuple[dict[str, float], dict[str, float],
                                                                 dict[tuple[int, int], float], tuple[str, ...],
                                                                 list[float], dict[Any, float]]:
        """(by_stream, by_modality, by_task {(folder, objective index): mean}, counted objectives,
        each task's part of the loss [F·O], the row weights behind them (`ModelOutput.counts`, tasks
        by objective index)) from one device→host read of every metric."""
        by_stream: dict[str, float] = {}
        counts: dict[Any, float] = {}
        if not stats:
            return by_stream, {}, {}, (), [], counts
        host = torch.cat([t.flatten() for *_, t in stats] + [by_modality.detach(), t_sum.flatten(),
                                                               t_cnt.flatten(), task_part.detach().flatten()]).tolist()
        at, counted = 0, []
        for name, keys, t in stats:
            k = len(keys)
            sums, cnts = host[at:at + k], host[at + k:at + 2 * k]
            at += 2 * k
            by_stream.update({f"{name}/{key}": s / c for key, s, c in zip(keys, sums, cnts) if c > 0})
            counts.update({f"{name}/{key}": c for key, c in zip(keys, cnts) if c > 0})
            if sum(cnts) > 0:
                counted.append(name)
                counts[name] = sum(cnts)
        m, cells = len(self.modalities), t_sum.numel()
        mods, sums = host[at:at + m], host[at + m:at + m + cells]
        cnts, parts = host[at + m + cells:at + m + 2 * cells], host[at + m + 2 * cells:]
        o_n = t_sum.shape[1]
        by_task = {(i // o_n, i % o_n): s / c for i, (s, c) in enumerate(zip(sums, cnts)) if c > 0}
        counts.update({(i // o_n, i % o_n): c for i, c in enumerate(cnts) if c > 0})
        scored = {m for key in by_stream for m in self._key_modalities(key.split("/", 1)[1])}
        return by_stream, {name: v for name, v in zip(self.modalities, mods) if name in scored}, by_task, \
            tuple(counted), parts, counts

    def _key_modalities(self, key: str) -> list[str]:
        """The modalities a row group belongs to: a stream key's modality, or both of "image+text"."""
        if key in self._stream_modality:
            return [self._stream_modality[key]]
        return [m for m in key.split("+") if m in self.modalities]

    def _key_shares(self, keys: list[str], device: torch.device) -> Tensor:
        """[K, M]: row group k's share of each modality (1 for its stream's modality; ½ each for a pair)."""
        cache_key = (tuple(keys), str(device))
        if cache_key not in self._shares_cache:
            shares = torch.zeros(len(keys), len(self.modalities))
            for i, key in enumerate(keys):
                mods = self._key_modalities(key)
                for m in mods:
                    shares[i, self.modalities.index(m)] = 1.0 / len(mods)
            self._shares_cache[cache_key] = shares.to(device)
        return self._shares_cache[cache_key]

    def hidden_states(self, batch: Batch) -> tuple[Tensor, PackedView]:
        """Final hidden states, uncorrupted: ([N, d], the view that says which sample, position and
        stream each row is). Rows are the real tokens in packed order (with `keep_padding`, a
        padded batch's B·L slots, `view.real` marking the real ones)."""
        view = PackedView.of(batch, self.keep_padding)
        return self._trunk(batch, view, None)[0], view

    def modality_pools(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(mean final hidden state of each modality of each sample [B, M, d], present bool [B, M]),
        uncorrupted: what the contrastive objective pools (modality m is `self.modalities[m]`)."""
        hidden, view = self.hidden_states(batch)  # [N, d]
        return self._modality_pools(view, hidden)

    def pooled(self, batch: Batch) -> Tensor:
        """[B, d] one vector per sample: the mean of its tokens' final hidden states (early, mid),
        or the late-fusion head's combination of its per-modality means (late)."""
        hidden, view = self.hidden_states(batch)  # [N, d]
        sample_mean, _ = self._means(view, hidden, view.sample, view.batch_size)  # [B, d]
        pools, present = self._modality_pools(view, hidden) if self.fusion.final == "modality" \
            else (None, None)
        return self.fusion.pool(sample_mean, pools, present)  # [B, d]


def row_denominators(weight: Tensor, key: Tensor, n_keys: int, per_stream: bool) -> Tensor:
    """What each row's weighted loss is divided by, so that Σ wl / den is the objective's loss.

    Pooled (the default): the mean over counted rows, so a group with more rows counts more — right
    for next-token and masked-token, where every predicted token is one unit of the same task (the
    LM norm; its exp is the perplexity): den = Σ weight. Per stream (`per_stream`, masked-patch's
    default): the mean of each group's own mean, over the groups that have rows — each stream
    (image, audio) counts equally, however many patches it has: den = (group's Σ weight) · groups.

    Args:
        weight: [m] the row weights; key: long [m] each row's group (< n_keys).
    Returns:
        [m] positive denominators.
    """
    if per_stream:
        k_cnt = torch.zeros(n_keys, device=weight.device, dtype=weight.dtype).index_add(0, key, weight)  # [K]
        groups = (k_cnt > 0).sum().clamp(min=1)
        return k_cnt[key].clamp(min=1e-12) * groups  # [m]
    return weight.sum().clamp(min=1.0).expand_as(weight)  # [m]


def build_model(cfg: ModelConfig, streams: list[Stream]) -> UnifiedModel:
    """Builds the model that `cfg` describes for a mixture with these `streams` (`TokenIndex.streams`).

    Raises:
        MMToolError: an unknown size, fusion, attention backend or objective (with close matches),
            a bad option, or an objective the streams cannot feed (naming what is missing).
    """
    if not streams:
        raise MMToolError("the data has no streams to model")
    if cfg.attention is not None:
        ATTENTION.get(cfg.attention)  # unknown names fail now; availability is checked per device
    size = model_size(cfg.size)
    embedder = build_embedder(streams, size, cfg.max_positions)
    trunk = build_trunk(size, cfg.fusion, cfg.fusion_layer)
    table = build_table(cfg.objectives, cfg.folder_objectives)
    objectives = build_objectives(table.specs, streams, size, cfg.mask_ratio)
    return UnifiedModel(cfg, streams, size, embedder, trunk, objectives, table)
