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
