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

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from mmtool.data.batch import Batch

SLOT_FIELDS = ("slot_sample", "slot_pos", "slot_stream", "slot_segment")


class _NumpyOps:
    """The few array calls `derive` makes, on the host in numpy (1.5-2x torch's speed there)."""

    @staticmethod
    def read(batch: "Batch", name: str) -> np.ndarray:
        return batch[name].numpy()

    @staticmethod
    def rep(x: Any, counts: Any, total: int) -> np.ndarray:
        return np.repeat(x, counts)

    arange = staticmethod(lambda n: np.arange(n, dtype=np.int64))
    full = staticmethod(lambda n, v: np.full(n, v, np.int32))
    cumsum = staticmethod(np.cumsum)
    i32 = staticmethod(lambda x: x.astype(np.int32))
    i64 = staticmethod(lambda x: x.astype(np.int64))
    out = staticmethod(torch.from_numpy)


class _TorchOps:
    """The same calls in torch, on the batch's device (no host read: sizes come from the host)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def read(batch: "Batch", name: str) -> Tensor:
        return batch[name]

    @staticmethod
    def rep(x: Tensor, counts: Tensor, total: int) -> Tensor:
        return torch.repeat_interleave(x, counts, output_size=total)

    def arange(self, n: int) -> Tensor:
        return torch.arange(n, device=self.device)

    def full(self, n: int, v: int) -> Tensor:
        return torch.full((n,), v, dtype=torch.int32, device=self.device)

    cumsum = staticmethod(lambda x: torch.cumsum(x, 0))
    i32 = staticmethod(lambda x: x.int())
    i64 = staticmethod(lambda x: x.long())
    out = staticmethod(lambda x: x)


def derive(batch: "Batch", ops: Any = None) -> dict[str, Tensor]:
    """Every slot-level field of `batch` (see module docstring), on the batch's device.

    One formula for both array libraries: numpy when the batch is on the host, torch on a device.

    Args:
        batch: a batch with a segment table (`seg_order`, `seg_ntok`, `seg_base`, `seg_step`,
            `seg_stride`, `sample_steps`, `sample_sep`, `sample_step_len`).
        ops: `_NumpyOps` or a `_TorchOps` (default: by the batch's device; tests run the torch
            formula on the host too).
    """
    dev = batch.buffer.device
    xp: Any = ops or (_NumpyOps if dev.type == "cpu" else _TorchOps(dev))
    read = lambda name: xp.i64(xp.read(batch, name))  # noqa: E731
    s, b = batch.num_slots, batch.batch_size
    lens = read("seqlens")  # [B]
    starts = read("cu_seqlens")[:-1]  # [B] first slot of each sample (both layouts)
    out: dict[str, Any] = {}

    # Tokens of every stream, in storage order (the streams' fields back to back).
    order = read("seg_order")  # [G] segments in the order their tokens are stored
    ntok = read("seg_ntok")[order]  # [G]
    t = int(sum(batch.stream_tokens(k) for k in batch.token_streams))
    first = xp.cumsum(ntok) - ntok  # [G] first stored token of each segment
    tok_seg = xp.rep(xp.arange(len(ntok)), ntok, t)  # [T] segment (storage order) of each token
    ar = xp.arange(t)  # [T]
    slot0 = starts[read("seg_sample")[order]] + read("seg_base")[order]  # [G] slot of token 0
    slot = (slot0 - first)[tok_seg] + ar  # [T] plain segments: slot0 + pos
    pos = ar - first[tok_seg]  # [T] token within its segment
    if batch.sep_stream >= 0:  # timestep segments (only trajectory samples have separators)
        step, stride = read("seg_step")[order], read("seg_stride")[order]  # [G]
        slot += (pos // step[tok_seg]) * (stride - step)[tok_seg]  # plain: pos // step = 0
    slot_stream, slot_segment = xp.full(s, -1), xp.full(s, -1)  # [S] each
    slot_stream[slot] = xp.i32(read("seg_stream")[order])[tok_seg]
    slot_segment[slot] = xp.i32(order)[tok_seg]
    at = 0
    for k in batch.token_streams:
        n = batch.stream_tokens(k)
        out[f"s{k}.slot"], out[f"s{k}.pos"] = xp.i32(slot[at:at + n]), xp.i32(pos[at:at + n])
        at += n

    # Separators: one per timestep of each trajectory sample.
    if batch.sep_stream >= 0:
        steps = read("sample_steps")  # [B]
        n_sep = batch.stream_tokens(batch.sep_stream)
        tstep = xp.arange(n_sep) - xp.rep(xp.cumsum(steps) - steps, steps, n_sep)  # [n_sep]
        sep_slot = xp.rep(starts + read("sample_sep"), steps, n_sep) \
            + tstep * xp.rep(read("sample_step_len"), steps, n_sep)  # [n_sep]
        slot_stream[sep_slot] = batch.sep_stream
        out[f"s{batch.sep_stream}.slot"], out[f"s{batch.sep_stream}.pos"] = xp.i32(sep_slot), xp.i32(tstep)

    # Sample and position of every slot.
    real = batch.real_tokens  # Σ seqlens, known on the host
    sample = xp.rep(xp.arange(b), lens, real)  # [R]
    rank = xp.arange(real) - xp.rep(xp.cumsum(lens) - lens, lens, real)  # [R]
    if batch.layout == "packed":  # every slot is real
        out["slot_sample"], out["slot_pos"] = xp.i32(sample), xp.i32(rank)
    else:
        slot_sample, slot_pos = xp.full(s, -1), xp.full(s, 0)
        where = starts[sample] + rank  # [R] real slots
        slot_sample[where], slot_pos[where] = xp.i32(sample), xp.i32(rank)
        out["slot_sample"], out["slot_pos"] = slot_sample, slot_pos
    out["slot_stream"], out["slot_segment"] = slot_stream, slot_segment
    return {name: xp.out(v) for name, v in out.items()}
