"""Continuous values (observations, continuous actions, rewards): Gato's mu-law bins, or raw floats."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmtool.data.schema import Segment
from mmtool.data.tokenizers.base import TOKENIZERS, Tokenizer
from mmtool.errors import MMToolError, RecordError


def as_matrix(data: Any, role: str, kinds: str = "biuf") -> np.ndarray:
    """Checks a `[T, k]` (or `[T]`, or scalar) array and returns it as `[T, k]`.

    Args:
        data: an array or nested lists of numbers; `[T]` becomes `[T, 1]`, a scalar `[1, 1]`.
        role: named in error messages ("observation", "action", ...).
        kinds: accepted numpy dtype kinds ("b" bool, "i"/"u" integer, "f" float).

    Raises:
        RecordError: ragged rows, a non-numeric dtype, an empty array, more than 2 dims, NaN or inf
            (naming the first bad row and column).
    """
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, (list, tuple, np.ndarray)) for r in data):
        lengths = [len(r) for r in data]
        bad = next((t for t, n in enumerate(lengths) if n != lengths[0]), None)
        if bad is not None:
            raise RecordError(f"ragged {role} rows: row {bad} has {lengths[bad]} values, "
                              f"row 0 has {lengths[0]}")
    try:
        x = np.asarray(data)
    except ValueError as exc:  # deeper raggedness
        raise RecordError(f"ragged {role} values: {exc}") from None
    if x.dtype.kind not in kinds:
        raise RecordError(f"{role} values must be numbers, got dtype {x.dtype}")
    if x.ndim > 2:
        raise RecordError(f"{role} values must be [T, k] or [T], got shape {x.shape}")
    if x.size == 0:
        raise RecordError(f"empty {role} values (shape {x.shape})")
    x = x.reshape(x.shape[0] if x.ndim else 1, -1)
    if x.dtype.kind == "f":
        bad = np.argwhere(~np.isfinite(x))
        if bad.size:
            t, k = bad[0]
            raise RecordError(f"{role} value {x[t, k]} at row {t}, column {k} is not finite")
    return x  # [T, k]


def mu_law(x: np.ndarray, mu: float = 100.0, M: float = 256.0) -> np.ndarray:
    """Gato's companding `sign(x) · log(|x|·mu + 1) / log(M·mu + 1)`, clipped to [-1, 1]."""
    y = np.sign(x) * np.log1p(np.abs(x) * mu) / math.log(M * mu + 1.0)
    return np.clip(y, -1.0, 1.0)


def inverse_mu_law(y: np.ndarray, mu: float = 100.0, M: float = 256.0) -> np.ndarray:
    """The inverse of `mu_law` on [-1, 1]."""
    return np.sign(y) * np.expm1(np.abs(y) * math.log(M * mu + 1.0)) / mu


@TOKENIZERS.register("mulaw")
class MuLaw(Tokenizer):
    """Gato's mu-law companding then uniform bins over [-1, 1]: ids [T, k], one token per value.

    `id = floor((F(x) + 1) / 2 · bins)`, capped at bins - 1, where F is `mu_law`; values beyond
    ±M saturate into the first or last bin. `decode` returns each bin's centre mapped back through
    F, so |F(decode(encode(x))) - F(x)| ≤ 1 / bins.

    Args:
        mu: companding strength (Gato: 100).
        M: the magnitude that maps to ±1 (Gato: 256).
        bins: the number of bins, which is the vocabulary size (Gato: 1024).
    """

    modality = "observation"

    def __init__(self, mu: float = 100.0, M: float = 256.0, bins: int = 1024):
        if mu <= 0 or M <= 0 or bins < 2:
            raise MMToolError(f"mulaw: need mu > 0, M > 0, bins ≥ 2; got mu={mu}, M={M}, bins={bins}")
        self.mu, self.M, self.bins = float(mu), float(M), int(bins)

    def encode(self, data: Any, role: str) -> Segment:
        x = as_matrix(data, role).astype(np.float64)  # [T, k]
        y = mu_law(x, self.mu, self.M)  # [T, k] in [-1, 1]
        ids = np.clip(np.floor((y + 1.0) / 2.0 * self.bins), 0, self.bins - 1)
        return Segment(self.modality, role, self.registry_name, x.shape, ids=ids.astype(np.int32))

    def decode(self, segment: Segment) -> np.ndarray:
        """Returns float64 `[T, k]`: each id's bin centre, un-companded."""
        centre = (segment.ids.astype(np.float64) + 0.5) / self.bins * 2.0 - 1.0
        return inverse_mu_law(centre, self.mu, self.M).reshape(segment.shape)

    def config(self) -> dict[str, Any]:
        return {"name": self.registry_name, "mu": self.mu, "M": self.M, "bins": self.bins,
                "vocab_size": self.bins}


@TOKENIZERS.register("raw-float")
class RawFloat(Tokenizer):
    """Raw float vectors for a linear embedding: values [T, k], one token of dim k per timestep.

    Args:
        clip: clip values to [-clip, clip]; None keeps them as they are.
        dim: the expected k; inputs with another width are rejected. None accepts any width (the
            segment's shape then carries it, and `config` reports dim None).
    """

    modality = "reward"

    def __init__(self, clip: float | None = None, dim: int | None = None):
        if clip is not None and clip <= 0:
            raise MMToolError(f"raw-float: clip must be > 0, got {clip}")
        self.clip = None if clip is None else float(clip)
        self.dim = None if dim is None else int(dim)

    def encode(self, data: Any, role: str) -> Segment:
        with np.errstate(over="ignore"):
            x = as_matrix(data, role).astype(np.float32)  # [T, k]
        if not np.isfinite(x).all():
            raise RecordError(f"{role} values overflow float32 (|x| > 3.4e38)")
        if self.dim is not None and x.shape[1] != self.dim:
            raise RecordError(f"{role} has {x.shape[1]} values per row, expected dim={self.dim}")
        if self.clip is not None:
            x = np.clip(x, -self.clip, self.clip)
        return Segment(self.modality, role, self.registry_name, x.shape, values=x)

    def decode(self, segment: Segment) -> np.ndarray:
        """Returns float32 `[T, k]` (after clipping)."""
        return segment.values.reshape(segment.shape)

    def config(self) -> dict[str, Any]:
        return {"name": self.registry_name, "clip": self.clip, "dim": self.dim}
