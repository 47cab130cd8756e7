"""`Batch`: every field of a batch lives in one contiguous byte buffer.

One buffer means one host-to-device copy per batch (and one pinned allocation on CUDA), instead of
one per tensor; the fields are typed views into it, on the host and on the device alike.

Fields (S = token slots, B = samples, n_k = tokens of stream k, d_k its vector size):

====================  =============  ======================================================
name                  dtype, shape   meaning
====================  =============  ======================================================
slot_sample           int32 [S]      batch-local sample of each slot, -1 for padding
slot_pos              int32 [S]      position of the slot within its sample
slot_stream           int32 [S]      stream index (see `TokenIndex.streams`), -1 for padding
slot_segment          int32 [S]      batch-local segment of each slot, -1 for separators/padding
cu_seqlens            int32 [B+1]    slot offset where each sample starts (and S or B·L at the end)
seqlens               int32 [B]      real tokens of each sample
sample_folder         int32 [B]      which data folder each sample came from
sample_index          int64 [B]      global sample number (TokenIndex numbering)
label                 int64 [B]      class label, -1 when missing
seg_sample            int32 [G]      batch-local sample of each segment
seg_stream            int32 [G]      stream of each segment
s{k}.ids / s{k}.values int32 [n_k] / float32 [n_k, d_k]   the tokens of stream k
s{k}.slot             int32 [n_k]    slot of each token of stream k
s{k}.pos              int32 [n_k]    index of the token within its segment
====================  =============  ======================================================

`layout` is "packed" (samples back to back, S = Σ seqlens, no padding slots) or "padded"
(B rows of L slots, S = B·L, sample b in slots [b·L, b·L + seqlens[b])).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ALIGN = 64  # bytes; every field starts on a cache line, so typed views are always aligned

_NP_TO_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                np.dtype(np.float32): torch.float32, np.dtype(np.int16): torch.int16}


@dataclass(frozen=True)
class FieldSpec:
    """Where one field lives in the buffer."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    offset: int  # bytes from the buffer start
    nbytes: int  # bytes of the field (without alignment padding)


class BufferBuilder:
    """Plans fields, allocates one buffer, and hands out numpy views to fill in place."""

    def __init__(self) -> None:
        self.specs: list[FieldSpec] = []
        self.size = 0

    def add(self, name: str, dtype: Any, shape: tuple[int, ...]) -> None:
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        self.specs.append(FieldSpec(name, dtype.name, shape, self.size, nbytes))
        self.size += -(-nbytes // ALIGN) * ALIGN

    def allocate(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Returns (the uint8 buffer, {name: typed view into it}).

        The buffer starts zeroed (`np.zeros` of a large size is fresh zero pages, not a memset),
        so alignment gaps hold no stale memory and equal batches are equal byte for byte.
        """
        buf = np.zeros(max(self.size, ALIGN), np.uint8)
        views = {s.name: buf[s.offset:s.offset + s.nbytes].view(s.dtype).reshape(s.shape)
                 for s in self.specs}
        return buf, views


@dataclass
class Batch:
    """A batch in one buffer (host or device) with typed views for its fields.

    Attributes:
        buffer: uint8 tensor holding every field.
        specs: where each field lives in `buffer`.
        layout: "packed" or "padded".
        streams: stream indices present, in field order.
        h2d_copies / h2d_bytes: host-to-device copies made to get here (for profiling).
    """

    buffer: torch.Tensor
    specs: tuple[FieldSpec, ...]
    layout: str
    streams: tuple[int, ...]
    h2d_copies: int = 0
    h2d_bytes: int = 0
    _views: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # views are rebuilt on demand, never shipped
        return {**self.__dict__, "_views": {}}

    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views.get(name)
        if view is None:
            spec = self._spec(name)
            raw = self.buffer[spec.offset:spec.offset + spec.nbytes]
            view = raw.view(_NP_TO_TORCH[np.dtype(spec.dtype)]).view(spec.shape)
            self._views[name] = view
        return view

    def __contains__(self, name: str) -> bool:
        return any(s.name == name for s in self.specs)

    def _spec(self, name: str) -> FieldSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(f"batch has no field {name!r} (fields: {', '.join(s.name for s in self.specs)})")

    @property
    def batch_size(self) -> int:
        return self._spec("seqlens").shape[0]

    @property
    def num_slots(self) -> int:
        return self._spec("slot_sample").shape[0]

    @property
    def real_tokens(self) -> int:
        return int(self["seqlens"].sum())

    @property
    def max_seqlen(self) -> int:
        return int(self["seqlens"].max()) if self.batch_size else 0

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """Moves the batch with ONE copy of its buffer; views are rebuilt on the device."""
        device = torch.device(device)
        if self.buffer.device == device:
            return self
        buf = self.buffer.to(device, non_blocking=non_blocking)
        return Batch(buf, self.specs, self.layout, self.streams, self.h2d_copies + 1,
                     self.h2d_bytes + self.buffer.numel())

    def to_per_field(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The naive way, for comparison: one copy per field (`profile` measures both)."""
        return {s.name: self[s.name].to(device, non_blocking=True) for s in self.specs}

    def pin_memory(self) -> "Batch":
        """Page-locks the buffer (DataLoader calls this when `pin_memory=True`)."""
        return Batch(self.buffer.pin_memory(), self.specs, self.layout, self.streams,
                     self.h2d_copies, self.h2d_bytes)

    def numpy(self, name: str) -> np.ndarray:
        """A host field as numpy (tests, reports)."""
        return self[name].cpu().numpy()

    @staticmethod
    def from_numpy(buf: np.ndarray, specs: list[FieldSpec], layout: str,
                   streams: tuple[int, ...]) -> "Batch":
        return Batch(torch.from_numpy(buf), tuple(specs), layout, streams)
