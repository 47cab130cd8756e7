"""Log-mel audio patches: resampling, the filterbank, the spectrogram, patching, errors."""

import math
import pickle

import numpy as np
import pytest
import torch

from mmtool.data.schema import Audio
from mmtool.data.melspec import LOG_FLOOR, log_mel, mel_centres, mel_filterbank, resample
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
    frames = 1 + 16000 // 160  # 101
    assert seg.shape == (math.ceil(frames / 4), 320) and seg.modality == "audio"
    spec = tok.decode(seg)  # [104, 80], three padding frames at the end
    assert spec.shape == (104, 80)
    assert np.allclose(spec[:frames], log_mel(sine(1000, 16000), 16000).numpy())
    assert np.allclose(spec[frames:], LOG_FLOOR)
    v = seg.values.reshape(seg.shape)
    assert np.array_equal(v[2, 80:160], spec[9])  # (frame, mel) order: patch 2, frame 1 = frame 9
    assert tok.config()["dim"] == 320


def test_tokenizer_resamples_and_downmixes():
    tok = LogMel(n_mels=40, patch_frames=2)
    stereo = np.stack([sine(1000, 44100), sine(1000, 44100)], axis=1)  # [n, 2]
    a = tok.decode(tok.encode(Audio(stereo, 44100), "speech"))
    b = tok.decode(tok.encode(Audio(sine(1000, 16000), 16000), "speech"))
    assert a.shape == b.shape == (102, 40)
    assert np.abs(a[5:-5] - b[5:-5]).max() < 0.1  # same spectrum after resampling
    short = tok.encode(Audio(np.zeros(10, np.float32), 16000), "speech")
    assert short.shape == (1, 80)
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
