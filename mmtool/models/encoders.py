"""Encoders: every token of every stream becomes one d-dimensional vector, in packed order.

A `Batch` keeps each stream's tokens apart (`s{k}.ids` or `s{k}.values`, with `s{k}.slot` saying
where each token sits in its sample). The `Embedder` calls one encoder per stream present (one call
per stream per batch, whatever the number of samples), scatters the results to their slots, and adds
what every token gets whatever its stream:

    h[t] = encoder_k(token)                    ids: table row; values: linear(+ sin-cos segment pos)
         + stream[k]                           learned, one vector per stream ("modality embedding")
         + position[slot_pos]                  learned absolute position within the sample
         + task[sample_folder]                 learned, one vector per data folder (the task token)

The result is always in *packed* order (`PackedView`): real tokens only, sample after sample. A
padded batch is gathered into that order here, so everything downstream — attention, losses,
random masks — computes exactly the same numbers for the packed and the padded layout of the same
samples (padding slots are simply never read).

Encoders are looked up in `ENCODERS` by the stream's key (e.g. "image:patches"), then its modality,
then its kind ("ids", "values", "none"); the built-ins are registered by kind, so a plug-in can
replace the encoder of one modality (say, a conv stem for "image") without touching the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from mmtool.data.batch import Batch
from mmtool.data.index import SEPARATOR, Stream
from mmtool.errors import MMToolError
from mmtool.registry import Registry

MAX_TASKS = 64
"""Rows of the task-embedding table: data folders (`sample_folder`) a model can tell apart."""

ENCODERS: Registry[type[nn.Module]] = Registry(
    "encoders", "token encoders, chosen per stream by key, then modality, then kind (ids/values/none)")


def sincos(pos: Tensor, dim: int) -> Tensor:
    """Fixed sine-cosine position codes (as in MAE): long [n] → float [n, dim]."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device) / max(half, 1))  # [dim/2]
    angle = pos.float()[:, None] * freq[None, :]  # [n, dim/2]
    out = torch.cat([angle.sin(), angle.cos()], dim=1)  # [n, 2·(dim/2)]
    return nn.functional.pad(out, (0, dim - 2 * half))  # [n, dim]


@ENCODERS.register("ids")
class TokenEmbedding(nn.Module):
    """Discrete tokens (text, actions, mu-law observations) → an embedding table of vocab+1 rows.

    The extra row, id `vocab_size`, is the [MASK] token of `masked-token`. The table doubles as the
    stream's output head (`head_weight`): next-token and masked-token logits are `h @ table[:vocab].T`.
    """

    def __init__(self, stream: Stream, d_model: int):
        super().__init__()
        if not stream.vocab_size:
            raise MMToolError(f"stream {stream.key} has ids but no vocab_size in its manifest; "
                              "re-run `mmtool preprocess` with a tokenizer that records it")
        self.vocab_size = int(stream.vocab_size)
        self.mask_id = self.vocab_size
        self.table = nn.Embedding(self.vocab_size + 1, d_model)

    def forward(self, tokens: Tensor, seg_pos: Tensor) -> Tensor:
        return self.table(tokens.long())  # [n, d]

    @property
    def head_weight(self) -> Tensor:
        return self.table.weight[:self.vocab_size]  # [V, d] tied output head


@ENCODERS.register("values")
class PatchEmbedding(nn.Module):
    """Vectors (image/audio patches, raw floats, embeddings) → linear, plus sin-cos position in segment.

    The within-segment position (`s{k}.pos`: which patch of the image, which frame of the clip) uses
    fixed sine-cosine codes, as MAE does: no parameters, and no limit on segment length.
    """

    def __init__(self, stream: Stream, d_model: int):
        super().__init__()
        if not stream.dim:
            raise MMToolError(f"stream {stream.key} has vectors of unknown size (no dim); the data "
                              "folders must hold at least one of its segments")
        self.dim = int(stream.dim)
        self.proj = nn.Linear(self.dim, d_model)

    def forward(self, tokens: Tensor, seg_pos: Tensor) -> Tensor:
        x = self.proj(tokens.float())  # [n, d]
        return x + sincos(seg_pos, x.shape[1]).to(x.dtype)  # [n, d]


