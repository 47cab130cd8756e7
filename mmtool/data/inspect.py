"""`mmtool inspect DIR` and `mmtool preprocess ... --dry-run`: what the samples really hold.

For the first N samples: which input column became which segment, tokens per segment, and each
segment decoded by its own tokenizer (`Tokenizer.decode`) from the stored tokens — text as text,
images written as PNG and audio as WAV into an output folder, trajectories as shape, dtype and
range. For a folder, also a summary of its manifest: counts, tokenizers, splits, chunked and cut
text, rejects by reason. The library returns plain dicts; `mmtool.cli.inspect` renders them.
"""

from __future__ import annotations

import inspect as _pyinspect
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np

from mmtool import folders
from mmtool.data import shards as store
from mmtool.data.schema import Sample, Segment, rows_to_samples
from mmtool.data.tokenizers import build_tokenizer
from mmtool.data.tokenizers.base import TOKENIZERS, Tokenizer
from mmtool.errors import MMToolError, RecordError

INSPECT = folders.register_kind(folders.FolderKind("inspect", "an inspect folder (decoded samples)"))
"""`mmtool inspect --out`'s folder: PNG and WAV files decoded from a folder's tokens."""

TEXT_PREVIEW = 400
"""Characters of decoded text shown per segment (the rest is counted, not shown)."""


# ---------------------------------------------------------------------------------------------
# Tokenizers back from their configs


def tokenizer_from_config(config: dict[str, Any]) -> Tokenizer:
    """Rebuilds a tokenizer from the config stored in a manifest: the config keys that are
    constructor arguments are passed (`vocab_size`, `dim` and other derived keys are not)."""
    cls = TOKENIZERS.get(config["name"])
    params = _pyinspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in params and k != "self"}
    if config["name"] == "logmel" and kwargs.get("log") not in ("log10", "ln"):
        kwargs["log"] = "ln"  # folders of the old raw scale store the formula, not the choice
    try:
        return build_tokenizer(config["name"], **kwargs)
    except MMToolError:
        return build_tokenizer(config["name"])


def _decoder(configs: dict[str, dict[str, Any]], seg: Segment,
             cache: dict[str, Tokenizer]) -> Tokenizer:
    """The tokenizer that wrote `seg`, from the manifest's "modality/role[:name]" configs."""
    key = f"{seg.modality}/{seg.role}"
    conf = configs.get(f"{key}:{seg.tokenizer}") or configs.get(key)
    if conf is None or conf.get("name") != seg.tokenizer:
        conf = {"name": seg.tokenizer}
    ck = repr(sorted(conf.items(), key=lambda kv: kv[0]))
    if ck not in cache:
        cache[ck] = tokenizer_from_config(conf)
    return cache[ck]


# ---------------------------------------------------------------------------------------------
# Decoding one segment into something a person can look at


