"""Audio tokenizer: log-mel spectrogram patches, written with torch (no torchaudio, no scipy).

The pipeline: downmix to mono → windowed-sinc polyphase resampling to one rate → STFT (Hann) →
power → triangular mel filterbank → log scaling (`log10`: Whisper's scale, silence at -1) → groups
of `patch_frames` frames as tokens. The signal processing itself (`resample`, `mel_filterbank`,
`mel_power`, `LOG_SCALES`) lives in `mmtool.data.melspec`, imported on first use so that listing
tokenizers does not import torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmtool.data.schema import Audio, Segment
from mmtool.data.tokenizers.base import TOKENIZERS, Tokenizer
from mmtool.errors import MMToolError, RecordError

# -- the tokenizer ---------------------------------------------------------------------------------
def _mono(data: Any, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Checks an `Audio` clip and returns its mono samples `[n]` and sample rate."""
    if not isinstance(data, Audio):
        raise RecordError(f"audio must be an Audio(samples, sample_rate), got {type(data).__name__}")
    sr = data.sample_rate
    if isinstance(sr, bool) or not isinstance(sr, (int, float, np.number)) or sr != int(sr) or sr <= 0:
        raise RecordError(f"audio sample_rate must be a positive integer, got {sr!r}")
    x = np.asarray(data.samples)
    if not np.issubdtype(x.dtype, np.floating):
        raise RecordError(f"audio samples must be floats in [-1, 1], got dtype {x.dtype}")
    if x.ndim == 2 and x.shape[1] > x.shape[0]:
        raise RecordError(f"audio samples must be [n] or [n, channels]; shape {x.shape} looks like [channels, n]")
    if x.ndim not in (1, 2):
        raise RecordError(f"audio samples must be [n] or [n, channels], got shape {x.shape}")
    if x.size == 0:
        raise RecordError("empty audio")
    bad = ~np.isfinite(x)
    if bad.any():
        raise RecordError(f"audio has a NaN or infinite sample (first at sample {np.argwhere(bad)[0][0]})")
    seconds = x.shape[0] / sr
    if max_seconds is not None and seconds > max_seconds:
        raise RecordError(f"audio is {seconds:.1f} s long, over max_seconds={max_seconds}")
    mono = x.mean(axis=1) if x.ndim == 2 else x  # [n]
    return mono.astype(np.float32), int(sr)


LOG_CHOICES = ("log10", "ln")
"""`log=` values; the formulas are `mmtool.data.melspec.LOG_SCALES` (importing it imports torch)."""