@ENCODERS.register("none")
class SeparatorEmbedding(nn.Module):
    """Data-less tokens (the timestep separator) → one learned vector."""

    def __init__(self, stream: Stream, d_model: int):
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(d_model))

    def forward(self, tokens: Tensor | None, seg_pos: Tensor) -> Tensor:
        return self.vector.expand(seg_pos.shape[0], -1)  # [n, d]


def encoder_for(stream: Stream) -> type[nn.Module]:
    """The registered encoder class of `stream`: by key, else by modality, else by kind."""
    for name in (stream.key, stream.modality, stream.kind):
        if name in ENCODERS:
            return ENCODERS.get(name)
    return ENCODERS.get(stream.kind)  # raises, listing the known encoders


@dataclass
class PackedView:
    """Which token each row of the model's `[N, d]` tensors is: packed order, no padding.

    For a packed batch, row = slot. For a padded one (sample b in slots [b·L, b·L + seqlens[b])),
    the real slots are gathered sample after sample, so padding is never computed on. With
    `keep_padding` (to measure what padding costs), a padded batch keeps all B·L slots as rows
    instead; `real` then marks the real ones and attention masks the rest (`fusion.Grouping`).

    Attributes:
        seqlens: [B] real tokens per sample, on the host (attention backends plan with them).
        folders: [B] `sample_folder` on the host.
        cu_seqlens: int32 [B+1] where each sample's rows start.
        sample: long [N] sample of every row;  pos: long [N] its position in the sample;
        stream: long [N] its stream (-1 for padding); slot: long [N] its slot in the batch.
        width: padded row length L of the batch (0 for packed batches).
        real: bool [N] real rows, or None when every row is real.
    """

    seqlens: list[int]
    folders: list[int]
    cu_seqlens: Tensor
    sample: Tensor
    pos: Tensor
    stream: Tensor
    slot: Tensor
    width: int
    real: Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.sample.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self.seqlens)

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens, default=0)

    @staticmethod
    def of(batch: Batch, keep_padding: bool = False) -> "PackedView":
        device = batch["seqlens"].device
        b = batch.batch_size
        # One device→host read for everything the host needs (lengths plan attention; folders are
        # checked against the task table).
        host = torch.cat([batch["seqlens"], batch["sample_folder"]]).tolist()
        seqlens, folders = host[:b], host[b:]
        if batch.layout not in ("packed", "padded"):
            raise MMToolError(f"unknown batch layout {batch.layout!r}")
        width = batch.num_slots // b if batch.layout == "padded" and b else 0
        if width and keep_padding:  # every slot is a row; padding rows are masked, not dropped
            slot = torch.arange(batch.num_slots, device=device)  # [S]
            sample, pos = torch.div(slot, width, rounding_mode="floor"), slot % width  # [S]
            cu = torch.arange(b + 1, device=device) * width  # [B+1]
            stream = batch["slot_stream"].long()  # [S]
            return PackedView(seqlens, folders, cu.int(), sample, pos, stream, slot, 0, stream >= 0)
        n = sum(seqlens)
        lengths = batch["seqlens"].long()  # [B]
        cu = torch.zeros(b + 1, dtype=torch.long, device=device)
        cu[1:] = torch.cumsum(lengths, 0)  # [B+1]
        sample = torch.repeat_interleave(torch.arange(b, device=device), lengths, output_size=n)  # [N]
        rank = torch.arange(n, device=device) - cu[sample]  # [N] row within its sample
        slot = sample * width + rank if width else torch.arange(n, device=device)  # [N] real slots
        # The batch's own positions: equal to `rank` for every assembled batch; a batch rebuilt
        # without some tokens (`mmtool ablate --modes drop`) keeps the others where they were.
        pos = batch["slot_pos"].long()[slot]  # [N]
        stream = batch["slot_stream"].long()[slot]  # [N]
        return PackedView(seqlens, folders, cu.int(), sample, pos, stream, slot, width)

    def packed(self, slot: Tensor) -> Tensor:
        """Row indices of batch slots: long [n] → long [n]."""
        slot = slot.long()
        if self.width == 0:  # packed batch, or padded batch computed with its padding
            return slot
        b = torch.div(slot, self.width, rounding_mode="floor")  # [n] sample of the slot
        return self.cu_seqlens.long()[b] + slot - b * self.width  # [n]


