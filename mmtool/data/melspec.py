"""Signal processing for audio, written with torch (no torchaudio, no scipy).

Windowed-sinc polyphase resampling, mel filterbanks (Slaney or HTK), the mel power spectrogram
(STFT with a Hann window → power → triangular mel filters) and the log scalings (`LOG_SCALES`)
that turn it into features. Kept apart from the `logmel` tokenizer so that importing the
tokenizer registry does not import torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

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


def mel_power(x: torch.Tensor | np.ndarray, sample_rate: int, n_fft: int = 400, hop: int = 160,
              n_mels: int = 80, fmin: float = 0.0, fmax: float | None = None,
              scale: str = "slaney") -> torch.Tensor:
    """Mel power spectrogram (no log).

    Frames are centred (the signal is zero-padded by n_fft // 2 on both sides, so clips shorter
    than a window work), with a periodic Hann window.

    Args:
        x: mono samples `[n]`.

    Returns:
        float32 `[1 + n // hop, n_mels]`, ≥ 0.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=True,
                      pad_mode="constant", return_complex=True)  # [n_fft // 2 + 1, frames]
    power = spec.real**2 + spec.imag**2
    mel = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, scale) @ power  # [n_mels, frames]
    return mel.T  # [frames, n_mels]


def log_mel(x: torch.Tensor | np.ndarray, sample_rate: int, n_fft: int = 400, hop: int = 160,
            n_mels: int = 80, fmin: float = 0.0, fmax: float | None = None,
            scale: str = "slaney") -> torch.Tensor:
    """Natural-log mel power spectrogram, `log(mel + 1e-6)` (the `ln` scaling of `mel_power`).

    Returns:
        float32 `[1 + n // hop, n_mels]`.
    """
    return natural_log(mel_power(x, sample_rate, n_fft, hop, n_mels, fmin, fmax, scale))


# -- log scalings ----------------------------------------------------------------------------------
LOG10_FLOOR = -8.0
"""`log10` scaling: mel power below 1e-8 (silence) is clamped to this before the affine map."""


def log10_scaled(mel: torch.Tensor) -> torch.Tensor:
    """Whisper's log-mel scale with a fixed floor: `(max(log10(mel), -8) + 4) / 4`.

    Whisper maps `log10` mel power by `(x + 4) / 4` after clamping to the clip's maximum − 8
    (80 dB). Here the 80 dB range is anchored at a fixed level (log10 mel = -8, which is 104 dB
    below a full-scale sine's peak band and ~87 dB below a typical spoken-digits clip's peak)
    instead of at each clip's maximum, so that silence and padding have one known value, -1.0,
    in every clip. Values lie in [-1, ~1.6] (a full-scale 1 kHz sine peaks at 1.59).
    """
    return (torch.log10(mel).clamp(min=LOG10_FLOOR) + 4.0) / 4.0  # log10(0) = -inf → the floor


def natural_log(mel: torch.Tensor) -> torch.Tensor:
    """The raw scaling `ln(mel + 1e-6)`: silence at ln(1e-6) ≈ -13.8, speech around -8.5 ± 4.3."""
    return torch.log(mel + LOG_EPS)


@dataclass(frozen=True)
class LogScale:
    """One way to turn mel power into features.

    Attributes:
        fn: mel power `[frames, n_mels]` → features of the same shape.
        formula: what `fn` computes, stored in the tokenizer config (folders that differ refuse to mix).
        floor: the value of silence (and of the frames that pad a clip to whole patches).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    formula: str
    floor: float


LOG_SCALES: dict[str, LogScale] = {
    "log10": LogScale(log10_scaled, "(max(log10(mel), -8) + 4) / 4", (LOG10_FLOOR + 4.0) / 4.0),
    "ln": LogScale(natural_log, "ln(mel + 1e-6)", LOG_FLOOR),
}
"""The `logmel` tokenizer's `log=` choices: `log10` (default, normalised) and `ln` (the raw scale
of folders written before the normalisation; kept so that they can still be matched)."""
