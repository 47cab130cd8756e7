"""Decoding helpers: values of decoded images/audio, and a RecordError for every kind of bad input."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
from PIL import Image

from mmtool.data import media
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.errors import RecordError

DIGIT3 = SAMPLE_DATA / "jsonl" / "media" / "digit3.png"
BAD = SAMPLE_DATA / "jsonl" / "bad"


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def wav_bytes(frames: bytes, width: int, channels: int = 1, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


# -- images ---------------------------------------------------------------------------------------

def test_load_image_rgb_png_matches_pillow_from_path_and_bytes():
    expected = np.asarray(Image.open(DIGIT3))
    from_path = media.load_image(DIGIT3)
    from_bytes = media.load_image(DIGIT3.read_bytes())
    assert from_path.dtype == np.uint8 and from_path.shape == (32, 32, 3)
    np.testing.assert_array_equal(from_path, expected)
    np.testing.assert_array_equal(from_bytes, expected)
    assert from_path.max() > 100  # a real digit, not a blank image


@pytest.mark.parametrize("mode,shape", [("L", (5, 7)), ("RGB", (5, 7, 3)), ("RGBA", (5, 7, 4)),
                                        ("1", (5, 7)), ("P", (5, 7, 3)), ("LA", (5, 7, 4))])
def test_load_image_modes_give_uint8_hw_or_hwc(mode, shape):
    im = Image.new(mode, (7, 5))
    arr = media.load_image(png_bytes(im), mode=None)
    assert arr.dtype == np.uint8 and arr.shape == shape
    assert media.load_image(png_bytes(im)).shape == (5, 7, 3)  # the default unifies to RGB


def _photo(h: int = 12, w: int = 10) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def test_gray_palette_cmyk_decode_to_the_rgb_they_show():
    rgb = _photo()
    gray = rgb.convert("L")
    out = media.load_image(_encoded(gray, "PNG"))
    assert out.shape == (12, 10, 3)
    assert all(np.array_equal(out[:, :, c], np.asarray(gray)) for c in range(3))  # gray repeated
    pal = rgb.quantize(16)
    assert pal.mode == "P"
    np.testing.assert_array_equal(media.load_image(_encoded(pal, "PNG")), np.asarray(pal.convert("RGB")))
    cmyk = rgb.convert("CMYK")  # Pillow's naive CMYK (k = 0) converts back exactly
    np.testing.assert_array_equal(media.load_image(_encoded(cmyk, "TIFF")), np.asarray(rgb))
    gray_jpeg = media.load_image(_encoded(gray, "JPEG"))
    assert gray_jpeg.shape == (12, 10, 3)


def test_alpha_is_composited_on_white():
    px = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128], [10, 20, 30, 255]]], np.uint8)
    out = media.load_image(_encoded(Image.fromarray(px, "RGBA"), "PNG"))
    # opaque keeps its colour, transparent is white, half alpha is halfway to white
    np.testing.assert_array_equal(out, [[[255, 0, 0], [255, 255, 255], [127, 127, 255], [10, 20, 30]]])
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    np.testing.assert_array_equal(media.load_image(_encoded(la, "PNG")), [[[255] * 3, [0] * 3]])
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 0, 0])
    pal.putdata([0, 1])
    pal.info["transparency"] = 0
    np.testing.assert_array_equal(media.load_image(_encoded(pal, "PNG")), [[[255] * 3, [200, 0, 0]]])


def test_load_image_16bit_keeps_high_byte():
    data = np.array([[0, 256, 65535]], np.uint16)
    im = Image.fromarray(data)
    assert im.mode == "I;16"
    arr = media.load_image(png_bytes(im), mode=None)
    np.testing.assert_array_equal(arr, [[0, 1, 255]])
    np.testing.assert_array_equal(media.load_image(png_bytes(im))[..., 1], [[0, 1, 255]])


def test_load_image_rejects_too_many_pixels_before_decoding():
    with pytest.raises(RecordError, match=r"5000x5000 = 25000000 pixels, above max_pixels=16777216"):
        media.load_image(BAD / "huge.png")
    with pytest.raises(RecordError, match="above max_pixels=100"):
        media.load_image(DIGIT3, max_pixels=100)


def test_load_image_turns_pillow_bomb_error_into_record_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32*32 = 1024 > 2 * 100: Pillow raises
    with pytest.raises(RecordError, match="decompression bomb"):
        media.load_image(DIGIT3, max_pixels=None)


@pytest.mark.parametrize("src,reason", [
    (BAD / "truncated.png", "truncated"),
    (b"not an image at all", "cannot decode image"),
    (SAMPLE_DATA / "nope.png", "image file not found"),
    (b"", "cannot decode image"),
])
def test_load_image_bad_inputs(src, reason):
    with pytest.raises(RecordError, match=reason) as exc:
        media.load_image(src)
    assert exc.value.location is None  # the source adds it


# -- audio ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,raw,expected", [
    (1, np.array([128, 192, 0], np.uint8).tobytes(), [0.0, 0.5, -1.0]),
    (2, np.array([0, 16384, -32768], "<i2").tobytes(), [0.0, 0.5, -1.0]),
    (3, b"\x00\x00\x00" + b"\x00\x00\x40" + b"\x00\x00\x80", [0.0, 0.5, -1.0]),
    (4, np.array([0, 2**30, -2**31], "<i4").tobytes(), [0.0, 0.5, -1.0]),
])
def test_load_audio_pcm_widths_scale_to_unit_range(width, raw, expected):
    clip = media.load_audio(wav_bytes(raw, width))
    assert clip.sample_rate == 8000
    assert clip.samples.dtype == np.float32 and clip.samples.shape == (3,)
    np.testing.assert_allclose(clip.samples, expected, atol=1e-6)


def test_load_audio_stereo_is_n_by_channels():
    frames = np.array([[0, 16384], [-16384, 0]], "<i2").tobytes()  # interleaved L R
    clip = media.load_audio(wav_bytes(frames, 2, channels=2))
    np.testing.assert_allclose(clip.samples, [[0.0, 0.5], [-0.5, 0.0]])


def test_load_audio_spoken_digit_is_16khz_with_header_length():
    path = SAMPLE_DATA / "spoken_digits" / "seven"
    wav = sorted(path.glob("*.wav"))[0]
    with wave.open(str(wav)) as w:
        n = w.getnframes()
    clip = media.load_audio(wav)
    assert clip.sample_rate == 16000 and clip.samples.shape == (n,)
    assert 0.2 < n / 16000 < 1.0 and 0.1 < np.abs(clip.samples).max() <= 1.0


def test_load_audio_bad_inputs():
    with pytest.raises(RecordError, match="cannot decode audio as PCM WAV"):
        media.load_audio(BAD / "garbage.wav")
    good = wav_bytes(np.zeros(1000, "<i2").tobytes(), 2)
    with pytest.raises(RecordError, match="truncated WAV: header declares 1000 frames"):
        media.load_audio(good[:1000])
    with pytest.raises(RecordError, match="no samples"):
        media.load_audio(wav_bytes(b"", 2))
    with pytest.raises(RecordError, match="audio file not found"):
        media.load_audio(SAMPLE_DATA / "missing.wav")
    with pytest.raises(RecordError, match="cannot decode audio"):
        media.load_audio(good[:30])  # header cut short


# -- text and arrays ------------------------------------------------------------------------------

def test_decode_text_and_read_text_file(tmp_path):
    assert media.decode_text("\ufeffcafé".encode()) == "café"
    with pytest.raises(RecordError, match=r"not valid UTF-8: byte 3"):
        media.decode_text(b"caf\xe9")
    (tmp_path / "a.txt").write_bytes(b"ok\n")
    assert media.read_text_file(tmp_path / "a.txt") == "ok\n"
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(RecordError, match="not valid UTF-8"):
        media.read_text_file(tmp_path / "b.txt")


def test_load_npz_never_unpickles(tmp_path):
    np.savez(tmp_path / "ok.npz", observations=np.ones((2, 3), np.float32), other=np.arange(2))
    out = media.load_npz(tmp_path / "ok.npz", keys=("observations",))
    assert list(out) == ["observations"] and out["observations"].shape == (2, 3)
    np.savez(tmp_path / "obj.npz", actions=np.array([{"x": 1}], dtype=object))
    with pytest.raises(RecordError, match="object .pickled. array"):
        media.load_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"\x80\x04junk")
    with pytest.raises(RecordError, match="not an .npz/.npy file"):
        media.load_npz(tmp_path / "junk.npz")


def test_media_input_resolves_relative_paths_and_hf_dicts(tmp_path):
    assert media.media_input("a/b.png", tmp_path) == tmp_path / "a" / "b.png"
    assert media.media_input({"bytes": b"xy", "path": "p.png"}) == b"xy"
    assert media.media_input({"bytes": None, "path": "/abs/p.png"}, tmp_path).as_posix() == "/abs/p.png"
    with pytest.raises(RecordError, match="expected a file path or bytes"):
        media.media_input(3)


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with orientation 6 ("rotate 90° clockwise to view") decodes upright."""
    stored = np.zeros((2, 3, 3), np.uint8)  # 2 rows × 3 columns as stored
    stored[0, 0] = 255  # top-left as stored
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    out = media.load_image(buf.getvalue())
    assert out.shape == (3, 2, 3)  # upright: 3 rows × 2 columns
    assert out[0, 1].tolist() == [255, 255, 255] and out.sum() == 3 * 255  # stored top-left → top-right