@dataclass
class Corruption:
    """An objective's change to the input tokens of one stream (e.g. MAE / BERT masking).

    Attributes:
        mask: bool [n_k] which tokens of the stream are corrupted.
        ids: long [n_k] replacement ids (ids streams), or None.
        vector: [d] learned vector that replaces the encodings of masked tokens, or None.
    """

    mask: Tensor
    ids: Tensor | None = None
    vector: Tensor | None = None


class Embedder(nn.Module):
    """All streams' encoders plus the stream, position and task embeddings: Batch → h [N, d].

    Args:
        streams: the index's streams, in index order (stream k of the batch is `streams[k]`).
        d_model: width of the token vectors.
        max_positions: rows of the learned position table (longest sample the model takes).
    """

    def __init__(self, streams: list[Stream], d_model: int, max_positions: int):
        super().__init__()
        self.streams = list(streams)
        self.d_model = d_model
        self.max_positions = max_positions
        self.encoders = nn.ModuleDict({str(k): encoder_for(s)(s, d_model) for k, s in enumerate(streams)})
        self.stream_emb = nn.Embedding(len(streams), d_model)  # the modality embedding
        self.pos_emb = nn.Embedding(max_positions, d_model)  # absolute position in the sample
        self.task_emb = nn.Embedding(MAX_TASKS, d_model)  # the task token, per data folder

    def check(self, view: PackedView) -> None:
        """Refuses samples longer than the position table and folders beyond the task table."""
        if view.max_seqlen > self.max_positions:
            raise MMToolError(f"a sample has {view.max_seqlen} tokens but the model takes at most "
                              f"max_positions={self.max_positions}; raise max_positions")
        if view.folders and max(view.folders) >= MAX_TASKS:
            raise MMToolError(f"the model tells apart at most {MAX_TASKS} data folders (task "
                              f"embeddings); got folder number {max(view.folders)}")

    def forward(self, batch: Batch, view: PackedView,
                corruptions: dict[int, list[Corruption]] | None = None) -> Tensor:
        corruptions = corruptions or {}
        parts, where = [], []
        for k in batch.streams:
            info, enc = self.streams[k], self.encoders[str(k)]
            seg_pos = batch[f"s{k}.pos"].long()  # [n_k]
            tokens = (batch[f"s{k}.ids"].long() if info.kind == "ids" else
                      batch[f"s{k}.values"] if info.kind == "values" else None)
            for c in corruptions.get(k, []):  # ids corruptions act on the input ids
                if c.ids is not None:
                    tokens = torch.where(c.mask, c.ids, tokens)  # [n_k]
            x = enc(tokens, seg_pos).float()  # [n_k, d]
            for c in corruptions.get(k, []):  # vector corruptions replace the encodings
                if c.vector is not None:
                    x = torch.where(c.mask[:, None], c.vector.float()[None, :], x)  # [n_k, d]
            parts.append(x)
            where.append(view.packed(batch[f"s{k}.slot"]))  # [n_k]
        # Every real slot holds exactly one token of one stream: one scatter fills h.
        x = torch.cat(parts) if parts else torch.zeros(0, self.d_model)  # [N, d]
        h = x.new_zeros(view.n, self.d_model).index_copy(0, torch.cat(where), x)  # [N, d]
        folder = batch["sample_folder"].long()[view.sample]  # [N]
        shared = self.stream_emb(view.stream.clamp(min=0)) + self.pos_emb(view.pos) \
            + self.task_emb(folder)  # [N, d]
        if view.real is not None:  # padding rows stay zero
            shared = shared * view.real[:, None].to(shared.dtype)
        return h + shared  # [N, d]

    def modality_of_stream(self) -> tuple[list[str], list[int]]:
        """(modality names, modality index of every stream); the separator is a modality of its own."""
        names: list[str] = []
        for s in self.streams:
            if s.modality not in names:
                names.append(s.modality)
        return names, [names.index(s.modality) for s in self.streams]


def is_separator(stream: Stream) -> bool:
    return stream.kind == "none" or stream.key == SEPARATOR
