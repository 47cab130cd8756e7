"""Fusion: where the modalities of a sample meet, as the one variable between three models.

Every fusion runs the same stack of identical pre-norm transformer blocks on the same packed
`[N, d]` tokens; they differ only in *which tokens each attention layer lets a token see*:

* `early` — every layer attends over the whole sample (all modalities in one sequence);
* `mid`   — the first `fusion_layer` layers attend within (sample, modality) sub-sequences — the
  per-modality streams — and the remaining layers over the whole sample (joint layers);
* `late`  — every layer attends within (sample, modality); the modalities meet only in the fusion
  head, which pools each modality of a sample and combines the pooled vectors.

Because the blocks are the same, the parameter counts of the three fusions are equal (the late
fusion head has no parameters: see `Late`), so a comparison changes the fusion point and nothing
else. Per-modality streams share their block weights; modality-specific weights would add capacity
per modality and confound the comparison (the encoders and the stream embeddings are already
per-modality).

Attention goes through a packed backend (`mmtool.models.attention`): per-modality layers permute
the tokens so that each (sample, modality) sub-sequence is contiguous — a stable sort, so the
position order inside a sub-sequence is kept and causal masking stays causal in time — run the
backend on those sub-sequences, and permute back. MLPs and norms are per-token and need no
permutation. The separator stream counts as a modality of its own. (A padded batch computed with
its padding, `UnifiedModel.keep_padding`, needs no permutation: one masked SDPA over its rows,
with a mask that allows same-group, real, and — when causal — earlier keys.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmtool.errors import MMToolError
from mmtool.models.encoders import PackedView
from mmtool.registry import Registry


@dataclass
class Grouping:
    """How the rows are cut into attention sequences (samples, or sample × modality).

    Attributes:
        perm: long [N] row order that makes every sequence contiguous (None: already contiguous).
        inv: long [N] inverse of `perm`.
        cu_seqlens: int32 [G+1] sequence starts in `perm` order; lengths: [G] on the host.
        prev: long [N] row of the token before each token in its sequence, -1 at starts and on
            padding (next-token prediction reads the hidden state of `prev[t]` to predict token t).
        mask: for a padded batch computed with its padding (`PackedView.real`): bool
            [B, 1, L, L] which keys each query may attend to (True = attend), causality included;
            attention then runs as one masked SDPA over the B rows instead of through the backend.
    """

    perm: Tensor | None
    inv: Tensor | None
    cu_seqlens: Tensor
    lengths: list[int]
    prev: Tensor
    mask: Tensor | None = None

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    @staticmethod
    def by_sample(view: PackedView, causal: bool = False) -> "Grouping":
        idx = torch.arange(view.n, device=view.pos.device)  # [N]
        first = view.cu_seqlens.long()[view.sample]  # [N] first row of each row's sample
        prev = torch.where(idx > first, idx - 1, torch.full_like(idx, -1))  # [N]
        if view.real is None:
            return Grouping(None, None, view.cu_seqlens, list(view.seqlens), prev)
        group = torch.zeros_like(view.stream)  # [S] one sequence per row
        return Grouping(None, None, view.cu_seqlens, list(view.seqlens),
                        torch.where(view.real, prev, -1), _row_mask(view, group, causal))

    @staticmethod
    def by_modality(view: PackedView, modality_of_stream: Tensor, n_modalities: int,
                    causal: bool = False) -> "Grouping":
        device = view.pos.device
        modality = modality_of_stream[view.stream.clamp(min=0)]  # [N]
        key = view.sample * n_modalities + modality  # [N] sequence id
        if view.real is not None:
            key = torch.where(view.real, key, view.batch_size * n_modalities)  # padding: last
        perm = torch.sort(key, stable=True).indices  # [N] sequences contiguous, time order kept
        sorted_key = key[perm]  # [N]
        same = sorted_key[1:] == sorted_key[:-1]  # [N-1] neighbours in one sequence
        prev = torch.full_like(perm, -1)  # [N]
        prev[perm[1:]] = torch.where(same, perm[:-1], torch.full_like(perm[:-1], -1))
        if view.real is not None:  # rows stay in place; the mask keeps modalities apart
            return Grouping(None, None, view.cu_seqlens, list(view.seqlens),
                            torch.where(view.real, prev, -1), _row_mask(view, modality, causal))
        inv = torch.empty_like(perm).index_copy_(0, perm, torch.arange(view.n, device=device))  # [N]
        counts = torch.bincount(key, minlength=view.batch_size * n_modalities).tolist()  # host sync
        lengths = [c for c in counts if c]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        return Grouping(perm, inv, cu.to(device), lengths, prev)


def _row_mask(view: PackedView, group: Tensor, causal: bool) -> Tensor:
    """bool [B, 1, L, L]: query i may attend to key j of its row when j is real, in i's group and
    (if causal) not later. Padding queries attend to everything: their outputs are never read, and
    a fully masked row would give NaN."""
    b, width = view.batch_size, view.n // max(view.batch_size, 1)
    real = view.real.view(b, width)  # [B, L]
    g = group.view(b, width)  # [B, L]
    mask = (g[:, :, None] == g[:, None, :]) & real[:, None, :]  # [B, Lq, Lk]
    if causal:
        mask = mask & torch.ones(width, width, dtype=torch.bool, device=g.device).tril()
    return (mask | ~real[:, :, None])[:, None]  # [B, 1, Lq, Lk]


class SelfAttention(nn.Module):
    """Multi-head self-attention over packed sequences through a pluggable backend."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise MMToolError(f"d_model {d_model} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, seq: Grouping, backend, causal: bool) -> Tensor:
        n, d = x.shape
        q, k, v = self.project(x)  # 3 × [N, H, Dh]
        return self.proj(attend(q, k, v, seq, backend, causal).reshape(n, d))  # [N, d]

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values of the rows `x [N, d]`: 3 × [N, H, Dh]."""
        n, d = x.shape
        return self.qkv(x).view(n, 3, self.n_heads, d // self.n_heads).unbind(1)  # 3 × [N, H, Dh]


def attend(q: Tensor, k: Tensor, v: Tensor, seq: Grouping, backend, causal: bool) -> Tensor:
    """Attention of q, k, v `[N, H, Dh]` within the sequences of `seq`: `[N, H, Dh]`.

    Through the packed `backend`, or, for a padded batch computed with its padding (`seq.mask`),
    one SDPA over the B rows with the key-padding (and group) mask.
    """
    if seq.mask is None:
        return backend(q, k, v, seq.cu_seqlens, seq.max_seqlen, causal, seq.lengths)  # [N, H, Dh]
    b, width, h = seq.mask.shape[0], seq.mask.shape[-1], q.shape[1]
    rows = lambda t: t.view(b, width, h, -1).transpose(1, 2)  # noqa: E731  [B, H, L, Dh]
    o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=seq.mask)
    return o.transpose(1, 2).reshape(q.shape)  # [N, H, Dh]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: Tensor, seq: Grouping, backend, causal: bool) -> Tensor:
        x = x + self.attn(self.ln1(x), seq, backend, causal)  # [N, d]
        return x + self.mlp(self.ln2(x))  # [N, d]

    # The same block as two per-token halves split at attention, the one step that mixes rows:
    # `mmtool.models.compile` compiles them (rows never see each other there, so extra rows of
    # padding change nothing for the real ones).
    def before_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ln1 then the q, k, v projection of the rows `x [N, d]`: 3 × [N, H, Dh]."""
        return self.attn.project(self.ln1(x))

    def after_attention(self, x: Tensor, o: Tensor) -> Tensor:
        """The residual stream `x [N, d]` after attention output `o [N, H, Dh]` and the MLP: [N, d]."""
        x = x + self.attn.proj(o.reshape(x.shape))  # [N, d]
        return x + self.mlp(self.ln2(x))  # [N, d]


