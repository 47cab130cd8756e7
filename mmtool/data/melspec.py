"""Signal processing for audio, written with torch (no torchaudio, no scipy).

Windowed-sinc polyphase resampling, mel filterbanks (Slaney or HTK) and the log-mel spectrogram
(STFT with a Hann window → power → triangular mel filters → natural log). Kept apart from the
`logmel` tokenizer so that importing the tokenizer registry does not import torch.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

LOG_EPS = 1e-6
"""Added to mel power before the log: silence maps to log(1e-6) ≈ -13.8, the floor."""

LOG_FLOOR = math.log(LOG_EPS)


# -- resampling ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _sinc_kernels(up: int, down: int, zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters for resampling by `up/down` (coprime).

    Output sample j = q*up + p sits at input time q*down + p*down/up. Phase p's filter reads the
    input window x[q*down - width : q*down + down + width], so one strided conv1d computes all phases.

    Returns:
        kernels `[up, 1, 2*width + down]` and `width`, the filter's half-length in input samples.
    """
    cutoff = min(1.0, up / down) * rolloff  # low-pass cutoff as a fraction of the input's Nyquist
    width = math.ceil(zeros / cutoff)  # `zeros` sinc zero crossings on each side
    k = torch.arange(2 * width + down, dtype=torch.float64)  # [K] tap index in the window
    phase = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # [up, 1]
    d = phase - k + width  # [up, K] distance from output time to input sample, in input samples
    window = torch.cos(d.clamp(-width, width) * math.pi / (2 * width)) ** 2  # Hann, 0 at |d| = width
    h = cutoff * torch.sinc(cutoff * d) * window  # [up, K]; rows sum to ≈ 1 (unit DC gain)
    return h.to(torch.float32)[:, None, :], width


def resample(x: torch.Tensor | np.ndarray, orig_sr: int, new_sr: int, zeros: int = 16,
             rolloff: float = 0.945) -> torch.Tensor:
    """Resamples mono audio with a Hann-windowed sinc low-pass (band-limited interpolation).

    A ratio whose reduced denominator exceeds 1000 (e.g. 44101 → 16000) is replaced by its nearest
    fraction with denominator ≤ 1000, changing pitch by under 1e-6 relative, to bound the filter table.

    Args:
        x: samples `[n]`.
        orig_sr, new_sr: sample rates in Hz.
        zeros: sinc zero crossings kept on each side (filter length; quality vs. speed).
        rolloff: cutoff as a fraction of the lower Nyquist frequency, leaving a transition band.

    Returns:
        float32 `[ceil(n * new_sr / orig_sr)]`.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    if orig_sr == new_sr:
        return x
    ratio = Fraction(int(new_sr), int(orig_sr))
    if ratio.denominator > 1000:
        ratio = ratio.limit_denominator(1000)
    up, down = ratio.numerator, ratio.denominator
    kernels, width = _sinc_kernels(up, down, zeros, rolloff)
    n = x.numel()
    n_out = -(-n * up // down)
    blocks = -(-n_out // up)  # conv outputs, each `up` samples
    right = max(0, (blocks - 1) * down + kernels.shape[-1] - n - width)
    xp = F.pad(x[None, None], (width, right))  # [1, 1, width + n + right]
    y = F.conv1d(xp, kernels, stride=down)  # [1, up, blocks]
    return y[0].T.reshape(-1)[:n_out]  # [n_out]


# -- mel spectrogram -------------------------------------------------------------------------------
def hz_to_mel(f: torch.Tensor, scale: str = "slaney") -> torch.Tensor:
    """Hz → mel. "slaney": linear below 1 kHz, logarithmic above (librosa); "htk": 2595·log10(1 + f/700)."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    logstep = math.log(6.4) / 27.0
    return torch.where(f < 1000.0, f * 3.0 / 200.0, 15.0 + torch.log(f.clamp(min=1e-10) / 1000.0) / logstep)


def mel_to_hz(m: torch.Tensor, scale: str = "slaney") -> torch.Tensor:
    """The inverse of `hz_to_mel`."""
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    logstep = math.log(6.4) / 27.0
    return torch.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * torch.exp(logstep * (m - 15.0)))


def mel_centres(n_mels: int, fmin: float, fmax: float, scale: str = "slaney") -> torch.Tensor:
    """The `n_mels + 2` filter edges in Hz, equally spaced in mel; filter m peaks at edge m + 1."""
    lo, hi = hz_to_mel(torch.tensor([fmin, fmax], dtype=torch.float64), scale)
    return mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64), scale)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None, scale: str = "slaney") -> torch.Tensor:
    """Triangular mel filters over the STFT bins.

    "slaney" reproduces `librosa.filters.mel` defaults (Slaney scale, each triangle scaled to unit
    area: the filters Whisper uses); "htk" gives HTK-scale triangles of peak 1 (torchaudio's default).

    Returns:
        float32 `[n_mels, n_fft // 2 + 1]`; row m rises from edge m to 1 at edge m+1, falls to edge m+2.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # [n_freqs]
    edges = mel_centres(n_mels, fmin, fmax, scale)  # [n_mels + 2]
    gaps = edges.diff()  # [n_mels + 1]
    ramps = edges[:, None] - freqs[None, :]  # [n_mels + 2, n_freqs]
    rising = -ramps[:-2] / gaps[:-1, None]  # [n_mels, n_freqs]
    falling = ramps[2:] / gaps[1:, None]
    fb = torch.minimum(rising, falling).clamp(min=0)
    if scale == "slaney":
        fb = fb * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return fb.to(torch.float32)


def log_mel(x: torch.Tensor | np.ndarray, sample_rate: int, n_fft: int = 400, hop: int = 160,
            n_mels: int = 80, fmin: float = 0.0, fmax: float | None = None,
            scale: str = "slaney") -> torch.Tensor:
    """Natural-log mel power spectrogram, `log(mel + 1e-6)`.

    Frames are centred (the signal is zero-padded by n_fft // 2 on both sides, so clips shorter
    than a window work), with a periodic Hann window.

    Args:
        x: mono samples `[n]`.

    Returns:
        float32 `[1 + n // hop, n_mels]`.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=True,
                      pad_mode="constant", return_complex=True)  # [n_fft // 2 + 1, frames]
    power = spec.real**2 + spec.imag**2
    mel = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, scale) @ power  # [n_mels, frames]
    return torch.log(mel + LOG_EPS).T  # [frames, n_mels]
