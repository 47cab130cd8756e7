"""Image tokenizer: normalized non-overlapping pixel patches, ViT-style."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmtool.data.schema import Segment
from mmtool.data.tokenizers.base import TOKENIZERS, Tokenizer
from mmtool.errors import MMToolError, RecordError

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as PIL's "L" mode


def _as_pixels(data: Any) -> np.ndarray:
    """Checks an image and returns it as float32 `[H, W, C]` on the [0, 1] scale, alpha dropped.

    Accepts uint8 (0..255) or float (already on [0, 1]) arrays `[H, W]` or `[H, W, C]`, C ∈ {1, 3, 4}.
    """
    try:
        img = np.asarray(data)
    except Exception as exc:  # e.g. a ragged nested list
        raise RecordError(f"image is not an array: {exc}") from None
    if img.ndim not in (2, 3):
        raise RecordError(f"image must be [H, W] or [H, W, C], got shape {img.shape}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] not in (1, 3, 4):
        raise RecordError(f"image must have 1, 3 or 4 channels, got {img.shape[2]} (shape {img.shape})")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise RecordError(f"image is empty (shape {img.shape})")
    if img.dtype == np.uint8:
        pix = img.astype(np.float32) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise RecordError("image has NaN or infinite pixels")
        if img.min() < 0 or img.max() > 1:
            raise RecordError(f"float image must be on [0, 1], got [{img.min():.3g}, {img.max():.3g}]")
        pix = img.astype(np.float32)
    else:
        raise RecordError(f"image must be uint8 (or float on [0, 1]), got {img.dtype}")
    return pix[:, :, :3]  # drop alpha (not composited): [H, W, C]


def _resize(pix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize of `[H, W, C]` to `[size, size, C]`."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(pix)).permute(2, 0, 1)[None]  # [1, C, H, W]
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).clamp(0, 1).numpy()  # [size, size, C]


@TOKENIZERS.register("patches")
class Patches(Tokenizer):
    """Image → normalized P×P pixel patches: values [rows, cols, P*P*C], patches row-major.

    Each patch is flattened in (py, px, c) order. An image whose sides are not multiples of P is
    padded at the bottom and right with black pixels (0 before normalization); `decode` returns the
    padded image, since a segment keeps no record of the original size.

    Args:
        patch_size: P, the side of a square patch in pixels.
        size: resize to size×size first (bilinear, antialiased); None keeps the image's size.
        channels: None keeps the input's channels (1 for grayscale, 3 for RGB/RGBA); 3 repeats
            grayscale into RGB; 1 converts RGB to luminance. Set it when a dataset mixes both, so
            that every image has the same patch dim.
        mean: subtracted from pixels on the [0, 1] scale; one value or one per channel.
        std: divides pixels after `mean`; one value or one per channel.
    """

    modality = "image"

    def __init__(self, patch_size: int = 4, size: int | None = None, channels: int | None = None,
                 mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5):
        if patch_size < 1 or (size is not None and size < 1):
            raise MMToolError(f"patches: patch_size and size must be ≥ 1, got {patch_size}, {size}")
        if channels not in (None, 1, 3):
            raise MMToolError(f"patches: channels must be 1, 3 or unset, got {channels}")
        self.patch_size, self.size, self.channels = int(patch_size), size, channels
        self.mean = [float(m) for m in np.atleast_1d(mean)]
        self.std = [float(s) for s in np.atleast_1d(std)]
        if min(self.std) <= 0:
            raise MMToolError(f"patches: std must be > 0, got {std}")

    def _stats(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.mean) not in (1, c) or len(self.std) not in (1, c):
            raise RecordError(f"image has {c} channels but mean/std give {len(self.mean)}/{len(self.std)}")
        return np.float32(self.mean), np.float32(self.std)

    def encode(self, data: Any, role: str) -> Segment:
        pix = _as_pixels(data)  # [H, W, C]
        if self.channels == 3 and pix.shape[2] == 1:
            pix = np.repeat(pix, 3, axis=2)
        elif self.channels == 1 and pix.shape[2] == 3:
            pix = (pix @ _LUMA.astype(np.float32))[:, :, None]
        if self.size is not None:
            pix = _resize(pix, self.size)
        P, (H, W, C) = self.patch_size, pix.shape
        rows, cols = -(-H // P), -(-W // P)
        pix = np.pad(pix, ((0, rows * P - H), (0, cols * P - W), (0, 0)))  # [rows*P, cols*P, C]
        mean, std = self._stats(C)
        x = (pix - mean) / std
        x = x.reshape(rows, P, cols, P, C).transpose(0, 2, 1, 3, 4)  # [rows, cols, P, P, C]
        return Segment(self.modality, role, self.registry_name, (rows, cols, P * P * C),
                       values=x.reshape(rows, cols, P * P * C))

    def decode(self, segment: Segment) -> np.ndarray:
        """Returns the (padded) image as uint8 `[H, W, C]`, or `[H, W]` when C is 1."""
        rows, cols, dim = segment.shape
        P = self.patch_size
        C = dim // (P * P)
        mean, std = self._stats(C)
        x = segment.values.reshape(rows, cols, P, P, C).transpose(0, 2, 1, 3, 4)
        pix = x.reshape(rows * P, cols * P, C) * std + mean  # [H, W, C] on [0, 1]
        img = np.clip(np.rint(pix * 255.0), 0, 255).astype(np.uint8)
        return img[:, :, 0] if C == 1 else img

    def config(self) -> dict[str, Any]:
        """`dim` is None when `channels` is unset: it then follows each image (P*P*1 or P*P*3)."""
        dim = self.patch_size**2 * self.channels if self.channels else None
        return {"name": self.registry_name, "patch_size": self.patch_size, "size": self.size,
                "channels": self.channels, "mean": self.mean, "std": self.std, "dim": dim}