class Fusion:
    """A fusion strategy: which grouping each layer attends within, and how samples are pooled.

    `phases` returns `[(layers, "modality" | "sample"), ...]` covering all layers in order.
    """

    def __init__(self, n_layers: int, fusion_layer: int):
        self.n_layers, self.fusion_layer = n_layers, fusion_layer

    def phases(self) -> list[tuple[int, str]]:
        raise NotImplementedError

    @property
    def final(self) -> str:
        """Grouping of the last layer: what a token's hidden state has seen."""
        return self.phases()[-1][1]

    def pool(self, sample_mean: Tensor, modality_pools: Tensor, present: Tensor) -> Tensor:
        """[B, d] sample vectors from the mean over all tokens `[B, d]` or the per-modality means
        `[B, M, d]` (`present` bool [B, M]: the sample has that modality, separators excluded)."""
        return sample_mean


FUSIONS: Registry[type[Fusion]] = Registry(
    "fusions", "where modalities meet: early, mid (per-modality then joint layers), late")


@FUSIONS.register("early")
class Early(Fusion):
    """One sequence per sample from the first layer: every token attends to every modality."""

    def phases(self):
        return [(self.n_layers, "sample")]


@FUSIONS.register("mid")
class Mid(Fusion):
    """Per-modality streams for the first `fusion_layer` layers, then joint layers over the sample."""

    def __init__(self, n_layers: int, fusion_layer: int):
        super().__init__(n_layers, fusion_layer)
        if not 1 <= fusion_layer < n_layers:
            raise MMToolError(f"--fusion mid needs 1 ≤ --fusion-layer < layers ({n_layers} in this "
                              f"size); got {fusion_layer} (0 is early fusion, {n_layers} is late)")

    def phases(self):
        return [(self.fusion_layer, "modality"), (self.n_layers - self.fusion_layer, "sample")]


