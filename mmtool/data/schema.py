"""The sample schema: every sample of every modality is an ordered list of token segments.

Three layers, from raw to stored:

* `Record` — what a source reads: raw `Field`s (a caption string, an image array, an `Audio` clip,
  an observation matrix) plus the sample's id, task, label and free-form metadata.
* `Segment` — what a tokenizer makes of one field: discrete token `ids` (text, actions, mu-law
  observations) or continuous token vectors `values` (image patches, audio patches, raw floats),
  never both, and the `shape` of the token grid.
* `Sample` — a record's segments, in the record's field order; one row of an Arrow shard.

Shape conventions (n = number of tokens of the segment):

* `ids` segments: `shape` is the token grid, `prod(shape) == len(ids)`; a text segment is `[n]`,
  a trajectory segment is `[T, k]` (T timesteps of k tokens each).
* `values` segments: `shape` is `[*grid, dim]` and `values` holds `prod(shape)` floats, row-major;
  an image is `[rows, cols, patch_dim]`, an audio clip `[n_patches, patch_dim]`.

Trajectories (Gato-style timesteps): a sample whose segments have roles `observation` and `action`
with the same leading dimension T is read as T timesteps, each `observation tokens | separator |
action tokens | reward tokens` (rewards when the sample has a `reward` segment with the same T).
The separator is implied by that layout rather than stored, so that observations and
actions stay two dense segments; `timestep_layout` gives the interleaved token order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mmtool.errors import RecordError

SCHEMA_VERSION = 1
"""Bumped whenever the Arrow schema or the meaning of a field changes."""

MODALITIES = ("text", "image", "audio", "observation", "action", "reward", "label", "embedding")
"""Modality names: they pick the default tokenizer and, later, the model's encoder."""

SPLITS = ("train", "validation", "test")

MAX_LABEL = 2**63 - 1
"""Labels are class indices stored as int64."""


@dataclass
class Audio:
    """A raw audio clip: mono or multi-channel samples in [-1, 1] and their sample rate.

    Attributes:
        samples: float32 array `[n]` (mono) or `[n, channels]`.
        sample_rate: samples per second.
    """

    samples: np.ndarray
    sample_rate: int


@dataclass
class Field:
    """One raw input of a record before tokenization.

    Attributes:
        modality: one of `MODALITIES`.
        role: what the field is within its sample: "caption", "image", "transcript", "speech",
            "observation", "action", "reward", "document", ...
        data: the raw value — `str` for text; `uint8 [H, W]` or `[H, W, C]` for images; `Audio`;
            `float [T, k]` for observations and continuous actions; `int [T, k]` for discrete
            actions; `float [T]` for rewards.
        tokenizer: the registered tokenizer to use instead of the modality's default, e.g.
            "mulaw" for continuous actions.
        options: tokenizer options that this field needs, e.g. `{"num_classes": 2}` for actions.
    """

    modality: str
    role: str
    data: Any
    tokenizer: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """One raw sample read by a source.

    Attributes:
        id: unique within its source and stable across runs (used for splits and joins).
        task: the task the sample belongs to, e.g. "caption", "speech", "control/cartpole".
        fields: the raw inputs, in sequence order.
        label: an optional class index (downstream tasks, probes).
        meta: JSON-serialisable extras (episode return, voice, file path, ...).
    """

    id: str
    task: str
    fields: list[Field]
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Segment:
    """A tokenized field: discrete `ids` or continuous `values`, and the token grid `shape`."""

    modality: str
    role: str
    tokenizer: str
    shape: tuple[int, ...]
    ids: np.ndarray | None = None  # int32 [prod(shape)]
    values: np.ndarray | None = None  # float32 [prod(shape)]
    truncated: bool = False
    """True when the tokenizer cut the field to its token cap (counted in the manifest, not stored)."""

    def __post_init__(self) -> None:
        if (self.ids is None) == (self.values is None):
            raise ValueError("a segment holds exactly one of ids and values")
        self.shape = tuple(int(s) for s in self.shape)
        if self.ids is not None:
            self.ids = np.ascontiguousarray(self.ids, dtype=np.int32).reshape(-1)
            if self.ids.size != int(np.prod(self.shape)):
                raise ValueError(f"ids has {self.ids.size} tokens but shape is {self.shape}")
        else:
            self.values = np.ascontiguousarray(self.values, dtype=np.float32).reshape(-1)
            if self.values.size != int(np.prod(self.shape)):
                raise ValueError(f"values has {self.values.size} floats but shape is {self.shape}")

    @property
    def n_tokens(self) -> int:
        """Number of tokens: all ids, or one per vector of `values`."""
        if self.ids is not None:
            return int(self.ids.size)
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        """Bytes of token data."""
        return int((self.ids if self.ids is not None else self.values).nbytes)


