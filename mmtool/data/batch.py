"""`Batch`: every field of a batch lives in one contiguous byte buffer.

One buffer means one host-to-device copy per batch (and one pinned allocation on CUDA), instead of
one per tensor; the fields are typed views into it, on the host and on the device alike.

Stored fields (B = samples, G = segments, n_k = tokens of stream k, d_k its vector size):

====================  =============  ======================================================
name                  dtype, shape   meaning
====================  =============  ======================================================
cu_seqlens            int32 [B+1]    slot offset where each sample starts (and S at the end)
seqlens               int32 [B]      real tokens of each sample
sample_folder         int32 [B]      which data folder each sample came from
sample_index          int64 [B]      global sample number (TokenIndex numbering)
label                 int64 [B]      class label, -1 when missing
sample_steps          int32 [B]      timesteps of a trajectory sample (0 otherwise)
sample_sep            int32 [B]      position of its first separator in the sample
sample_step_len       int32 [B]      tokens per timestep, separator included
seg_sample            int32 [G]      batch-local sample of each segment
seg_stream            int32 [G]      stream of each segment
seg_ntok              int32 [G]      tokens of each segment
seg_base/step/stride  int32 [G]      token placement: token j at base + (j // step)·stride + j % step
seg_order             int32 [G]      segments in the order their tokens are stored
seg_role              int32 [G]      `index.role_code` of each segment's role (loss masks by role)
s{k}.ids / s{k}.values int32 [n_k] / float32 [n_k, d_k]   the tokens of stream k
====================  =============  ======================================================

Slot-level index fields (`slot_sample`, `slot_pos`, `slot_stream`, `slot_segment`, `s{k}.slot`,
`s{k}.pos`) are computed from these on first access, on the batch's device (`layout.py`), unless
the batch stores them itself (batches rebuilt by `mmtool ablate` do).

`layout` is "packed" (samples back to back, S = Σ seqlens, no padding slots) or "padded"
(B rows of L slots, S = B·L, sample b in slots [b·L, b·L + seqlens[b])).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mmtool.data.layout import SLOT_FIELDS, derive

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
        buffer: uint8 tensor holding every stored field.
        specs: where each stored field lives in `buffer`.
        layout: "packed" or "padded".
        streams: stream indices present, in storage order (the separator stream last).
        num_slots: S, the slots of the batch's token sequence.
        real_tokens: Σ seqlens, the slots that hold a token or separator.
        sep_stream / num_separators: the separator stream (-1 when none) and its token count.
        h2d_copies / h2d_bytes: host-to-device copies made to get here (for profiling).
    """

    buffer: torch.Tensor
    specs: tuple[FieldSpec, ...]
    layout: str
    streams: tuple[int, ...]
    num_slots: int
    real_tokens: int
    sep_stream: int = -1
    num_separators: int = 0
    h2d_copies: int = 0
    h2d_bytes: int = 0
    _views: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _by_name: dict[str, FieldSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.specs}

    def __getstate__(self) -> dict[str, Any]:  # views are rebuilt on demand, never shipped
        return {**self.__dict__, "_views": {}}

    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views.get(name)
        if view is None:
            spec = self._by_name.get(name)
            if spec is None:
                if name not in self:
                    raise KeyError(f"batch has no field {name!r} (fields: {', '.join(self.names())})")
                self._views.update(derive(self))  # every slot-level field at once
                return self._views[name]
            raw = self.buffer[spec.offset:spec.offset + spec.nbytes]
            view = raw.view(_NP_TO_TORCH[np.dtype(spec.dtype)]).view(spec.shape)
            self._views[name] = view
        return view

    def names(self) -> list[str]:
        """Stored fields, then the slot-level fields computed on access."""
        stored = list(self._by_name)
        derived = [] if "slot_sample" in stored or "seg_order" not in stored else \
            [*SLOT_FIELDS, *(f"s{k}.{p}" for k in self.streams for p in ("slot", "pos"))]
        return stored + derived

    def __contains__(self, name: str) -> bool:
        return name in self._by_name or name in self.names()

    @property
    def token_streams(self) -> tuple[int, ...]:
        """Streams with stored tokens (every stream but the separators)."""
        return tuple(k for k in self.streams if k != self.sep_stream)

    def stream_tokens(self, k: int) -> int:
        """Tokens of stream `k` in the batch (host-side: no device read)."""
        if k == self.sep_stream:
            return self.num_separators
        spec = self._by_name.get(f"s{k}.ids") or self._by_name.get(f"s{k}.values")
        return spec.shape[0] if spec else 0

    @property
    def batch_size(self) -> int:
        return self._by_name["seqlens"].shape[0]

    @property
    def max_seqlen(self) -> int:
        return int(self["seqlens"].max()) if self.batch_size else 0

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """Moves the batch with ONE copy of its buffer; views are rebuilt on the device."""
        device = torch.device(device)
        if self.buffer.device == device:
            return self
        buf = self.buffer.to(device, non_blocking=non_blocking)
        return replace(self, buffer=buf, h2d_copies=self.h2d_copies + 1,
                       h2d_bytes=self.h2d_bytes + self.buffer.numel(), _views={})

    def to_per_field(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The naive way, for comparison: one copy per stored field (`profile` measures both)."""
        return {s.name: self[s.name].to(device, non_blocking=True) for s in self.specs}

    def clone(self) -> "Batch":
        """A copy with its own buffer (for editing fields in place)."""
        return replace(self, buffer=self.buffer.clone(), _views={})

    def pin_memory(self) -> "Batch":
        """Page-locks the buffer (DataLoader calls this when `pin_memory=True`)."""
        return replace(self, buffer=self.buffer.pin_memory(), _views={})

    def numpy(self, name: str) -> np.ndarray:
        """A host field as numpy (tests, reports)."""
        return self[name].cpu().numpy()

    @staticmethod
    def from_numpy(buf: np.ndarray, specs: list[FieldSpec], layout: str, streams: tuple[int, ...],
                   num_slots: int | None = None, real_tokens: int | None = None,
                   sep_stream: int = -1, num_separators: int = 0) -> "Batch":
        """Wraps a filled host buffer; sizes not given are read from its stored fields."""
        by_name = {s.name: s for s in specs}
        if num_slots is None:
            num_slots = by_name["slot_sample"].shape[0]
        if real_tokens is None:
            s = by_name["seqlens"]
            real_tokens = int(buf[s.offset:s.offset + s.nbytes].view(s.dtype).sum())
        return Batch(torch.from_numpy(buf), tuple(specs), layout, streams, num_slots, real_tokens,
                     sep_stream, num_separators)
