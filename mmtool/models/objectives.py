"""Self-supervised objectives: registered, weighted, each a small module with its own heads.

An objective may first *corrupt* the input (`corrupt`: MAE / BERT masks, drawn from the caller's
`torch.Generator` so a run is reproducible and resumable), then scores the trunk's output
(`forward`) as `Rows`: one loss per predicted token (or per side of a contrastive pair), with a 0/1
weight, the sample it belongs to and a stream key for metrics. The model reduces rows to the
objective's loss — the mean over counted rows, or, for an objective whose `per_stream` is true
(masked-patch by default), the mean over streams of each stream's mean (`model.row_denominators`) — and
to per-sample, per-stream and per-modality numbers.

Objectives are named in `ModelConfig.objectives` as `NAME[:key=value[:key=value...]]`, e.g.
`next-token:observations=true` or `masked-patch:modalities=image+audio+reward:mask_ratio=0.75`
(list values joined by `+`). `parse_objectives` reads a whole flag value, objectives separated by
commas, each with an optional `=WEIGHT`: `next-token=1,masked-patch:mask_ratio=0.75=0.5`.

How they share one causal trunk (see also `UnifiedModel`): attention is causal when any objective
needs it (`next-token`), else bidirectional. Under causal attention the masked objectives predict a
masked token *at its own position* from the visible context before it (its own input is the mask,
so nothing leaks); that is weaker than bidirectional MAE/BERT but keeps one forward pass for every
objective. When masks and next-token share a pass, next-token reads a partly masked context
(a denoising variant); its targets are always the original tokens.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmtool.models.keyed_random import keyed_uniform, stream_token_keys
from mmtool.data.batch import Batch
from mmtool.data.index import SEPARATOR, Stream, role_code
from mmtool.config import parse_value
from mmtool.errors import MMToolError
from mmtool.models.encoders import Corruption, Embedder, PackedView, is_separator
from mmtool.registry import Registry

OBJECTIVES: Registry[type["Objective"]] = Registry(
    "objectives", "self-supervised losses, weighted in ModelConfig.objectives as NAME[:key=value...]")

PATCH_MODALITIES = ("image", "audio")
"""Modalities whose vector tokens `masked-patch` reconstructs by default."""


@dataclass
class Rows:
    """Per-row losses of one objective on one batch.

    Attributes:
        loss: float [m] loss of each row; weight: float [m] 1 where the row counts, else 0.
        sample: long [m] batch-local sample of each row; key: long [m] index into `keys`.
        keys: metric names of the row groups (e.g. stream keys, "image+text").
    """

    loss: Tensor
    weight: Tensor
    sample: Tensor
    key: Tensor
    keys: list[str]

    @staticmethod
    def cat(parts: list["Rows"], keys: list[str]) -> "Rows | None":
        if not parts:
            return None
        return Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("loss", "weight", "sample", "key")),
                    keys)


@dataclass
class Context:
    """What an objective sees after the trunk.

    Attributes:
        hidden: [N, d] final (normed) hidden states, packed order.
        prev: long [N] token before each token in its last-layer attention sequence (-1: none).
        corruptions: this objective's own `corrupt` result.
        pools: () → (per-modality mean hidden [B, M, d], present bool [B, M]); computed once.
        modalities: modality names (index m of `pools`); modality_of_stream: [K] m of each stream.
        active: bool [B] the samples whose folder trains this objective (None: all of them). The
            model zeroes the rows of other samples; objectives that compare samples (contrastive)
            also leave them out as negatives.
    """

    batch: Batch
    view: PackedView
    hidden: Tensor
    prev: Tensor
    embedder: Embedder
    corruptions: dict[int, list[Corruption]]
    pools: Callable[[], tuple[Tensor, Tensor]]
    modalities: list[str]
    modality_of_stream: list[int] = field(default_factory=list)
    active: Tensor | None = None


def tied_head_loss(rows: Tensor, head: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of a tied output head: logits `rows [n, d] @ head [V, d]ᵀ` against `target`
    long [n] → loss [n] (a target of -100 gives 0: padding rows of a compiled call).

    With a 30k-word text vocabulary the [n, V] logits are the largest tensors of a step, and the
    log-softmax over them is memory-bound: `mmtool.models.compile` fuses it when compiling.
    """
    return F.cross_entropy((rows @ head.T).float(), target, reduction="none")  # [n]


