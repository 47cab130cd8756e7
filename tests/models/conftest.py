"""Shared fixtures of the model tests: real sample data, built once, and one intra-op thread."""

from __future__ import annotations

import pytest
import torch

from mmtool.data.index import TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is faster and immune to a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> TokenIndex:
    """digits (16 samples, byte-level captions) + cartpole (2 episodes of 50 steps), built once
    per test session (byte text keeps the tied heads small, so training steps stay fast)."""
    root = tmp_path_factory.getbasetemp() / "models-sample-data"
    for source, opts, extra in (("digits", [], {"max_samples": 16, "tokenizers": ["text=bytes"]}),
                                ("cartpole", ["episodes=2", "max_steps=50"], {})):
        if not (root / source / "manifest.json").exists():
            preprocess(PreprocessConfig(source=source, out=root / source, options=opts,
                                        overwrite=True, **extra))
    return TokenIndex([root / "digits", root / "cartpole"])


@pytest.fixture(scope="module")
def av_index(tmp_path_factory) -> TokenIndex:
    """digits (8 samples) + spoken-digits (8 clips) + `silent`: 2 bundled clips with 0.5 s of digital
    silence written before and after them (a real wav folder in the spoken-digits layout), all with
    byte-level text and the default (log10, floor -1) audio scaling; built once per session."""
    import json
    import wave

    import numpy as np

    from mmtool.data.sources.base import SAMPLE_DATA

    root = tmp_path_factory.getbasetemp() / "models-av-data"
    raw = root / "silent-raw"
    if not (raw / "metadata.jsonl").exists():
        lines = (SAMPLE_DATA / "spoken_digits" / "metadata.jsonl").read_text().splitlines()[:2]
        for line in lines:
            meta = json.loads(line)
            with wave.open(str(SAMPLE_DATA / "spoken_digits" / meta["file"])) as w:
                params, pcm = w.getparams(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
            quiet = np.zeros(params.framerate // 2, np.int16)
            (raw / meta["file"]).parent.mkdir(parents=True, exist_ok=True)
            with wave.open(str(raw / meta["file"]), "wb") as w:
                w.setparams(params)
                w.writeframes(np.concatenate([quiet, pcm, quiet]).tobytes())
        (raw / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for name, source, opts, n in (("digits", "digits", [], 8), ("spoken", "spoken-digits", [], 8),
                                  ("silent", "spoken-digits", [f"root={raw}"], None)):
        if not (root / name / "manifest.json").exists():
            preprocess(PreprocessConfig(source=source, out=root / name, options=opts, max_samples=n,
                                        tokenizers=["text=bytes"], overwrite=True))
    return TokenIndex([root / "digits", root / "spoken", root / "silent"])