def logmel_to_wave(tok: Any, seg: Segment, iterations: int = 32) -> np.ndarray:
    """An audible approximation of a `logmel` segment: the scaling undone, mel → linear power
    by the filterbank's pseudo-inverse, phase by Griffin-Lim. Float32 `[n]` in [-1, 1] at
    `tok.sample_rate`. Meant for listening (is it speech, is it the right clip), not for metrics."""
    import torch

    from mmtool.data.melspec import mel_filterbank

    spec = torch.from_numpy(np.asarray(tok.decode(seg), np.float32))  # [frames, n_mels]
    mel = torch.exp(spec) if tok.log == "ln" else torch.pow(10.0, spec * 4.0 - 4.0)
    fb = mel_filterbank(tok.sample_rate, tok.n_fft, tok.n_mels, tok.fmin, tok.fmax, tok.mel_scale)
    power = (torch.linalg.pinv(fb) @ mel.T).clamp(min=0)  # [n_freqs, frames]
    mag = power.sqrt()
    window = torch.hann_window(tok.n_fft)
    angles = torch.exp(2j * math.pi * torch.rand(mag.shape))
    length = max((mag.shape[1] - 1) * tok.hop, 1)
    for _ in range(iterations):
        x = torch.istft(mag * angles, tok.n_fft, tok.hop, window=window, length=length)  # [n]
        rebuilt = torch.stft(x, tok.n_fft, tok.hop, window=window, return_complex=True)
        angles = torch.exp(1j * torch.angle(rebuilt))
    x = torch.istft(mag * angles, tok.n_fft, tok.hop, window=window, length=length)
    peak = float(x.abs().max()) or 1.0
    return (x / peak * 0.9).numpy().astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV from float samples in [-1, 1]."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")  # [n]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def describe_segment(tok: Tokenizer, seg: Segment, out: Path | None, stem: str) -> dict[str, Any]:
    """What `seg` holds, decoded: `text`, `file` (PNG/WAV written under `out`), or `array` facts."""
    info: dict[str, Any] = {"modality": seg.modality, "role": seg.role, "tokenizer": seg.tokenizer,
                            "shape": list(seg.shape), "tokens": seg.n_tokens}
    try:
        decoded = tok.decode(seg)
    except NotImplementedError:
        return {**info, "decoded": f"({seg.tokenizer} has no decode)"}
    if isinstance(decoded, str):
        info["text"] = decoded
    elif seg.tokenizer == "patches":
        img = np.asarray(decoded)  # [H, W, C] or [H, W], uint8
        info["image_size"] = [int(img.shape[1]), int(img.shape[0])]
        if out is not None:
            from PIL import Image

            path = out / f"{stem}.png"
            Image.fromarray(img).save(path)
            info["file"] = str(path)
    elif seg.tokenizer == "logmel":
        frames = np.asarray(decoded).shape[0]
        info["seconds"] = round(frames * tok.hop / tok.sample_rate, 3)
        if out is not None:
            path = out / f"{stem}.wav"
            write_wav(path, logmel_to_wave(tok, seg), tok.sample_rate)
            info["file"] = str(path)
    else:
        arr = np.asarray(decoded)
        info["array"] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                         "min": float(arr.min()) if arr.size else None,
                         "max": float(arr.max()) if arr.size else None,
                         "head": arr.reshape(-1)[:6].tolist()}
    return info


def describe_samples(samples: list[Sample], configs: dict[str, dict[str, Any]],
                     mapping: list[dict[str, Any]], out: Path | None) -> list[dict[str, Any]]:
    """Each sample as a dict: id, source, task, split, label, meta and its decoded segments, each
    with `from` (the input columns that map to its modality and role, per `mapping`); images and
    audio are written into `out` (an existing folder) when it is given."""
    cache: dict[str, Tokenizer] = {}
    views = []
    for n, sample in enumerate(samples):
        segments = []
        for k, seg in enumerate(sample.segments):
            stem = f"{n:03d}-{_safe(sample.id)}-{k}-{seg.modality}"
            info = describe_segment(_decoder(configs, seg, cache), seg, out, stem)
            info["from"] = _columns_for(mapping, seg)
            segments.append(info)
        views.append({"id": sample.id, "source": sample.source, "task": sample.task,
                      "split": sample.split, "label": sample.label, "meta": sample.meta,
                      "tokens": sample.n_tokens, "segments": segments})
    return views


def _columns_for(mapping: list[dict[str, Any]], seg: Segment) -> str:
    exact = [m["input"] for m in mapping if m["target"] == seg.modality and m.get("role") == seg.role]
    loose = [m["input"] for m in mapping if m["target"] == seg.modality]
    return ", ".join(exact or loose) or "?"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]


