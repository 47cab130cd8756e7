"""Discrete values: action indices and class labels, used as token ids directly."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmtool.data.schema import Segment
from mmtool.data.tokenizers.base import TOKENIZERS, Tokenizer
from mmtool.data.tokenizers.continuous import as_matrix
from mmtool.errors import MMToolError, RecordError


def class_ids(x: np.ndarray, role: str, num_classes: int) -> np.ndarray:
    """Checks that every entry of `x` `[T, k]` is an integer in [0, num_classes) and returns int32.

    Floats are accepted when they hold whole numbers (2.0); `num_classes` 0 checks only ≥ 0.
    """
    if x.dtype.kind == "f":
        frac = np.argwhere(x != np.round(x))
        if frac.size:
            t, k = frac[0]
            raise RecordError(f"{role} value {x[t, k]} at row {t}, column {k} is not an integer")
    limit = num_classes if num_classes > 0 else 2**31
    bad = np.argwhere((x < 0) | (x >= limit))
    if bad.size:
        t, k = bad[0]
        bound = f"num_classes={num_classes}" if num_classes > 0 else "the int32 range"
        raise RecordError(f"{role} value {x[t, k]} at row {t}, column {k} is outside [0, {bound})")
    return x.astype(np.int32)


MAX_CLASSES = 2**20
"""The largest vocabulary a discrete or label tokenizer accepts: `num_classes` becomes an embedding
table in training, so a typo such as 1e12 must fail at preprocess time, not allocate terabytes."""


def _num_classes(name: str, num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or not 0 <= num_classes <= MAX_CLASSES:
        raise MMToolError(f"{name}: num_classes must be an integer from 0 (unknown) to {MAX_CLASSES} "
                          f"(2^20), got {num_classes!r:.40}")
    return int(num_classes)


@TOKENIZERS.register("discrete")
class Discrete(Tokenizer):
    """Discrete actions as ids [T, k]: each integer in [0, num_classes) is its own token id.

    A `[T]` input becomes `[T, 1]` (and decodes as `[T, 1]`).

    Args:
        num_classes: the number of actions, which is the vocabulary size; 0 means unknown (only
            negatives are rejected, and `config` reports vocab_size None). Sources should set it.
    """

    modality = "action"

    def __init__(self, num_classes: int = 0):
        self.num_classes = _num_classes("discrete", num_classes)

    def encode(self, data: Any, role: str) -> Segment:
        x = as_matrix(data, role)  # [T, k]
        return Segment(self.modality, role, self.registry_name, x.shape,
                       ids=class_ids(x, role, self.num_classes))

    def decode(self, segment: Segment) -> np.ndarray:
        """Returns int64 `[T, k]`."""
        return segment.ids.astype(np.int64).reshape(segment.shape)

    def config(self) -> dict[str, Any]:
        return {"name": self.registry_name, "num_classes": self.num_classes,
                "vocab_size": self.num_classes or None}


@TOKENIZERS.register("label")
class Label(Tokenizer):
    """A class label as one token id: ids [1].

    Args:
        num_classes: the number of classes, which is the vocabulary size; 0 means unknown.
    """

    modality = "label"

    def __init__(self, num_classes: int = 0):
        self.num_classes = _num_classes("label", num_classes)

    def encode(self, data: Any, role: str) -> Segment:
        if data is None:
            raise RecordError("missing label")
        x = as_matrix(data, role)
        if x.size != 1:
            raise RecordError(f"a label is one integer, got {x.size} values")
        return Segment(self.modality, role, self.registry_name, (1,),
                       ids=class_ids(x, role, self.num_classes))

    def decode(self, segment: Segment) -> int:
        """Returns the label as an int."""
        return int(segment.ids[0])

    def config(self) -> dict[str, Any]:
        return {"name": self.registry_name, "num_classes": self.num_classes,
                "vocab_size": self.num_classes or None}
