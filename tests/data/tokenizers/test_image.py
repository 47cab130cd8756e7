"""Image patches: layout, exact uint8 round trip, padding, resize, channels, errors."""

import pickle

import numpy as np
import pytest

from mmtool.data import media
from mmtool.data.tokenizers.image import Patches, capped_grid
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


def test_alpha_composited_on_white_and_channels_option():
    rgba = RNG.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    back = Patches().decode(Patches().encode(rgba, "image")).astype(int)
    assert np.abs(back - media.to_rgb(rgba)).max() <= 1  # float vs uint8 rounding of the same blend
    clear = np.zeros((4, 4, 4), np.uint8)  # fully transparent black → white
    assert np.all(Patches().decode(Patches().encode(clear, "image")) == 255)
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
    with pytest.raises(MMToolError, match="not both"):
        Patches(size=32, short_side=32)
    with pytest.raises(MMToolError, match="max_tokens"):
        Patches(max_tokens=0)
    tok = Patches(patch_size=8, size=32, channels=3)
    assert tok.config() == {"name": "patches", "patch_size": 8, "size": 32, "short_side": None,
                            "crop": True, "upscale": False, "max_tokens": 256, "channels": 3,
                            "mean": [0.5], "std": [0.5], "dim": 192}
    assert pickle.loads(pickle.dumps(tok)).config() == tok.config()


# -- images as users have them: photos capped, modes unified, built-in data unchanged ---------------

def _photo_640x480() -> "Image.Image":
    """A real photo (scikit-learn's bundled china.jpg, 640×427) resized to 640×480."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).resize((640, 480), Image.BICUBIC)


def _file(im, fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def test_photo_is_capped_to_documented_grid_keeping_aspect():
    from PIL import Image

    photo = _photo_640x480()
    img = media.load_image(_file(photo, "JPEG"))
    assert img.shape == (480, 640, 3)
    tok = Patches()  # defaults: patch_size 4, max_tokens 256
    seg = tok.encode(img, "image")
    assert seg.shape == (14, 18, 48) and 14 * 18 <= 256  # 56×72 pixels, aspect 1.29 vs 1.33
    assert capped_grid(480, 640, 4, 256) == (14, 18)
    back = tok.decode(seg).astype(int)  # [56, 72, 3]
    pil = np.asarray(Image.fromarray(img).resize((72, 56), Image.BILINEAR)).astype(int)
    assert np.abs(back - pil).mean() < 1.0 and np.abs(back - pil).max() <= 8  # the same picture
    uncapped = Patches(max_tokens=None).encode(img, "image")
    assert uncapped.shape == (120, 160, 48)  # 19,200 tokens without the cap


@pytest.mark.parametrize("h, w, cap, grid", [(1000, 10, 16, (16, 1)), (10, 1000, 16, (1, 16)),
                                             (8, 8, 4, (2, 2)), (9, 8, 4, (2, 2)), (1000, 1000, 10, (3, 3)), (64, 64, 256, (16, 16))])
def test_capped_grid_never_exceeds_the_cap(h, w, cap, grid):
    assert capped_grid(h, w, 4, cap) == grid
    rows, cols = grid
    assert rows * cols <= cap


def test_short_side_then_center_crop_and_no_upscale_unless_asked():
    photo = media.load_image(_file(_photo_640x480()))
    tok = Patches(patch_size=16, short_side=224, max_tokens=None)
    assert tok.encode(photo, "image").shape == (14, 14, 768)  # 480→224, 640→299, crop 224×224
    rect = Patches(patch_size=16, short_side=224, crop=False, max_tokens=None).encode(photo, "image")
    assert rect.shape == (14, 19, 768)  # 224×299, padded to 19 patch columns
    small = RNG.integers(0, 256, (8, 12), dtype=np.uint8)
    kept = Patches(short_side=224).decode(Patches(short_side=224).encode(small, "image"))
    assert np.array_equal(kept, small)  # not enlarged; 8×12 fits the 224 crop
    assert Patches(short_side=224, upscale=True, max_tokens=None).encode(small, "image").shape == (56, 56, 16)
    centre = np.zeros((4, 12), np.uint8)
    centre[:, 4:8] = 255
    assert np.all(Patches(short_side=4).decode(Patches(short_side=4).encode(centre, "image")) == 255)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "TIFF"),
                                       ("P", "PNG"), ("LA", "PNG")])
def test_every_mode_gives_the_same_three_channel_stream_as_rgb(mode, fmt):
    """A file in any mode tokenizes as the RGB picture it shows: same shape, same values."""
    photo = _photo_640x480().resize((64, 48))
    im = photo.convert(mode) if mode != "P" else photo.quantize(64)
    as_file = media.load_image(_file(im, fmt))
    shown = im.convert("RGB") if fmt != "JPEG" else None
    if shown is None:  # lossy: compare with the same JPEG decoded by Pillow as RGB
        from PIL import Image
        import io

        shown = Image.open(io.BytesIO(_file(im, fmt))).convert("RGB")
    tok = Patches()
    seg, ref = tok.encode(as_file, "image"), tok.encode(np.asarray(shown), "image")
    assert seg.shape == ref.shape == (12, 16, 48)
    assert np.array_equal(seg.values, ref.values)


def test_builtin_digits_unchanged():
    """Digits (8×8 gray arrays) keep 4 one-channel tokens each: bytes as before the cap existed."""
    from mmtool.data.sources import build_source

    src = build_source("digits")
    new, old = Patches(), Patches(max_tokens=None)
    tokens = 0
    for i in range(0, len(src), 7):
        image = next(f.data for f in src.read(i).fields if f.modality == "image")
        seg = new.encode(image, "image")
        assert seg.shape == (2, 2, 16)
        assert np.array_equal(seg.values, old.encode(image, "image").values)
        tokens += seg.shape[0] * seg.shape[1]
    assert len(src) == 1797 and tokens == 4 * len(range(0, 1797, 7)) == 1028


def test_a_config_written_before_the_cap_still_builds_and_decodes():
    """Manifests written before `short_side`/`crop`/`upscale`/`max_tokens` existed name only the
    old options; rebuilt from them (as `load_pretrained` does), the tokenizer decodes their segments."""
    import inspect

    from mmtool.data.tokenizers import build_tokenizer

    old_conf = {"name": "patches", "patch_size": 4, "size": None, "channels": None, "mean": [0.5],
                "std": [0.5], "dim": None}
    accepted = inspect.signature(Patches.__init__).parameters
    tok = build_tokenizer("patches", **{k: v for k, v in old_conf.items() if k != "name" and k in accepted})
    img = RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)  # 1,200 patches at native size
    seg = Patches(max_tokens=None).encode(img, "image")  # as the old default wrote it
    assert np.array_equal(tok.decode(seg), img)
    assert {k: tok.config()[k] for k in old_conf if k != "name"} == {k: v for k, v in old_conf.items() if k != "name"}