# ---------------------------------------------------------------------------------------------
# A folder, or a dry run


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The counts a user checks first, with defaults for folders written before they existed."""
    sources = manifest.get("sources") or {}
    return {
        "source": (manifest.get("source") or {}).get("name"),
        "options": (manifest.get("plan") or {}).get("options", []),
        "records": manifest.get("records", 0),
        "written": manifest.get("written", manifest.get("records", 0) - manifest.get("rejected", 0)),
        "rejected": manifest.get("rejected", 0),
        "rows": manifest.get("rows", 0),
        "chunked": manifest.get("chunked", sum(s.get("chunked", 0) for s in sources.values())),
        "chunks": manifest.get("chunks", sum(s.get("chunks", 0) for s in sources.values())),
        "truncated": manifest.get("truncated", sum(s.get("truncated", 0) for s in sources.values())),
        "skipped": manifest.get("skipped", {}),
        "splits": manifest.get("splits", {}),
        "modalities": manifest.get("modalities", {}),
        "tokenizers": manifest.get("tokenizers", {}),
        "rejected_by_reason": manifest.get("rejected_by_reason", {}),
        "chunking": manifest.get("chunking"),
        "shards": len(manifest.get("shards", [])),
        "bytes": sum(s.get("bytes", 0) for s in manifest.get("shards", [])),
    }


def inspect_folder(folder: str | Path, n: int = 5, out: str | Path | None = None) -> dict[str, Any]:
    """The view of a preprocessed folder: manifest summary, mapping, and its first `n` samples
    decoded (PNG/WAV files under `out` when given).

    Raises:
        MMToolError: not a preprocessed folder (no or a malformed manifest), or `-n` below 1.
    """
    if n < 1:
        raise MMToolError(f"-n {n}: must be at least 1")
    folder = Path(folder)
    manifest = store.load_manifest(folder)
    samples: list[Sample] = []
    for shard in manifest["shards"]:
        table = store.read_shard(store.shard_path(folder, shard))
        samples += rows_to_samples(table.slice(0, n - len(samples)))
        if len(samples) >= n:
            break
    mapping = manifest.get("mapping") or []
    view = {"folder": str(folder), "summary": manifest_summary(manifest), "mapping": mapping}
    configs = manifest.get("tokenizers") or {}
    if out is None:
        return {**view, "samples": describe_samples(samples, configs, mapping, None)}
    with folders.writer(out, INSPECT.name, overwrite=True):
        return {**view, "samples": describe_samples(samples, configs, mapping, Path(out))}


def dry_run(cfg: Any, n: int = 8) -> dict[str, Any]:
    """`mmtool preprocess ... --dry-run`: map and tokenize the first `n` records of the split as
    the job would (chunking included) and describe them; nothing is written.

    Returns:
        {"mapping", "samples", "records" (read), "rejected" (list of {location, reason}),
         "summary" (counts over the records read)}.
    """
    from mmtool.data.chunking import split_options
    from mmtool.data.tokenizing import TokenizerSet, parse_tokenizer_overrides, to_samples
    from mmtool.data.sources import build_source

    options, chunking = split_options(cfg.options)
    source = build_source(cfg.source, options, split=cfg.split)
    tokenizers = TokenizerSet(parse_tokenizer_overrides(cfg.tokenizers))
    mapping = [row.as_dict() for row in source.mapping()]
    samples, rejected, cut, chunked = [], [], 0, 0
    indices = source.indices()[:n]
    for index in indices:
        try:
            got, was_cut = to_samples(source, tokenizers, index, chunking)
        except RecordError as exc:
            rejected.append({"location": exc.location, "reason": exc.reason})
            continue
        samples += got
        cut += was_cut
        chunked += len(got) > 1
    summary = {"source": cfg.source, "options": list(cfg.options), "records": len(indices),
               "written": len(indices) - len(rejected), "rejected": len(rejected),
               "rows": len(samples), "chunked": chunked, "truncated": cut,
               "skipped": source.skipped(), "tokenizers": tokenizers.configs,
               "chunking": chunking.as_dict(),
               "rejected_by_reason": _count_reasons(rejected)}
    return {"folder": None, "summary": summary, "mapping": mapping, "rejected": rejected,
            "samples": describe_samples(samples, tokenizers.configs, mapping, None)}


def _count_reasons(rejected: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejected:
        counts[r["reason"][:120]] = counts.get(r["reason"][:120], 0) + 1
    return counts
