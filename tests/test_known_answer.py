"""The known-answer check: only one modality carries the label; ablation and probes must find it."""

from __future__ import annotations

import numpy as np
import pytest

from mmtool.data.sources import build_source
from mmtool.data.sources.known_answer import NOISE_WORDS
from mmtool.sanity import SanityConfig, known_answer_check


def test_source_is_deterministic_and_only_one_modality_knows_the_label():
    img = build_source("known-answer", ["informative=image", "samples=40", "classes=4"])
    txt = build_source("known-answer", ["informative=text", "samples=40", "classes=4"])
    a, b = img.read(7), build_source("known-answer", ["informative=image", "samples=40", "classes=4"]).read(7)
    assert [f.role for f in a.fields] == [f.role for f in b.fields]
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.fields, b.fields))
    for i in range(40):
        r, t = img.read(i), txt.read(i)
        assert r.label == t.label == i % 4 and r.fields[-1].modality == "label"
        caption = next(f.data for f in r.fields if f.modality == "text")
        assert all(w in NOISE_WORDS for w in caption.split())  # image informative: caption is noise
        assert next(f.data for f in t.fields if f.modality == "text").startswith("a handwritten ")
    orders = {tuple(f.modality for f in img.read(i).fields) for i in range(40)}
    assert len(orders) == 2  # random field order, so neither modality always sits by the label
    with pytest.raises(Exception, match="informative"):
        build_source("known-answer", ["informative=audio"])


def test_known_answer_image(tmp_path):
    """The default check (`mmtool sanity`): 40 steps of a tiny model, then the ablation."""
    out = known_answer_check(SanityConfig(workdir=tmp_path / "s", informative="image", steps=40, batches=4))
    failed = [c for c in out["checks"] if not c["passed"]]
    assert not failed, failed
    assert out["gap"] >= 0.3 and out["importance"]["image"]["value"] > 0.3


@pytest.mark.slow
def test_known_answer_text(tmp_path):
    """Text carries the label: the ablation finds it at once; the probe directions hold at 100 steps
    with wordpiece captions (seeds 0 and 1), not with byte captions nor after convergence (README)."""
    out = known_answer_check(SanityConfig(workdir=tmp_path / "s", informative="text", steps=100,
                                          text_tokenizer="wordpiece"))
    failed = [c for c in out["checks"] if not c["passed"]]
    assert not failed, failed
