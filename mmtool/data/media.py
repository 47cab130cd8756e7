"""Decoding raw media files (images, audio, UTF-8 text, NPZ arrays) into the raw forms of
`mmtool.data.schema.Field.data`, shared by every source.

Images decode to RGB whatever their mode (grayscale, palette, CMYK, alpha composited on white), so
that a folder mixing grayscale and colour files gives one patch size. Audio decodes with the
standard library (integer PCM WAV) or `soundfile` (libsndfile: FLAC, OGG/Vorbis, float WAV, ...).

Every helper turns a bad input into a `RecordError` whose reason names the problem ("image file not
found", "cannot decode image: ...", "image is 5000x5000 = 25000000 pixels, above max_pixels ..."),
without a location: the calling source knows where the record lives and adds it with
`RecordError.at(location)`. Nothing here prints, retries or unpickles.

Inputs are a path or the file's bytes (Hugging Face datasets hand over `{"bytes", "path"}` dicts;
`media_input` picks the right one).
"""

from __future__ import annotations

import io
import os
import wave
import zipfile
import zlib
from pathlib import Path
from typing import Any, Union

import numpy as np

from mmtool.data.schema import Audio
from mmtool.errors import RecordError

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Images with more pixels than this are rejected from their header, before any decoding: a
tiny PNG can expand to gigabytes (a "decompression bomb"), and no patch tokenizer wants them."""


def _describe(src: PathOrBytes) -> str:
    return f"{len(src)} bytes" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _open_binary(src: PathOrBytes, kind: str):
    """Returns a binary file object over `src`, or raises RecordError if the file is missing."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    path = Path(src)
    if not path.is_file():
        raise RecordError(f"{kind} file not found: {path}")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise RecordError(f"cannot open {kind} file {path}: {exc.strerror or exc}") from None


