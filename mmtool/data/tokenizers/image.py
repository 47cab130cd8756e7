"""Image tokenizer: normalized non-overlapping pixel patches, ViT-style."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmtool.data.schema import Segment
from mmtool.data.tokenizers.base import TOKENIZERS, Tokenizer
from mmtool.errors import MMToolError, RecordError

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as PIL's "L" mode


def _as_pixels(data: Any) -> np.ndarray:
    """Checks an image and returns it as float32 `[H, W, C]` on the [0, 1] scale, C ∈ {1, 3}, with
    alpha composited on white (as `mmtool.data.media.to_rgb` does for decoded files).

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
    if pix.shape[2] == 4:
        alpha = pix[:, :, 3:]  # [H, W, 1]
        return pix[:, :, :3] * alpha + (1.0 - alpha)  # on white: [H, W, 3]
    return pix  # [H, W, C]


def _resize(pix: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Bilinear, antialiased resize of `[H, W, C]` to `[height, width, C]` (width defaults to height)."""
    import torch
    import torch.nn.functional as F

    width = height if width is None else width
    if (height, width) == pix.shape[:2]:
        return pix
    x = torch.from_numpy(np.ascontiguousarray(pix)).permute(2, 0, 1)[None]  # [1, C, H, W]
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).clamp(0, 1).numpy()  # [height, width, C]


def _short_side(pix: np.ndarray, side: int, crop: bool, upscale: bool) -> np.ndarray:
    """Resizes `[H, W, C]` so that its shorter side is `side` (aspect kept; not enlarged unless
    `upscale`), then center-crops to at most `side`×`side` when `crop`."""
    H, W = pix.shape[:2]
    scale = side / min(H, W)
    if scale < 1 or upscale:
        H, W = max(1, round(H * scale)), max(1, round(W * scale))
        pix = _resize(pix, H, W)
    if crop:
        h, w = min(H, side), min(W, side)
        top, left = (H - h) // 2, (W - w) // 2
        pix = pix[top:top + h, left:left + w]
    return pix  # [H', W', C]


def capped_grid(height: int, width: int, patch_size: int, max_tokens: int) -> tuple[int, int]:
    """The patch grid `(rows, cols)` an image of `height`×`width` gets under `max_tokens`.

    An image whose grid `ceil(H/P) × ceil(W/P)` fits is kept (returned unchanged). Otherwise it is
    scaled by `s = sqrt(max_tokens * P² / (H * W))` and each side rounded down to whole patches,
    `rows = max(1, floor(H * s / P))`, `cols = max(1, floor(W * s / P))`; then, while the cap
    allows, the side furthest below its exact `H * s / P` (or `W * s / P`) grows by one patch. So
    `rows * cols ≤ max_tokens` and the aspect ratio is kept to within one patch. A 640×480 photo
    at P = 4 and the default 256 is 14 rows × 18 columns (56×72 pixels, 252 tokens).
    """
    P = patch_size
    rows, cols = -(-height // P), -(-width // P)
    if rows * cols <= max_tokens:
        return rows, cols
    s = (max_tokens * P * P / (height * width)) ** 0.5
    exact_rows, exact_cols = height * s / P, width * s / P
    rows, cols = max(1, int(exact_rows)), max(1, int(exact_cols))
    while True:  # grow the side furthest below its exact size while the cap allows
        grow = sorted(((exact_rows - rows, 0), (exact_cols - cols, 1)), reverse=True)
        fits = [(d, i) for d, i in grow if (rows + (i == 0)) * (cols + (i == 1)) <= max_tokens]
        if not fits or fits[0][0] <= 0:
            break
        rows, cols = (rows + 1, cols) if fits[0][1] == 0 else (rows, cols + 1)
    while rows * cols > max_tokens:  # only a side clamped to 1 patch can overshoot
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


DEFAULT_MAX_TOKENS = 256
"""The default token cap: 16×16 patches, a 64×64-pixel square at `patch_size=4` (ViT-B/16 at 256
pixels). The built-in images (digits 8×8, the sample PNGs 32×32) are far below it and unchanged."""


@TOKENIZERS.register("patches")
class Patches(Tokenizer):
    """Image → normalized P×P pixel patches: values [rows, cols, P*P*C], patches row-major.

    Each patch is flattened in (py, px, c) order. Steps, in order: alpha composited on white
    (4-channel arrays; decoded files are RGB already, see `mmtool.data.media.load_image`),
    `channels`, `size` or `short_side`, then the `max_tokens` cap. An image whose sides are not
    multiples of P is then padded at the bottom and right with black pixels (0 before
    normalization); `decode` returns the padded image, since a segment keeps no record of the
    original size.

    Sizes. By default (`max_tokens=256`) an image keeps its size when its grid `ceil(H/P) ×
    ceil(W/P)` has at most 256 patches; a larger one is scaled down, aspect kept, to the largest
    whole-patch grid that fits (`capped_grid`: 640×480 at P=4 → 14×18 patches, 56×72 pixels).
    Small images are never enlarged unless `upscale=true` with `short_side`. For the CLIP/ViT
    recipe set `short_side=224` (shorter side to 224, then a 224×224 center crop) and
    `max_tokens=none`, with a patch size to match (e.g. `patch_size=16`: 196 tokens).

    Args:
        patch_size: P, the side of a square patch in pixels.
        size: resize to size×size first (bilinear, antialiased; aspect NOT kept); None keeps the
            image's size. Prefer `short_side`; `size` stays for the folders written with it.
        short_side: resize so the shorter side is this many pixels (aspect kept, bilinear,
            antialiased), then center-crop to short_side×short_side if `crop`; None skips it.
        crop: with `short_side`, center-crop to a square (at most short_side on each side).
        upscale: with `short_side`, also enlarge images whose shorter side is smaller.
        max_tokens: the most patches per image; larger images are scaled down (aspect kept, to
            within one patch) so that rows × cols ≤ max_tokens. None: no cap.
        channels: None keeps the input's channels (3 for decoded files, which `load_image` turns
            to RGB; 1 for grayscale arrays given in memory, such as the built-in digits); 3
            repeats grayscale into RGB; 1 converts RGB to luminance (ITU-R 601).
        mean: subtracted from pixels on the [0, 1] scale; one value or one per channel.
        std: divides pixels after `mean`; one value or one per channel.
    """

    modality = "image"

    def __init__(self, patch_size: int = 4, size: int | None = None, channels: int | None = None,
                 mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
                 short_side: int | None = None, crop: bool = True, upscale: bool = False,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS):
        for name, value in (("patch_size", patch_size), ("size", size), ("short_side", short_side),
                            ("max_tokens", max_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MMToolError(f"patches: {name} must be an integer ≥ 1, got {value!r}")
        if patch_size is None:
            raise MMToolError("patches: patch_size must be an integer ≥ 1, got None")
        if size is not None and short_side is not None:
            raise MMToolError("patches: set size (square, aspect not kept) or short_side, not both")
        if channels not in (None, 1, 3):
            raise MMToolError(f"patches: channels must be 1, 3 or unset, got {channels}")
        if not isinstance(crop, bool) or not isinstance(upscale, bool):
            raise MMToolError(f"patches: crop and upscale must be true or false, got {crop!r}, {upscale!r}")
        self.patch_size, self.size, self.channels = int(patch_size), size, channels
        self.short_side, self.crop, self.upscale, self.max_tokens = short_side, crop, upscale, max_tokens
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
        elif self.short_side is not None:
            pix = _short_side(pix, self.short_side, self.crop, self.upscale)
        if self.max_tokens is not None:
            rows, cols = capped_grid(pix.shape[0], pix.shape[1], self.patch_size, self.max_tokens)
            if rows * cols < -(-pix.shape[0] // self.patch_size) * -(-pix.shape[1] // self.patch_size):
                pix = _resize(pix, rows * self.patch_size, cols * self.patch_size)
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
                "short_side": self.short_side, "crop": self.crop, "upscale": self.upscale,
                "max_tokens": self.max_tokens, "channels": self.channels, "mean": self.mean,
                "std": self.std, "dim": dim}