@dataclass
class Sample:
    """One tokenized sample: a row of a shard."""

    id: str
    source: str
    task: str
    split: str
    segments: list[Segment]
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Tokens over all segments."""
        return sum(s.n_tokens for s in self.segments)


SEGMENT_TYPE = pa.struct([
    pa.field("modality", pa.string(), nullable=False),
    pa.field("role", pa.string(), nullable=False),
    pa.field("tokenizer", pa.string(), nullable=False),
    pa.field("ids", pa.list_(pa.int32())),
    pa.field("values", pa.list_(pa.float32())),
    pa.field("shape", pa.list_(pa.int32()), nullable=False),
])

ARROW_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.int64()),
    pa.field("meta", pa.string(), nullable=False),  # JSON object
    pa.field("segments", pa.list_(SEGMENT_TYPE), nullable=False),
], metadata={b"mmtool.schema_version": str(SCHEMA_VERSION).encode()})


def _list_array(chunks: list[np.ndarray | None], dtype: pa.DataType, np_dtype) -> pa.Array:
    """Builds a `list<dtype>` array from per-row numpy arrays (None = null) in one copy."""
    lengths = np.fromiter((0 if c is None else c.size for c in chunks), np.int64, len(chunks))
    offsets = np.zeros(len(chunks) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [c for c in chunks if c is not None and c.size]
    flat = np.concatenate(present).astype(np_dtype, copy=False) if present else np.zeros(0, np_dtype)
    mask = pa.array([c is None for c in chunks], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, dtype), mask=mask)


def samples_to_batch(samples: list[Sample]) -> pa.RecordBatch:
    """Converts samples to one Arrow record batch of `ARROW_SCHEMA`, flattening token buffers once."""
    segs = [seg for s in samples for seg in s.segments]
    seg_struct = pa.StructArray.from_arrays(
        [
            pa.array([g.modality for g in segs], pa.string()),
            pa.array([g.role for g in segs], pa.string()),
            pa.array([g.tokenizer for g in segs], pa.string()),
            _list_array([g.ids for g in segs], pa.int32(), np.int32),
            _list_array([g.values for g in segs], pa.float32(), np.float32),
            _list_array([np.asarray(g.shape, np.int32) for g in segs], pa.int32(), np.int32),
        ],
        fields=list(SEGMENT_TYPE),
    )
    seg_offsets = np.zeros(len(samples) + 1, np.int32)
    np.cumsum([len(s.segments) for s in samples], out=seg_offsets[1:])
    columns = [
        pa.array([s.id for s in samples], pa.string()),
        pa.array([s.source for s in samples], pa.string()),
        pa.array([s.task for s in samples], pa.string()),
        pa.array([s.split for s in samples], pa.string()),
        pa.array([s.label for s in samples], pa.int64()),
        pa.array([json.dumps(s.meta, sort_keys=True) for s in samples], pa.string()),
        pa.ListArray.from_arrays(pa.array(seg_offsets), seg_struct),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=ARROW_SCHEMA)


def rows_to_samples(table: pa.Table | pa.RecordBatch) -> list[Sample]:
    """Reads rows of `ARROW_SCHEMA` back into `Sample`s (for tests and inspection, not hot paths)."""
    out = []
    for row in table.to_pylist():
        segs = [
            Segment(
                modality=g["modality"], role=g["role"], tokenizer=g["tokenizer"],
                shape=tuple(g["shape"]),
                ids=None if g["ids"] is None else np.asarray(g["ids"], np.int32),
                values=None if g["values"] is None else np.asarray(g["values"], np.float32),
            )
            for g in row["segments"]
        ]
        out.append(Sample(id=row["id"], source=row["source"], task=row["task"], split=row["split"],
                          segments=segs, label=row["label"], meta=json.loads(row["meta"])))
    return out


def timestep_layout(sample: Sample) -> list[tuple[str, int, int]]:
    """Returns the Gato token order of a trajectory sample.

    Each entry is `(role, t, k)`: token k of timestep t of the segment with that role, with
    `("separator", t, 0)` between a timestep's observation and action tokens, and the timestep's
    reward tokens after its action when a `reward` segment has the same T (as `TokenIndex` places them).

    Args:
        sample: a sample with `observation` and `action` segments of shape `[T, k_obs]`, `[T, k_act]`
            and optionally a `reward` segment `[T, k_rew]`.
    """
    by_role = {s.role: s for s in sample.segments}
    obs, act = by_role["observation"], by_role["action"]
    if obs.shape[0] != act.shape[0]:
        raise ValueError(f"observation has {obs.shape[0]} timesteps but action has {act.shape[0]}")
    reward = by_role.get("reward")
    if reward is not None and reward.shape[0] != obs.shape[0]:
        reward = None  # not per timestep: `TokenIndex` places it before the timesteps
    order = []
    for t in range(obs.shape[0]):
        order += [("observation", t, k) for k in range(obs.n_tokens // obs.shape[0])]
        order.append(("separator", t, 0))
        order += [("action", t, k) for k in range(act.n_tokens // act.shape[0])]
        if reward is not None:
            order += [("reward", t, k) for k in range(reward.n_tokens // reward.shape[0])]
    return order


def check_label(label: Any) -> int | None:
    """Returns a record's label as an int, or raises `RecordError` unless it is None or an integer
    class index in [0, 2^63) (the int64 column)."""
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label <= MAX_LABEL:
        raise RecordError(f"label must be an integer class index in [0, 2^63), got {label!r:.40}")
    return int(label)


def assign_split(source: str, record_id: str, fractions=(0.8, 0.1, 0.1)) -> str:
    """Assigns a record to train/validation/test by a stable hash of its id (same on every run)."""
    import hashlib

    # surrogatepass: an id with a lone surrogate is rejected by preprocess, but splitting comes first
    key = f"{source}/{record_id}".encode("utf-8", "surrogatepass")
    h = int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    return "validation" if h < fractions[0] + fractions[1] else "test"