def media_input(value: Any, base_dir: str | os.PathLike | None = None) -> PathOrBytes:
    """Normalises a media reference: a path (relative paths resolved against `base_dir`), bytes, or
    a Hugging Face `{"bytes": ..., "path": ...}` dict (bytes win when present).

    Raises:
        RecordError: the value is none of these.
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(value)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        return path
    raise RecordError(f"expected a file path or bytes, got {type(value).__name__}: {value!r:.80}")


def confined_path(value: str, base_dir: str | os.PathLike, root: str | os.PathLike | None = None,
                  allow_outside: bool = False) -> Path:
    """Resolves a media path from a record and refuses it unless it lies inside the data root.

    Relative paths are taken relative to `base_dir` (e.g. the JSONL's folder); the resolved file,
    symlinks followed, must then lie inside `root` (default: `base_dir`). An absolute path is
    accepted only when it points inside the root, like any other.

    Args:
        value: the path as written in the record.
        base_dir: the folder relative paths start from.
        root: the data root that paths must stay inside; None means `base_dir`.
        allow_outside: skip the check (`--opt allow_outside=true`).

    Raises:
        RecordError: naming the path and why it is outside: absolute, `..` climbing out, or a
            symlink leading out.
    """
    path = Path(value)
    full = path if path.is_absolute() else Path(base_dir) / path
    if allow_outside:
        return full
    top = Path(root if root is not None else base_dir).resolve()
    try:
        inside = full.resolve().is_relative_to(top)
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise RecordError(f"media path {value!r} cannot be resolved: {exc}") from None
    if inside:
        return full
    lexical = Path(os.path.normpath(os.path.abspath(full)))
    lexical_top = Path(os.path.normpath(os.path.abspath(root if root is not None else base_dir)))
    if path.is_absolute() and not lexical.is_relative_to(lexical_top):
        why = "is an absolute path"
    elif not lexical.is_relative_to(lexical_top):
        why = "climbs out with '..'"
    else:
        why = "is a symlink (or under one) that leads"
    raise RecordError(f"media path {value!r} {why} outside the data root {top}; keep media inside "
                      "it, set --opt media_root=DIR, or pass --opt allow_outside=true")


# -- images ---------------------------------------------------------------------------------------

def load_image(src: PathOrBytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               mode: str | None = "RGB") -> np.ndarray:
    """Decodes an image file (anything Pillow reads: PNG, JPEG, GIF's first frame, TIFF, WebP, ...),
    turned upright by its EXIF orientation as cameras write it.

    Args:
        src: a path or the encoded bytes.
        max_pixels: reject images with more pixels than this, checked from the header before the
            pixel data is decoded; None disables the check (Pillow's own bomb limit still applies).
        mode: "RGB" (default) unifies channels: grayscale (1, L, I, F, 16-bit) is repeated into
            three channels, palette images are expanded, CMYK/YCbCr/LAB/HSV are converted by
            Pillow (ICC profiles are not applied), and alpha (RGBA, LA, PA, palette transparency)
            is composited on white. None keeps the file's own layout (see Returns).

    Returns:
        uint8 `[H, W, 3]` with `mode="RGB"`. With `mode=None`: `[H, W]` for grayscale, `[H, W, 3]`
        for colour, `[H, W, 4]` when there is alpha. 16-bit grayscale keeps its 8 most significant
        bits.

    Raises:
        RecordError: missing file, undecodable or truncated data, too many pixels, naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    if mode not in (None, "RGB"):
        raise ValueError(f"load_image: mode must be 'RGB' or None, got {mode!r}")
    what = _describe(src)
    fh = _open_binary(src, "image")
    try:
        try:
            im = Image.open(fh)
        except Image.DecompressionBombError as exc:
            raise RecordError(f"image {what} rejected as a decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise RecordError(f"cannot decode image: not a recognised image format ({what})") \
                from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise RecordError(f"cannot decode image {what}: {exc}") from None
        with im:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise RecordError(f"image {what} has no pixels ({width}x{height})")
            if max_pixels is not None and width * height > max_pixels:
                raise RecordError(
                    f"image is {width}x{height} = {width * height} pixels, above max_pixels="
                    f"{max_pixels}"
                )
            try:
                im.load()
                arr = _to_uint8(_upright(im))
            except Image.DecompressionBombError as exc:
                raise RecordError(f"image {what} rejected as a decompression bomb: {exc}") from None
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                # Pillow says "image file is truncated" / "broken data stream" / zlib errors here.
                raise RecordError(f"cannot decode image (truncated or corrupt {im.format or 'file'}) "
                                  f"{what}: {exc}") from None
    finally:
        fh.close()
    return arr if mode is None else to_rgb(arr)


def _upright(im):
    """The image as it is meant to be seen: a camera's EXIF orientation (tag 274) applied."""
    from PIL import ImageOps

    if im.getexif().get(0x0112, 1) in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _to_uint8(im) -> np.ndarray:
    """A decoded Pillow image as uint8 [H, W] (L), [H, W, 3] (RGB) or [H, W, 4] (RGBA)."""
    mode = im.mode
    if mode.startswith("I;16"):
        return (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
    if mode in ("1", "I", "F"):
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
    elif mode == "LA":
        im = im.convert("RGBA")
    elif mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def to_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 `[H, W]`, `[H, W, 1|3|4]` → uint8 `[H, W, 3]`: gray repeated, alpha composited on white.

    Compositing: `round(c * a / 255 + 255 * (1 - a / 255))` per channel, so a fully transparent
    pixel is white (255) and an opaque one keeps its colour exactly.
    """
    if img.ndim == 2:
        img = img[:, :, None]
    c = img.shape[2]
    if c == 4:
        a = img[:, :, 3:4].astype(np.float32) / 255.0  # [H, W, 1]
        rgb = img[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a)  # [H, W, 3]
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if c == 1:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))  # [H, W, 3]
    return img


# -- audio ----------------------------------------------------------------------------------------

_STREAMING_SIZE = 0x7FFF0000
"""WAV writers that stream (e.g. to a pipe) put a huge placeholder in the data size; such files
are read to their end instead of being called truncated."""


_MAGIC = ((b"RIFF", "WAV"), (b"RIFX", "WAV"), (b"RF64", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "OGG"),
          (b"FORM", "AIFF"), (b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"),
          (b"\xff\xf2", "MP3"), (b".snd", "AU"), (b"caff", "CAF"))
"""Leading bytes → the format named in error messages (libsndfile itself detects the format)."""


def load_audio(src: PathOrBytes) -> Audio:
    """Decodes an audio file to float32 samples in [-1, 1] (no ffmpeg needed).

    Integer PCM WAV (8-bit unsigned, 16/24/32-bit signed, any number of channels) is read with the
    standard library, exactly as before. Everything else goes through `soundfile` (libsndfile):
    float32/float64 WAV, WAVE_FORMAT_EXTENSIBLE, FLAC, OGG/Vorbis and Opus, MP3, AIFF, AU, CAF, ...
    Both scale integers by 2^(bits-1), so a FLAC or float WAV gives the samples of the same int16
    WAV within its quantisation. Resampling and mono mixing are the tokenizer's (`logmel`).

    Returns:
        `Audio` with samples `[n]` for mono or `[n, channels]`.

    Raises:
        RecordError: missing file, unreadable or unsupported format, truncated, or empty; the
            message names the file (or its size in bytes) and the format its header claims.
    """
    what = _describe(src)
    fh = _open_binary(src, "audio")
    try:
        head = fh.read(12)
        fh.seek(0)
        fmt = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
        if fmt == "WAV" and head[:4] == b"RIFF":
            clip = _pcm_wav(fh, what)
            if clip is not None:
                return clip
            fh.seek(0)
        return _soundfile(fh, fmt, what)
    finally:
        fh.close()


def _pcm_wav(fh, what: str) -> Audio | None:
    """Reads an integer-PCM WAV with `wave`; None when its encoding is not integer PCM (float,
    WAVE_FORMAT_EXTENSIBLE on Python < 3.12, compressed), which `soundfile` then reads."""
    try:
        with wave.open(fh, "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            declared = w.getnframes()
            data = w.readframes(declared)
    except wave.Error as exc:
        if "unknown format" in str(exc):
            return None
        raise RecordError(f"cannot decode audio as PCM WAV ({what}): {exc}") from None
    except (EOFError, OSError, ValueError, OverflowError, MemoryError) as exc:  # struct errors: ValueError
        raise RecordError(f"cannot decode audio as PCM WAV ({what}): {exc}") from None
    if channels < 1 or width not in (1, 2, 3, 4) or rate <= 0:
        raise RecordError(
            f"unsupported WAV {what}: {channels} channels, {8 * width}-bit samples, {rate} Hz")
    frame = channels * width
    n = len(data) // frame
    if n < declared and declared * frame < _STREAMING_SIZE:
        raise RecordError(f"truncated WAV: header declares {declared} frames but the file holds {n} "
                          f"({what})")
    if n == 0:
        raise RecordError(f"WAV has no samples ({what})")
    raw = data[: n * frame]
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)  # sign-extend 24 bits
        x = v.astype(np.float32) / float(1 << 23)
    else:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    x = x.reshape(n, channels)
    return Audio(samples=np.ascontiguousarray(x[:, 0] if channels == 1 else x), sample_rate=rate)


def _soundfile(fh, fmt: str | None, what: str) -> Audio:
    """Decodes any format libsndfile reads; float files keep their values (checked finite)."""
    try:
        import soundfile
    except ImportError:
        raise RecordError(f"cannot decode audio {what} ({fmt or 'not integer PCM WAV'}): only integer "
                          "PCM WAV is read without the soundfile package; pip install soundfile") \
            from None
    try:
        with soundfile.SoundFile(fh) as f:
            kind, subtype, rate, frames = f.format, f.subtype, f.samplerate, f.frames
            x = f.read(dtype="float32", always_2d=True)  # [n, channels]
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        named = f"{fmt} " if fmt else ""
        raise RecordError(f"cannot decode audio as PCM WAV or with soundfile ({named}{what}): "
                          f"{exc}") from None
    if rate <= 0 or x.shape[1] < 1:
        raise RecordError(f"unsupported audio {what} ({kind}/{subtype}): {x.shape[1]} channels, {rate} Hz")
    if 0 <= frames < (1 << 62) and len(x) < frames:
        raise RecordError(f"truncated {kind} audio {what}: header declares {frames} frames but "
                          f"{len(x)} could be read")
    if len(x) == 0:
        raise RecordError(f"{kind} audio {what} has no samples")
    if not np.isfinite(x).all():
        raise RecordError(f"{kind}/{subtype} audio {what} has NaN or infinite samples")
    return Audio(samples=np.ascontiguousarray(x[:, 0] if x.shape[1] == 1 else x), sample_rate=int(rate))


# -- text and arrays ------------------------------------------------------------------------------

def decode_text(data: bytes, what: str = "text") -> str:
    """Decodes UTF-8 bytes (a leading BOM is dropped), naming the first bad byte on failure."""
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start: exc.start + 4]
        raise RecordError(
            f"{what} is not valid UTF-8: byte {exc.start} ({bytes(bad)!r}...): {exc.reason}"
        ) from None


def read_text_file(src: PathOrBytes) -> str:
    """Reads a UTF-8 text file (or bytes) strictly."""
    fh = _open_binary(src, "text")
    with fh:
        return decode_text(fh.read(), f"text file {_describe(src)}")


def load_npz(src: PathOrBytes, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Loads arrays from an `.npz` (or `.npy`) file without ever unpickling.

    Args:
        src: a path or the file's bytes.
        keys: load only these keys (missing ones are skipped); None loads all.

    Raises:
        RecordError: missing file, not an npz/npy file, or object (pickled) arrays.
    """
    fh = _open_binary(src, "npz")
    try:
        try:
            loaded = np.load(fh, allow_pickle=False)
        except ValueError:  # neither zip nor npy magic: numpy would only try unpickling it
            raise RecordError("cannot read npz: not an .npz/.npy file") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise RecordError(f"cannot read npz: {exc}") from None
        if isinstance(loaded, np.ndarray):
            return {"arr_0": loaded}
        with loaded:
            out = {}
            for k in loaded.files:
                if keys is not None and k not in keys:
                    continue
                try:
                    out[k] = loaded[k]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                        raise RecordError(f"npz array {k!r} is an object (pickled) array, which is "
                                          "never loaded; save numeric arrays only") from None
                    raise RecordError(f"cannot read npz array {k!r}: {exc}") from None
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                    raise RecordError(f"cannot read npz array {k!r}: {exc}") from None
            return out
    finally:
        fh.close()


def npz_keys(src: PathOrBytes) -> list[str]:
    """The array names in an `.npz` file, sorted, without loading them ([] if it is not a zip)."""
    fh = _open_binary(src, "npz")
    try:
        with zipfile.ZipFile(fh) as zf:
            return sorted(n.removesuffix(".npy") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return []
    finally:
        fh.close()
