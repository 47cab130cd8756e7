"""Image patches: layout, exact uint8 round trip, padding, resize, channels, errors."""

import pickle

import numpy as np
import pytest

from mmtool.data.tokenizers.image import Patches
from mmtool.errors import MMToolError, RecordError

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(8, 12), (8, 12, 1), (8, 12, 3)])
def test_round_trip_exact(shape):
    img = RNG.integers(0, 256, shape, dtype=np.uint8)
    tok = Patches(patch_size=4)
    seg = tok.encode(img, "image")
    c = shape[2] if len(shape) == 3 else 1
    assert seg.shape == (2, 3, 16 * c) and seg.modality == "image"
    back = tok.decode(seg)
    assert back.dtype == np.uint8
    assert np.array_equal(back, img if c == 3 else img.reshape(8, 12))


def test_patch_layout_and_normalization():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    seg = Patches(patch_size=2, mean=0.0, std=1.0).encode(img, "image")
    v = seg.values.reshape(seg.shape)  # [2, 2, 12]
    # Patch (row 0, col 1) holds pixels rows 0-1, cols 2-3, flattened (py, px, c).
    assert np.allclose(v[0, 1] * 255, img[0:2, 2:4].reshape(-1))
    assert np.allclose(v[1, 0] * 255, img[2:4, 0:2].reshape(-1))
    white = Patches().encode(np.full((4, 4), 255, np.uint8), "image").values
    assert np.allclose(white, 1.0)  # (1 - 0.5) / 0.5
    per_channel = Patches(patch_size=1, mean=[0.0, 0.5, 1.0], std=[1.0, 0.5, 0.25])
    assert np.allclose(per_channel.encode(np.full((1, 1, 3), 255, np.uint8), "i").values, [1, 1, 0])


def test_padding_bottom_right_with_black():
    img = np.full((5, 6), 200, np.uint8)
    tok = Patches(patch_size=4)
    seg = tok.encode(img, "image")
    assert seg.shape == (2, 2, 16)
    back = tok.decode(seg)
    assert back.shape == (8, 8) and np.array_equal(back[:5, :6], img)
    assert back[5:].max() == 0 and back[:, 6:].max() == 0


def test_alpha_dropped_and_channels_option():
    rgba = RNG.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    assert np.array_equal(Patches().decode(Patches().encode(rgba, "image")), rgba[:, :, :3])
    gray = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    tok = Patches(channels=3)
    seg = tok.encode(gray, "image")
    assert seg.shape == (1, 1, 48) and tok.config()["dim"] == 48
    assert np.array_equal(tok.decode(seg), np.repeat(gray[:, :, None], 3, axis=2))
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    luma = Patches(channels=1).decode(Patches(channels=1).encode(red, "image"))
    assert luma.shape == (4, 4) and np.all(luma == 76)  # round(0.299 * 255)
    assert Patches().config()["dim"] is None


def test_resize():
    img = np.full((30, 50, 3), 77, np.uint8)
    tok = Patches(patch_size=4, size=16)
    seg = tok.encode(img, "image")
    assert seg.shape == (4, 4, 48)
    assert np.array_equal(tok.decode(seg), np.full((16, 16, 3), 77, np.uint8))  # flat stays flat
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (8, 1))  # [8, 128], 0..254 left to right
    small = Patches(patch_size=1, size=8).decode(Patches(patch_size=1, size=8).encode(ramp, "i"))
    # PIL's antialiased bilinear (a triangle filter 2 output pixels wide) gives this row:
    assert np.abs(small[0].astype(int) - [18, 47, 79, 111, 143, 175, 207, 236]).max() <= 1


def test_resize_matches_pil():
    from PIL import Image

    img = RNG.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(img).resize((16, 16), Image.BILINEAR)).astype(int)
    tok = Patches(patch_size=4, size=16)
    assert np.abs(tok.decode(tok.encode(img, "image")).astype(int) - pil).max() <= 1


def test_float_images_accepted():
    img = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    tok = Patches()
    assert np.allclose(tok.encode(img / 255.0, "image").values, tok.encode(img, "image").values, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4), np.int64), "uint8"),
    (np.zeros((4,), np.uint8), "shape"),
    (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
    (np.zeros((0, 4), np.uint8), "empty"),
    (np.zeros((4, 4, 2), np.uint8), "channels"),
    (np.full((4, 4), np.nan), "NaN"),
    (np.full((4, 4), 2.0), r"\[0, 1\]"),
    ("not an image", "shape"),
    ([[1, 2], [3]], "not an array"),
])
def test_rejects(bad, match):
    with pytest.raises(RecordError, match=match):
        Patches().encode(bad, "image")


def test_mean_std_mismatch_and_options():
    with pytest.raises(RecordError, match="channels"):
        Patches(mean=[0.1, 0.2, 0.3]).encode(np.zeros((4, 4), np.uint8), "image")
    with pytest.raises(MMToolError):
        Patches(patch_size=0)
    with pytest.raises(MMToolError):
        Patches(channels=2)
    tok = Patches(patch_size=8, size=32, channels=3)
    assert tok.config() == {"name": "patches", "patch_size": 8, "size": 32, "channels": 3,
                            "mean": [0.5], "std": [0.5], "dim": 192}
    assert pickle.loads(pickle.dumps(tok)).config() == tok.config()