@TOKENIZERS.register("logmel")
class LogMel(Tokenizer):
    """Audio → log-mel spectrogram patches of `patch_frames` frames: values [n_patches, frames*n_mels].

    Each patch vector is in (frame, mel) order.

    Scaling (`log`). The default, `log10`, is a fixed transform, `(max(log10(mel), -8) + 4) / 4`:
    Whisper's scale (same front end: 16 kHz, 25 ms / 10 ms frames, 80 Slaney mels, power) with
    its 80 dB range anchored at a fixed level instead of each clip's maximum, so silence is -1.0 in
    every clip. Speech then lies in about [-1, 1.6] (spoken-digits: mean 0.04, std 0.55; a full-scale
    sine peaks at 1.59), on the scale of image patches ([-1, 1]), instead of the raw `ln(mel + 1e-6)`
    (mean -8.5, std 4.3), whose masked-patch MSE (~90) swamped every other loss. A fixed transform
    rather than dataset statistics because it keeps every record independent (preprocessing stays
    one pass, byte-identical for any `--num-proc`, and appendable), and any two folders preprocessed
    with the same options can be mixed, where per-folder statistics would differ and refuse to mix.
    `log=ln` is the old raw scale, kept so that folders written before can be matched: its config,
    padding and decode are exactly the old ones.

    Frames. With `log10`, the clip's last `frames % patch_frames` frames (< 40 ms at the defaults,
    the tail where the centred STFT windows already run past the signal) are dropped so that
    every patch is real audio; only a clip shorter than one patch is padded, with the floor.
    `floor` (the value of silence) is in the config, so that `masked-patch` can leave patches
    that are entirely silence (or padding) out of its targets. With `ln`, the frame count is
    padded up to a multiple of `patch_frames` with ln(1e-6), as before.

    Args:
        sample_rate: every clip is resampled to this rate (Hz) first.
        n_fft: STFT window and FFT length in samples (400 = 25 ms at 16 kHz).
        hop: samples between frames (160 = 10 ms at 16 kHz).
        n_mels: mel bands.
        patch_frames: frames per token.
        max_seconds: longer clips are rejected; None accepts any length.
        mel_scale: "slaney" (librosa/Whisper filters) or "htk"; see `mel_filterbank`.
        fmin, fmax: the filterbank's frequency range in Hz; fmax None is sample_rate / 2.
        log: "log10" (default, normalised, see above) or "ln" (the raw scale of older folders).
    """

    modality = "audio"

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 80,
                 patch_frames: int = 4, max_seconds: float | None = 30.0, mel_scale: str = "slaney",
                 fmin: float = 0.0, fmax: float | None = None, log: str = "log10"):
        if min(sample_rate, n_fft, hop, n_mels, patch_frames) < 1:
            raise MMToolError("logmel: sample_rate, n_fft, hop, n_mels and patch_frames must be ≥ 1")
        if mel_scale not in ("slaney", "htk"):
            raise MMToolError(f"logmel: mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
        if log not in LOG_CHOICES:
            raise MMToolError(f"logmel: log must be one of {', '.join(LOG_CHOICES)}, got {log!r}")
        self.sample_rate, self.n_fft, self.hop, self.n_mels = int(sample_rate), int(n_fft), int(hop), int(n_mels)
        self.patch_frames, self.max_seconds, self.mel_scale = int(patch_frames), max_seconds, mel_scale
        self.fmin, self.fmax = float(fmin), float(sample_rate / 2 if fmax is None else fmax)
        self.log = log

    def encode(self, data: Any, role: str) -> Segment:
        import torch
        import torch.nn.functional as F

        from mmtool.data.melspec import LOG_SCALES, mel_power, resample

        mono, sr = _mono(data, self.max_seconds)
        x = resample(torch.from_numpy(mono), sr, self.sample_rate)  # [n']
        scaling = LOG_SCALES[self.log]
        spec = scaling.fn(mel_power(x, self.sample_rate, self.n_fft, self.hop, self.n_mels, self.fmin,
                                    self.fmax, self.mel_scale))  # [frames, n_mels]
        whole = spec.shape[0] - spec.shape[0] % self.patch_frames
        if self.log != "ln" and whole > 0:
            spec = spec[:whole]  # drop the tail that does not fill a patch: every patch is real audio
        pad = -spec.shape[0] % self.patch_frames
        spec = F.pad(spec, (0, 0, 0, pad), value=scaling.floor)  # [n_patches * patch_frames, n_mels]
        dim = self.patch_frames * self.n_mels
        values = spec.reshape(-1, dim)  # [n_patches, patch_frames * n_mels], (frame, mel) order
        return Segment(self.modality, role, self.registry_name, tuple(values.shape), values=values.numpy())

    def decode(self, segment: Segment) -> np.ndarray:
        """Returns the scaled log-mel spectrogram float32 `[n_patches * patch_frames, n_mels]`: the
        clip's frames up to the last whole patch (`log10`), or every frame plus the padding (`ln`)."""
        return segment.values.reshape(-1, self.n_mels)

    def config(self) -> dict[str, Any]:
        conf = {"name": self.registry_name, "sample_rate": self.sample_rate, "n_fft": self.n_fft,
                "hop": self.hop, "n_mels": self.n_mels, "patch_frames": self.patch_frames,
                "max_seconds": self.max_seconds, "mel_scale": self.mel_scale, "fmin": self.fmin,
                "fmax": self.fmax, "log": "ln(mel + 1e-6)", "dim": self.patch_frames * self.n_mels}
        if self.log != "ln":  # `ln` keeps the old config exactly, so older folders still match
            from mmtool.data.melspec import LOG_SCALES

            scaling = LOG_SCALES[self.log]
            conf.update(log=self.log, transform=scaling.formula, floor=scaling.floor,
                        frames="whole patches (tail < patch_frames dropped)")
        return conf