@FUSIONS.register("late")
class Late(Fusion):
    """Per-modality streams to the end; each modality pooled per sample, combined in a fusion head.

    The fusion head is the mean of the sample's per-modality pooled vectors (separators excluded),
    each modality weighted equally whatever its token count. It has no parameters on purpose: all
    self-supervised objectives act on tokens or on per-modality vectors, so learned head weights
    would get no gradient in pretraining and stay at their initialisation; a learned combination
    belongs to transfer (the probe or fine-tuning head on top of `pooled`).
    """

    def phases(self):
        return [(self.n_layers, "modality")]

    def pool(self, sample_mean, modality_pools, present):
        w = present.to(modality_pools.dtype)  # [B, M]
        total = (modality_pools * w[:, :, None]).sum(1)  # [B, d]
        return total / w.sum(1, keepdim=True).clamp(min=1)  # [B, d]


class Trunk(nn.Module):
    """The block stack, run phase by phase in the groupings the fusion asks for.

    Args:
        d_model, n_layers, n_heads, d_mlp: block sizes.
        fusion: the `Fusion` that says which grouping each layer attends within.
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, d_mlp: int, fusion: Fusion):
        super().__init__()
        self.fusion = fusion
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    @staticmethod
    def run_blocks(blocks: nn.ModuleList, h: Tensor, seq: Grouping, backend, causal: bool) -> Tensor:
        """Runs `blocks` in order on `h [N, d]` (eager; `mmtool.models.compile` swaps in a compiled
        runner per model instance)."""
        for block in blocks:
            h = block(h, seq, backend, causal)  # [N, d]
        return h

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) linears, residual projections scaled by 1/sqrt(2·layers)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * len(self.blocks)) if name.endswith(
                    ("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, h: Tensor, groupings: dict[str, Grouping], backend, causal: bool) -> Tensor:
        layer = 0
        for count, kind in self.fusion.phases():
            seq = groupings[kind]
            if seq.perm is not None:
                h = h[seq.perm]  # [N, d] sequences contiguous
            h = self.run_blocks(self.blocks[layer:layer + count], h, seq, backend, causal)  # [N, d]
            if seq.inv is not None:
                h = h[seq.inv]  # [N, d] back to packed order
            layer += count
        return self.ln_f(h)  # [N, d]


def masked_mean(x: Tensor, group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Mean of rows `x [N, d]` per group id `[N]` → (`[n_groups, d]`, counts `[n_groups]`)."""
    total = x.new_zeros(n_groups, x.shape[1]).index_add(0, group, x)  # [G, d]
    counts = torch.bincount(group, minlength=n_groups).to(x.dtype)  # [G]
    return total / counts.clamp(min=1)[:, None], counts