class Objective(nn.Module):
    """Base class. Subclasses set `causal` if they need causal attention and implement `forward`.

    Constructors take `(streams, d_model, mask_ratio, **options)`; options are keyword-only
    arguments with defaults, settable as `NAME:key=value`. A constructor raises `MMToolError` when
    the streams cannot feed the objective, naming what is missing.
    """

    causal: bool = False
    uses_mask_ratio: bool = False  # accepts a per-objective `mask_ratio=` option
    head_loss = staticmethod(tied_head_loss)  # `mmtool.models.compile` swaps in a compiled one

    def __init__(self, streams: list[Stream], d_model: int, mask_ratio: float):
        super().__init__()
        self.streams = list(streams)

    def corrupt(self, batch: Batch, view: PackedView,
                generator: torch.Generator | None) -> dict[int, list[Corruption]]:
        """Input corruptions by stream (default: none)."""
        return {}

    def forward(self, ctx: Context) -> Rows | None:
        raise NotImplementedError

    def _missing(self, what: str) -> MMToolError:
        have = ", ".join(f"{s.key} ({s.kind})" for s in self.streams if not is_separator(s)) or "none"
        return MMToolError(f"objective {self.registry_name!r} needs {what}; the data has: {have}. "
                           f"Drop it from --objectives or add data that has it")


