"""Slot-level index fields of a batch, computed from its segment table on the batch's device.

The loader ships what only the data can tell — the tokens, and one row per sample and per segment
saying where things go — and leaves the per-slot index arithmetic to whoever reads the batch:
on a GPU it is a dozen kernels on data already there, and host-to-device traffic drops from
~28 bytes per token (ids + six int32 index fields) to ~4. `Batch.__getitem__` calls `derive` the
first time one of these fields is read and keeps the results:

==================  ============  ========================================================
name                dtype, shape  meaning
==================  ============  ========================================================
slot_sample         int32 [S]     batch-local sample of each slot, -1 for padding
slot_pos            int32 [S]     position of the slot within its sample
slot_stream         int32 [S]     stream of the slot's token (separators included), -1 for padding
slot_segment        int32 [S]     batch-local segment of the slot, -1 for separators/padding
s{k}.slot           int32 [n_k]   slot of each token of stream k (the separator stream too)
s{k}.pos            int32 [n_k]   index of the token within its segment (timestep for separators)
==================  ============  ========================================================

Token j of a segment lands at `base + (j // step) * stride + j % step` of its sample (`index.py`);
plain segments have `step = n` (so `j // step = 0`), timestep segments interleave as Gato does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mmtool.data.batch import Batch

SLOT_FIELDS = ("slot_sample", "slot_pos", "slot_stream", "slot_segment")


def _excl_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def _rep(x: Tensor, counts: Tensor, total: int) -> Tensor:
    """`x[i]` repeated `counts[i]` times; `total` = Σ counts (known on the host: no device sync)."""
    return torch.repeat_interleave(x, counts, output_size=total)


def derive(batch: "Batch") -> dict[str, Tensor]:
    """Every slot-level field of `batch` (see module docstring), on the batch's device.

    Args:
        batch: a batch with a segment table (`seg_order`, `seg_ntok`, `seg_base`, `seg_step`,
            `seg_stride`, `sample_steps`, `sample_sep`, `sample_step_len`).
    """
    dev = batch.buffer.device
    s, b = batch.num_slots, batch.batch_size
    lens = batch["seqlens"].long()  # [B]
    starts = batch["cu_seqlens"].long()[:-1]  # [B] first slot of each sample (both layouts)
    out: dict[str, Tensor] = {}

    # Tokens of every stream, in storage order (the streams' fields back to back).
    order = batch["seg_order"].long()  # [G] segments in the order their tokens are stored
    ntok = batch["seg_ntok"].long()[order]  # [G]
    t = int(sum(batch.stream_tokens(k) for k in batch.token_streams))
    first = _excl_cumsum(ntok)  # [G]
    pos = torch.arange(t, device=dev) - _rep(first, ntok, t)  # [T] token within its segment
    step = _rep(batch["seg_step"].long()[order], ntok, t)  # [T]
    stride = _rep(batch["seg_stride"].long()[order], ntok, t)  # [T]; 0 for plain segments
    slot0 = starts[batch["seg_sample"].long()[order]] + batch["seg_base"].long()[order]  # [G]
    # Plain segments have step = n, so pos // step = 0 and the slot is slot0 + pos.
    slot = _rep(slot0, ntok, t) + pos + torch.div(pos, step, rounding_mode="floor") * (stride - step)  # [T]

    slot_stream = torch.full((s,), -1, dtype=torch.int32, device=dev)  # [S]
    slot_segment = torch.full((s,), -1, dtype=torch.int32, device=dev)  # [S]
    slot_stream[slot] = _rep(batch["seg_stream"][order], ntok, t)
    slot_segment[slot] = _rep(order.int(), ntok, t)
    at = 0
    for k in batch.token_streams:
        n = batch.stream_tokens(k)
        out[f"s{k}.slot"], out[f"s{k}.pos"] = slot[at:at + n].int(), pos[at:at + n].int()
        at += n

    # Separators: one per timestep of each trajectory sample.
    if batch.sep_stream >= 0:
        steps = batch["sample_steps"].long()  # [B]
        n_sep = batch.stream_tokens(batch.sep_stream)
        tstep = torch.arange(n_sep, device=dev) - _rep(_excl_cumsum(steps), steps, n_sep)  # [n_sep]
        sep_slot = _rep(starts + batch["sample_sep"].long(), steps, n_sep) \
            + tstep * _rep(batch["sample_step_len"].long(), steps, n_sep)  # [n_sep]
        slot_stream[sep_slot] = batch.sep_stream
        out[f"s{batch.sep_stream}.slot"], out[f"s{batch.sep_stream}.pos"] = sep_slot.int(), tstep.int()

    # Sample and position of every slot.
    real = batch.real_tokens  # Σ seqlens, known on the host
    sample = _rep(torch.arange(b, device=dev), lens, real)  # [R]
    rank = torch.arange(real, device=dev) - _rep(_excl_cumsum(lens), lens, real)  # [R]
    if batch.layout == "packed":  # every slot is real
        out["slot_sample"], out["slot_pos"] = sample.int(), rank.int()
    else:
        slot_sample = torch.full((s,), -1, dtype=torch.int32, device=dev)
        slot_pos = torch.zeros(s, dtype=torch.int32, device=dev)
        where = starts[sample] + rank  # [R] real slots
        slot_sample[where], slot_pos[where] = sample.int(), rank.int()
        out["slot_sample"], out["slot_pos"] = slot_sample, slot_pos
    out["slot_stream"], out["slot_segment"] = slot_stream, slot_segment
    return out
