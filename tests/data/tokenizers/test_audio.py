"""Log-mel audio patches: resampling, the filterbank, the spectrogram, the scaling, patching, errors."""

import math
import pickle

import numpy as np
import pytest
import torch

from mmtool.data.schema import Audio
from mmtool.data.melspec import (LOG_FLOOR, LOG_SCALES, log10_scaled, log_mel, mel_centres,
                                  mel_filterbank, mel_power, resample)
from mmtool.data.sources import build_source
from mmtool.data.tokenizers.audio import LogMel
from mmtool.errors import MMToolError, RecordError


def sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x, sr):
    spec = torch.fft.rfft(torch.as_tensor(x) * torch.hann_window(len(x)))
    return float(spec.abs().argmax()) * sr / len(x)


@pytest.mark.parametrize("orig, new", [(44100, 16000), (8000, 16000), (22050, 16000), (48000, 16000)])
def test_resample_keeps_frequency_and_length(orig, new):
    x = sine(440, orig)
    y = resample(x, orig, new)
    assert len(y) == math.ceil(len(x) * new / orig)
    assert abs(peak_hz(y, new) - 440) <= new / len(y)  # within one FFT bin
    mid = y[len(y) // 4: -len(y) // 4]
    assert float(mid.abs().max()) == pytest.approx(0.5, abs=0.01)  # pass band gain ≈ 1


def test_resample_removes_aliases():
    y = resample(sine(10000, 44100), 44100, 16000)  # above the new Nyquist (8 kHz)
    assert float(y[200:-200].abs().max()) < 0.01
    assert torch.equal(resample(torch.ones(10), 16000, 16000), torch.ones(10))
    assert len(resample(np.ones(441), 44101, 16000)) == 160  # irregular ratio, approximated


def test_filterbank_rows_triangular():
    sr, n_fft, n_mels = 16000, 400, 80
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_centres(n_mels, 0, sr / 2).numpy()
    for scale in ("slaney", "htk"):
        fb = mel_filterbank(sr, n_fft, n_mels, scale=scale).numpy()
        assert fb.shape == (80, 201) and (fb >= 0).all()
        for m, row in enumerate(fb):
            nz = np.flatnonzero(row)
            assert len(nz) >= 1
            lo, hi = (edges if scale == "slaney" else mel_centres(n_mels, 0, sr / 2, "htk").numpy())[[m, m + 2]]
            assert freqs[nz].min() > lo - 1e-6 and freqs[nz].max() < hi + 1e-6  # support inside edges
            top = row.argmax()  # rises to one peak, then falls
            assert (np.diff(row[: top + 1]) >= 0).all() and (np.diff(row[top:]) <= 0).all()
    htk = mel_filterbank(sr, 512, 40, scale="htk").numpy()
    assert htk.max() <= 1.0 + 1e-6 and htk.max() > 0.9  # peak-1 triangles
    # Slaney area normalization: each triangle integrates to ≈ 1 (in Hz).
    slaney = mel_filterbank(sr, 4096, 40).numpy()
    assert np.allclose(slaney.sum(1) * (sr / 4096), 1.0, rtol=0.02)


def test_slaney_scale_values():
    edges = mel_centres(2, 0, 8000)  # 0 Hz, 8 kHz and two points equally spaced in Slaney mel
    assert edges[0] == pytest.approx(0) and edges[-1] == pytest.approx(8000)
    # 8 kHz = 15 + ln(8) / (ln(6.4) / 27) = 45.245 mel; a third of that is 15.082 mel ≈ 1004.9 Hz.
    assert float(edges[1]) == pytest.approx(1000 * math.exp(math.log(6.4) / 27 * (45.245 / 3 - 15)), rel=1e-3)


def test_log_mel_sine_peak_at_nearest_band():
    sr = 16000
    spec = log_mel(sine(1000, sr), sr)  # [frames, 80]
    assert spec.shape == (1 + sr // 160, 80)
    centres = mel_centres(80, 0, sr / 2)[1:-1]
    assert int(spec[10:-10].mean(0).argmax()) == int((centres - 1000).abs().argmin())
    silence = log_mel(np.zeros(1600, np.float32), sr)
    assert torch.allclose(silence, torch.full_like(silence, LOG_FLOOR))


def test_tokenizer_patches_shape_and_decode():
    tok = LogMel()
    seg = tok.encode(Audio(sine(1000, 16000), 16000), "speech")
    frames = 1 + 16000 // 160  # 101: the last frame does not fill a patch of 4 and is dropped
    assert seg.shape == (frames // 4, 320) and seg.modality == "audio"
    spec = tok.decode(seg)  # [100, 80]
    assert spec.shape == (100, 80)
    assert np.allclose(spec, log10_scaled(mel_power(sine(1000, 16000), 16000)).numpy()[:100])
    v = seg.values.reshape(seg.shape)
    assert np.array_equal(v[2, 80:160], spec[9])  # (frame, mel) order: patch 2, frame 1 = frame 9
    assert tok.config()["dim"] == 320


def test_legacy_ln_tokenizer_pads_with_the_ln_floor():
    """`log=ln` is the old raw scale: every frame kept, padded to whole patches with ln(1e-6)."""
    tok = LogMel(log="ln")
    seg = tok.encode(Audio(sine(1000, 16000), 16000), "speech")
    spec = tok.decode(seg)  # [104, 80], three padding frames at the end
    assert seg.shape == (26, 320) and spec.shape == (104, 80)
    assert np.allclose(spec[:101], log_mel(sine(1000, 16000), 16000).numpy())
    assert np.allclose(spec[101:], LOG_FLOOR)
    # Its config is exactly the one folders were written with before the log10 scaling existed.
    assert tok.config() == {"name": "logmel", "sample_rate": 16000, "n_fft": 400, "hop": 160, "n_mels": 80,
                            "patch_frames": 4, "max_seconds": 30.0, "mel_scale": "slaney", "fmin": 0.0,
                            "fmax": 8000.0, "log": "ln(mel + 1e-6)", "dim": 320}


def test_log10_scaling_known_values():
    """(max(log10(mel), -8) + 4) / 4: silence at -1, mel 1e-4 at 0, 1 at 1, 100 at 1.5."""
    mel = torch.tensor([0.0, 1e-12, 1e-8, 1e-4, 1.0, 100.0])
    assert torch.allclose(log10_scaled(mel), torch.tensor([-1.0, -1.0, -1.0, 0.0, 1.0, 1.5]), atol=1e-6)
    assert LOG_SCALES["log10"].floor == -1.0 and LOG_SCALES["ln"].floor == LOG_FLOOR
    silence = LogMel().encode(Audio(np.zeros(16000, np.float32), 16000), "s")
    assert silence.shape == (25, 320) and np.all(silence.values == -1.0)  # exactly the floor
    conf = LogMel().config()
    assert (conf["log"], conf["floor"], conf["transform"]) == ("log10", -1.0, "(max(log10(mel), -8) + 4) / 4")


def test_log10_pure_tone_matches_the_analytic_spectrum():
    """A sine of amplitude A on FFT bin k (1 kHz = bin 25 of 400 at 16 kHz): the periodic Hann
    window (Σw = N/2) gives |X_k| = A·N/4, |X_k±1| = A·N/8 and 0 elsewhere, so every interior
    frame's mel power is A²·(N²/16·fb[:, k] + N²/64·(fb[:, k-1] + fb[:, k+1]))."""
    a, n = 0.5, 400
    fb = mel_filterbank(16000, n, 80).double()  # [80, 201]
    mel = a**2 * (n**2 / 16 * fb[:, 25] + n**2 / 64 * (fb[:, 24] + fb[:, 26]))  # [80]
    expected = ((mel.log10().clamp(min=-8) + 4) / 4).float()  # bands the tone misses sit at -1
    spec = torch.from_numpy(LogMel().decode(LogMel().encode(Audio(sine(1000, 16000, amp=a), 16000), "s")))
    assert torch.allclose(spec[5:-5], expected.expand(90, 80), atol=2e-3)
    top = int(expected.argmax())
    assert float(spec[50, top]) == pytest.approx(float(expected[top]), abs=1e-4)
    assert float(expected[top]) == pytest.approx(1.4397, abs=1e-3)  # mel power ≈ 57.4 in the peak band


def test_builtin_spoken_digits_lie_in_the_documented_range():
    """The fixed log10 scaling puts the bundled clips in [-1, 1.6] with mean ≈ 0.06, std ≈ 0.54
    (the old ln scale: mean -8.5, std 4.3), the same scale as image patches in [-1, 1]."""
    source = build_source("spoken-digits")
    new, old, frames = [], [], 0
    for i in range(len(source)):
        clip = source.read(i).fields[0].data
        seg = LogMel().encode(clip, "speech")
        new.append(seg.values.reshape(seg.shape))
        old.append(LogMel(log="ln").encode(clip, "speech").values)
        frames += (1 + len(clip.samples) // 160) // 4  # whole patches of each clip (all at 16 kHz)
    v = np.concatenate(new)  # [1063, 320]
    assert v.shape == (frames, 320) == (1063, 320)
    assert v.min() == -1.0 and v.max() < 1.6
    assert v.mean() == pytest.approx(0.062, abs=0.01) and v.std() == pytest.approx(0.539, abs=0.01)
    assert np.mean(v == -1.0) == pytest.approx(0.043, abs=0.005)  # silent bins: at the floor
    raw = np.concatenate(old)
    assert raw.mean() == pytest.approx(-8.50, abs=0.05) and raw.std() == pytest.approx(4.31, abs=0.05)


def test_tokenizer_resamples_and_downmixes():
    tok = LogMel(n_mels=40, patch_frames=2)
    stereo = np.stack([sine(1000, 44100), sine(1000, 44100)], axis=1)  # [n, 2]
    a = tok.decode(tok.encode(Audio(stereo, 44100), "speech"))
    b = tok.decode(tok.encode(Audio(sine(1000, 16000), 16000), "speech"))
    assert a.shape == b.shape == (100, 40)  # 101 frames, the last one dropped
    # Same spectrum after resampling: 0.1 in ln units (the bound before the scaling) is 0.0109 here.
    assert np.abs(a[5:-5] - b[5:-5]).max() < 0.1 / (4 * math.log(10))
    short = tok.encode(Audio(np.zeros(10, np.float32), 16000), "speech")  # 1 frame: padded to a patch
    assert short.shape == (1, 80) and np.all(short.values == -1.0)
    assert pickle.loads(pickle.dumps(tok)).config() == tok.config()


@pytest.mark.parametrize("bad, match", [
    (np.zeros(100), "an Audio"),
    (Audio(np.zeros(0, np.float32), 16000), "empty audio"),
    (Audio(np.array([0.0, np.nan], np.float32), 16000), "at sample 1"),
    (Audio(np.array([0.0, 0.0, np.inf], np.float32), 16000), "infinite"),
    (Audio(np.zeros(100, np.float32), 0), "sample_rate"),
    (Audio(np.zeros(100, np.float32), -16000), "sample_rate"),
    (Audio(np.zeros(100, np.float32), 16000.5), "sample_rate"),
    (Audio(np.zeros(100, np.int16), 16000), "floats"),
    (Audio(np.zeros((2, 100), np.float32), 16000), "channels, n"),
    (Audio(np.zeros((10, 2, 2), np.float32), 16000), "shape"),
    (Audio(np.zeros(31 * 8000, np.float32), 8000), "31.0 s long, over max_seconds=30"),
])
def test_rejects(bad, match):
    with pytest.raises(RecordError, match=match):
        LogMel().encode(bad, "speech")


def test_options():
    assert LogMel(max_seconds=None).encode(Audio(np.zeros(31 * 800, np.float32), 800), "s").shape[1] == 320
    with pytest.raises(MMToolError):
        LogMel(mel_scale="mystery")
    with pytest.raises(MMToolError):
        LogMel(hop=0)
    with pytest.raises(MMToolError, match="log must be one of log10, ln"):
        LogMel(log="db")


def test_folders_with_different_scalings_refuse_to_mix(tmp_path):
    from mmtool.data.index import TokenIndex
    from mmtool.data.preprocess import PreprocessConfig, preprocess

    for name, tok in (("log10", []), ("ln", ["audio=logmel:log=ln"]), ("log10b", [])):
        preprocess(PreprocessConfig(source="spoken-digits", out=tmp_path / name, max_samples=2, tokenizers=tok))
    assert TokenIndex([tmp_path / "log10", tmp_path / "log10b"]).streams  # same scaling: they mix
    with pytest.raises(MMToolError, match="tokenizer"):
        TokenIndex([tmp_path / "log10", tmp_path / "ln"])


# -- audio as users have it: FLAC, OGG, float WAV through soundfile --------------------------------

def _spoken_digit():
    """A real clip (spoken-digits "seven", int16 PCM WAV at 16 kHz): its path and int16 samples."""
    import wave

    from mmtool.data.sources.base import SAMPLE_DATA

    path = sorted((SAMPLE_DATA / "spoken_digits" / "seven").glob("*.wav"))[0]
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        ints = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return path, ints, w.getframerate()


@pytest.mark.parametrize("fmt, subtype, tol", [
    ("FLAC", "PCM_16", 0.0),        # lossless, same bits: exact
    ("FLAC", "PCM_24", 0.0),        # int16 values stored in 24 bits: exact
    ("WAV", "FLOAT", 0.0),          # float32 WAV of int16/32768: exact
    ("WAV", "DOUBLE", 0.0),
    ("WAV", "PCM_24", 0.0),
    ("OGG", "VORBIS", 0.05),        # lossy: close, not equal
])
def test_soundfile_formats_decode_to_the_int16_wav_samples(tmp_path, fmt, subtype, tol):
    import soundfile

    from mmtool.data import media

    wav, ints, sr = _spoken_digit()
    ref = media.load_audio(wav)  # the stdlib integer-PCM path
    np.testing.assert_array_equal(ref.samples, ints / np.float32(32768))
    out = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(out, ints.astype(np.float64) / 32768, sr, format=fmt, subtype=subtype)
    clip = media.load_audio(out)
    assert clip.sample_rate == sr and clip.samples.dtype == np.float32
    if tol == 0.0:
        np.testing.assert_array_equal(clip.samples, ref.samples)
    else:
        n = min(len(clip.samples), len(ref.samples))
        assert abs(len(clip.samples) - len(ref.samples)) < sr // 100
        assert np.sqrt(np.mean((clip.samples[:n] - ref.samples[:n]) ** 2)) < tol
    tok = LogMel()
    a, b = tok.encode(clip, "speech").values, tok.encode(ref, "speech").values
    assert a.shape == b.shape and (np.abs(a - b).max() < 1e-6 if tol == 0.0 else np.mean(np.abs(a - b)) < 0.1)


def test_float_wav_keeps_values_between_int16_steps_and_mixes_channels(tmp_path):
    import soundfile

    from mmtool.data import media

    x = sine(440, 22050, 0.5, amp=0.3).astype(np.float32)  # float values int16 cannot hold exactly
    stereo = np.stack([x, -0.5 * x], axis=1)  # [n, 2]
    soundfile.write(tmp_path / "s.wav", stereo, 22050, subtype="FLOAT")
    clip = media.load_audio(tmp_path / "s.wav")
    np.testing.assert_array_equal(clip.samples, stereo)  # [n, 2], bit for bit
    mono = LogMel().encode(clip, "speech")
    direct = LogMel().encode(Audio(0.25 * x, 22050), "speech")  # the mean of the two channels
    np.testing.assert_allclose(mono.values, direct.values, atol=1e-5)


def test_audio_errors_name_the_file_and_format(tmp_path):
    import soundfile

    from mmtool.data import media

    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"fLaC" + bytes(range(200)))
    with pytest.raises(RecordError, match=r"FLAC .*broken\.flac"):
        media.load_audio(bad)
    soundfile.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1]), 8000, subtype="FLOAT")
    with pytest.raises(RecordError, match=r"WAV/FLOAT audio .*nan\.wav has NaN"):
        media.load_audio(tmp_path / "nan.wav")
    noise = tmp_path / "noise.ogg"
    noise.write_bytes(b"\x00" * 64)
    with pytest.raises(RecordError, match=r"cannot decode audio as PCM WAV or with soundfile \(.*noise\.ogg"):
        media.load_audio(noise)