# -- helpers -------------------------------------------------------------------------------------
def parse_objective(spec: str) -> tuple[str, dict[str, Any]]:
    """`NAME[:key=value...]` → (name, options); options are separated by `:` (or `,` in YAML keys)."""
    name, _, opts = spec.partition(":")
    options = {}
    for pair in filter(None, opts.replace(",", ":").split(":")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise MMToolError(f"objective {spec!r}: option {pair!r} is not key=value")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    return name.strip(), options


def parse_objectives(text: str) -> dict[str, float]:
    """A flag value `SPEC[=WEIGHT],SPEC[=WEIGHT],...` → {spec: weight} (weight 1 when omitted).

    `=WEIGHT` is the last `=` of an item unless that `=` gives an option its value
    (`masked-patch:mask_ratio=0.75` has weight 1; `masked-patch:mask_ratio=0.75=2` has weight 2).
    """
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        spec, eq, weight = item.rpartition("=")
        option_value = ":" in spec and "=" not in spec.rsplit(":", 1)[1]
        if not eq or option_value:
            spec, weight = item, "1"
        try:
            out[spec.strip()] = float(weight)
        except ValueError:
            if ":" not in item:
                raise MMToolError(f"--objectives: the weight of {spec.strip()!r} must be a number, "
                                  f"got {weight!r}") from None
            out[item] = 1.0  # `NAME:flag=true`: the value belongs to the option
    return out


def build_objective(spec: str, streams: list[Stream], d_model: int, mask_ratio: float) -> "Objective":
    """Looks up and builds objective `spec` (`NAME[:key=value...]`), checking its options."""
    name, options = parse_objective(spec)
    cls = OBJECTIVES.get(name)
    known = [p.name for p in inspect.signature(cls.__init__).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if cls.uses_mask_ratio:
        known.append("mask_ratio")
        mask_ratio = options.pop("mask_ratio", mask_ratio)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MMToolError(f"objective {name!r} has no option {', '.join(unknown)} "
                          f"(options: {', '.join(known) or 'none'})")
    return cls(streams, d_model, mask_ratio, **options)


def stream_masks(batch, targets: list[int], ratio: float, generator: torch.Generator | None):
    """Yields (stream k, bool mask [n_k]) for each target stream present in `batch`: per segment,
    round(ratio · n) of its tokens. With a generator, each token's draw is keyed by the sample's
    number, the segment's and the token's place (`keyed_random`): the same tokens are masked in
    every layout (packed or padded) and for every shard size."""
    for k in targets:
        if k in batch.streams:
            seg, *keys = stream_token_keys(batch, k)  # [n_k] each
            noise = keyed_uniform(generator, *keys) if generator is not None else None
            yield k, segment_mask(seg, batch["seg_sample"].shape[0], ratio, generator, noise)  # [n_k]


def segment_mask(segment: Tensor, n_segments: int, ratio: float,
                 generator: torch.Generator | None, noise: Tensor | None = None) -> Tensor:
    """MAE-style masks: in every segment, exactly round(ratio · n) of its n tokens (at least one).

    Which tokens is random: the lowest `noise` values of each segment are masked. `noise` defaults
    to one uniform draw per token from `generator` in the order given (`stream_masks` passes draws
    keyed by what each token is instead).

    Args:
        segment: long [n] segment of each token (batch-local segment numbers < `n_segments`).
        noise: float [n] in [0, 1), or None.
    Returns:
        bool [n].
    """
    n, device = segment.shape[0], segment.device
    if noise is not None:
        noise = noise.to(device)  # [n]
    elif generator is not None:
        noise = torch.rand(n, generator=generator, device=generator.device).to(device)  # [n]
    else:
        noise = torch.rand(n, device=device)  # [n]
    order = torch.argsort(segment.double() + noise.double())  # [n] by segment, then by noise
    counts = torch.bincount(segment, minlength=n_segments)  # [G]
    first = torch.cumsum(counts, 0) - counts  # [G] where each segment starts in `order`
    rank = torch.empty_like(segment)
    rank[order] = torch.arange(n, device=device) - first[segment[order]]  # [n] rank within segment
    n_mask = torch.floor(counts.double() * ratio + 0.5).long().clamp(min=1)  # [G]
    return rank < n_mask[segment]  # [n]


def _stream_rows(ctx: Context, k: int) -> tuple[Tensor, Tensor]:
    """(packed index, sample) of every token of stream k: long [n_k] each."""
    idx = ctx.view.packed(ctx.batch[f"s{k}.slot"])  # [n_k]
    return idx, ctx.view.sample[idx]


def _check_ratio(name: str, ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise MMToolError(f"objective {name!r}: mask_ratio must be in (0, 1), got {ratio}")
    return float(ratio)


# -- objectives ----------------------------------------------------------------------------------
@OBJECTIVES.register("next-token")
class NextToken(Objective):
    """Next-token prediction on discrete streams; Gato loss mask: no loss on observations by default.

    Token t is predicted from the hidden state of the token before it *in its last-layer attention
    sequence* (`Context.prev`): the previous slot of the sample for early and mid fusion, the
    previous token of the same modality for late fusion (its per-modality streams never see other
    modalities). Separators and vector tokens are context, never targets. The output head of a
    stream is its (tied) embedding table.

    Options:
        observations: also predict observation tokens (Gato does not).
        modalities: only predict these modalities (default: every discrete one).
        after: only predict tokens that come after a token of these modalities in their sample
            (`any`: of any modality other than the token's own) — the caption / transcription
            mask: `next-token:modalities=text:after=image`. Default: every token.
        roles: only predict tokens of segments with these roles — the chat mask
            `next-token:roles=assistant` (preset `chat`): a conversation's assistant turns are
            targets, its user and system turns (and images) are context only. Default: every role.
    """

    causal = True

    def __init__(self, streams, d_model, mask_ratio, *, observations: bool = False,
                 modalities: list[str] | str | None = None, after: list[str] | str | None = None,
                 roles: list[str] | str | None = None):
        super().__init__(streams, d_model, mask_ratio)
        only = [modalities] if isinstance(modalities, str) else modalities
        self.after = [after] if isinstance(after, str) else after
        self.roles = [roles] if isinstance(roles, str) else roles
        if self.roles is not None and not (self.roles and all(isinstance(r, str) and r for r in self.roles)):
            raise MMToolError(f"objective 'next-token': roles must be role names joined by '+' "
                              f"(e.g. roles=assistant), got {roles!r}")
        self.role_codes = None if self.roles is None else [role_code(r) for r in self.roles]
        self.targets = [k for k, s in enumerate(streams) if s.kind == "ids"
                        and (observations or s.modality != "observation")
                        and (only is None or s.modality in only)]
        if not self.targets:
            raise self._missing("a discrete (ids) stream to predict, e.g. text or actions "
                                "(observations count only with next-token:observations=true)")
        if self.after is not None and self.after != ["any"]:
            have = {s.modality for s in streams if not is_separator(s)}
            if not have & set(self.after):
                raise self._missing(f"a stream of modality {' or '.join(self.after)} for after={'+'.join(self.after)}")

    def forward(self, ctx: Context) -> Rows | None:
        parts, keys = [], [self.streams[k].key for k in self.targets]
        first = self._first_positions(ctx) if self.after is not None else None
        for i, k in enumerate(self.targets):
            if k not in ctx.batch.streams:
                continue
            idx, sample = _stream_rows(ctx, k)  # [n_k]
            src = ctx.prev[idx]  # [n_k] the token that predicts each token of the stream
            head = ctx.embedder.encoders[str(k)].head_weight  # [V, d]
            target = ctx.batch[f"s{k}.ids"].long()  # [n_k]
            loss = self.head_loss(ctx.hidden[src.clamp(min=0)], head, target)  # [n_k]
            weight = (src >= 0).float()  # [n_k]
            if first is not None:
                weight = weight * self._follows(ctx, first, k, idx, sample).float()
            if self.role_codes is not None:
                weight = weight * self._has_role(ctx.batch, k).float()
            parts.append(Rows(loss, weight, sample, torch.full_like(sample, i), keys))
        return Rows.cat(parts, keys)

    def _has_role(self, batch: Batch, k: int) -> Tensor:
        """bool [n_k]: tokens of stream k whose segment's role is one of `roles`."""
        if "seg_role" not in batch:
            raise MMToolError("next-token:roles=... needs batches with segment roles (seg_role); "
                              "this batch has none")
        seg = batch["slot_segment"].long()[batch[f"s{k}.slot"].long()]  # [n_k]
        role = batch["seg_role"].long()[seg]  # [n_k]
        return torch.isin(role, torch.tensor(self.role_codes, dtype=torch.long, device=role.device))

    @staticmethod
    def _first_positions(ctx: Context) -> Tensor:
        """long [B, M]: the first position of modality m in sample b (a large number: none)."""
        view, m = ctx.view, len(ctx.modalities)
        mod_of = torch.as_tensor(ctx.modality_of_stream, device=view.pos.device)  # [K]
        real = view.stream >= 0 if view.real is None else view.real  # [N]
        group = view.sample * m + mod_of[view.stream.clamp(min=0)]  # [N]
        big = torch.iinfo(torch.long).max
        first = torch.full((view.batch_size * m,), big, dtype=torch.long, device=view.pos.device)
        first.scatter_reduce_(0, group[real], view.pos[real], "amin")  # [B·M]
        return first.view(view.batch_size, m)

    def _follows(self, ctx: Context, first: Tensor, k: int, idx: Tensor, sample: Tensor) -> Tensor:
        """bool [n_k]: tokens of stream k preceded in their sample by a token of an `after` modality."""
        own = ctx.modalities.index(self.streams[k].modality)
        cols = [m for m, name in enumerate(ctx.modalities) if name != SEPARATOR and (
            (self.after == ["any"] and m != own) or name in self.after)]
        if not cols:
            return torch.zeros_like(sample, dtype=torch.bool)
        earliest = first[:, cols].amin(1)  # [B] first position of any `after` modality
        return ctx.view.pos[idx] > earliest[sample]  # [n_k]


@OBJECTIVES.register("masked-token")
class MaskedToken(Objective):
    """BERT-style: replace a mask_ratio share of each discrete segment by [MASK], predict the originals.

    The masked token is predicted at its own position (its input there is [MASK], so under causal
    attention it is predicted from the visible tokens before it). Always [MASK], no 80/10/10 mix.

    Options:
        modalities: only mask these modalities (default: every discrete one).
        mask_ratio: overrides the model's mask_ratio for this objective.
    """

    uses_mask_ratio = True

    def __init__(self, streams, d_model, mask_ratio, *, modalities: list[str] | str | None = None):
        super().__init__(streams, d_model, mask_ratio)
        only = [modalities] if isinstance(modalities, str) else modalities
        self.ratio = _check_ratio("masked-token", mask_ratio)
        self.targets = [k for k, s in enumerate(streams)
                        if s.kind == "ids" and (only is None or s.modality in only)]
        if not self.targets:
            raise self._missing("a discrete (ids) stream to mask, e.g. text")

    def corrupt(self, batch, view, generator):
        return {k: [Corruption(mask, ids=torch.full_like(mask, self.streams[k].vocab_size, dtype=torch.long))]
                for k, mask in stream_masks(batch, self.targets, self.ratio, generator)}  # [MASK] row

    def forward(self, ctx: Context) -> Rows | None:
        parts, keys = [], [self.streams[k].key for k in self.targets]
        for i, k in enumerate(self.targets):
            if k not in ctx.corruptions:
                continue
            sel = ctx.corruptions[k][0].mask.nonzero().squeeze(1)  # [m] masked tokens
            idx, sample = _stream_rows(ctx, k)
            idx, sample = idx[sel], sample[sel]  # [m]
            head = ctx.embedder.encoders[str(k)].head_weight  # [V, d]
            target = ctx.batch[f"s{k}.ids"].long()[sel]  # [m]
            loss = self.head_loss(ctx.hidden[idx], head, target)  # [m]
            parts.append(Rows(loss, torch.ones_like(loss), sample, torch.full_like(sample, i), keys))
        return Rows.cat(parts, keys)


@OBJECTIVES.register("masked-patch")
class MaskedPatch(Objective):
    """MAE-style: replace a mask_ratio share of each image/audio segment's patches, reconstruct them (MSE).

    Masked patches enter the trunk as a learned mask vector (one per stream) plus their stream,
    position and segment-position embeddings; a linear decoder per stream maps the hidden state back
    to the patch vector. A patch's loss is the squared error averaged over the vector's entries; the
    objective's loss is, by default, the mean over masked patches *per stream*, then the mean over
    the streams the batch has (so image and audio count equally, whatever their patch counts).

    Silence is not a target: when a stream's tokenizer config names a `floor` (the value of silence
    and padding, e.g. -1.0 for `logmel` audio), patches whose every value is at or below the floor
    are never masked (they stay visible as context) and never scored.

    Options:
        modalities: vector modalities to reconstruct (default: image+audio).
        mask_ratio: overrides the model's mask_ratio for this objective.
        norm_pix: reconstruct each patch normalised by its own mean and variance (MAE's
            `norm_pix_loss`: (x − mean) / sqrt(var + 1e-6), unbiased var over the patch's entries).
        per_stream: average per stream, then across streams (default); false: one mean over every
            masked patch of the batch (streams weighted by their patch counts).
    """

    uses_mask_ratio = True

    def __init__(self, streams, d_model, mask_ratio, *, modalities: list[str] | str | None = None,
                 norm_pix: bool = False, per_stream: bool = True):
        super().__init__(streams, d_model, mask_ratio)
        only = [modalities] if isinstance(modalities, str) else (modalities or list(PATCH_MODALITIES))
        self.ratio = _check_ratio("masked-patch", mask_ratio)
        self.norm_pix, self.per_stream = bool(norm_pix), bool(per_stream)
        self.targets = [k for k, s in enumerate(streams) if s.kind == "values" and s.modality in only]
        if not self.targets:
            raise self._missing(f"a patch (values) stream of modality {' or '.join(only)}")
        self.floors = {k: streams[k].config["floor"] for k in self.targets
                       if isinstance(streams[k].config.get("floor"), (int, float))}
        self.mask_vectors = nn.ParameterDict(
            {str(k): nn.Parameter(torch.randn(d_model) * 0.02) for k in self.targets})
        self.decoders = nn.ModuleDict({str(k): nn.Linear(d_model, streams[k].dim) for k in self.targets})

    def silent(self, batch: Batch, k: int) -> Tensor | None:
        """bool [n_k]: the patches of stream k entirely at its tokenizer's floor (None: no floor)."""
        if k not in self.floors:
            return None
        return (batch[f"s{k}.values"].float() <= self.floors[k] + 1e-6).all(1)  # [n_k]

    def corrupt(self, batch, view, generator):
        out = {}
        for k, mask in stream_masks(batch, self.targets, self.ratio, generator):  # same draws always
            silent = self.silent(batch, k)
            if silent is not None:
                mask = mask & ~silent  # [n_k] silence stays visible and is never a target
            out[k] = [Corruption(mask, vector=self.mask_vectors[str(k)])]
        return out

    def forward(self, ctx: Context) -> Rows | None:
        parts, keys = [], [self.streams[k].key for k in self.targets]
        for i, k in enumerate(self.targets):
            if k not in ctx.corruptions:
                continue
            idx, sample = _stream_rows(ctx, k)  # [n_k]
            pred = self.decoders[str(k)](ctx.hidden[idx]).float()  # [n_k, dim]
            target = ctx.batch[f"s{k}.values"].float()  # [n_k, dim]
            if self.norm_pix:
                target = (target - target.mean(1, keepdim=True)) / (target.var(1, keepdim=True) + 1e-6).sqrt()
            loss = ((pred - target) ** 2).mean(1)  # [n_k]
            weight = ctx.corruptions[k][0].mask.float()  # [n_k] masked patches only
            parts.append(Rows(loss, weight, sample, torch.full_like(sample, i), keys))
        return Rows.cat(parts, keys)


def info_nce(za: Tensor, zb: Tensor, valid: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between paired rows of `za`, `zb` `[B, e]` (unit vectors).

    Row b of `za` must pick row b of `zb` among the valid rows, and vice versa. Rows of samples that
    lack either modality (`valid` False) are neither queries nor negatives.

    Returns:
        (loss [2B]: a→b rows then b→a rows, weight [2B]: 1 for valid rows of a pair set of ≥ 2).
    """
    b = za.shape[0]
    logits = scale * za @ zb.T  # [B, B]
    both = valid[:, None] & valid[None, :]  # [B, B]
    target = torch.arange(b, device=za.device)  # [B]
    neg = torch.finfo(logits.dtype).min
    ab = logits.masked_fill(~both, neg).masked_fill(~valid[:, None], 0.0)  # invalid rows: finite
    ba = logits.T.masked_fill(~both, neg).masked_fill(~valid[:, None], 0.0)
    loss = torch.cat([F.cross_entropy(ab, target, reduction="none"),
                      F.cross_entropy(ba, target, reduction="none")])  # [2B]
    w = (valid & (valid.sum() >= 2)).to(loss.dtype)  # [B] a lone pair has no negatives
    return loss, torch.cat([w, w])


@OBJECTIVES.register("contrastive")
class Contrastive(Objective):
    """InfoNCE between the pooled vectors of two modalities of one sample, across the batch (CLIP).

    For every pair of (non-separator) modalities, the samples of the batch that have both are
    matched symmetrically; each modality of a sample is pooled as the mean of its tokens' final
    hidden states, projected by one shared linear layer and normalised. The temperature starts at
    0.07 and is learned as CLIP does (log-scale, logit scale capped at 100); `learn_temperature=false`
    fixes it. Batches where no pair of modalities occurs in ≥ 2 samples add 0.

    It aligns separate towers best: with `late` fusion the modalities of a sample never see each
    other before pooling (CLIP-like). With `early`/`mid` fusion they do, so the pooled vectors can
    share a sample signature through attention and the objective acts more as a consistency term.

    Options:
        temperature: initial (or fixed) temperature.
        learn_temperature: learn it (default true).
    """

    def __init__(self, streams, d_model, mask_ratio, *, temperature: float = 0.07,
                 learn_temperature: bool = True):
        super().__init__(streams, d_model, mask_ratio)
        modalities = sorted({s.modality for s in streams if not is_separator(s)})
        if len(modalities) < 2:
            raise self._missing("two modalities in one sample (e.g. image and text)")
        self.proj = nn.Linear(d_model, d_model, bias=False)
        scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    def forward(self, ctx: Context) -> Rows | None:
        pools, present = ctx.pools()  # [B, M, d], [B, M]
        z = F.normalize(self.proj(pools).float(), dim=-1)  # [B, M, e]
        scale = self.log_scale.clamp(max=math.log(100.0)).exp()
        mods = [m for m, name in enumerate(ctx.modalities) if name != SEPARATOR]
        parts, keys = [], []
        b = pools.shape[0]
        sample = torch.arange(b, device=pools.device).repeat(2)  # [2B]
        active = ctx.active if ctx.active is not None else torch.ones_like(present[:, 0])  # [B]
        for i, a in enumerate(mods):
            for c in mods[i + 1:]:
                loss, w = info_nce(z[:, a], z[:, c], present[:, a] & present[:, c] & active, scale)
                parts.append(Rows(loss, w, sample, torch.full_like(sample, len(keys)), []))
                keys.append(f"{ctx.modalities[a]}+{ctx.modalities[c]}")
        return Rows.cat(parts, keys)
