"""The known-answer check: only one modality carries the label; ablation and probes must find it."""

from __future__ import annotations

import numpy as np
import pytest

from mmtool.data.sources import build_source
from mmtool.data.sources.known_answer import NOISE_WORDS
from mmtool.analysis.sanity import SanityConfig, known_answer_check


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


def test_an_untrained_model_fails_the_check(tmp_path):
    """`mmtool sanity --steps 0`: the model checked is its own untrained twin, so its importance over
    the twin is 0 and the check fails — although the raw ablation of an untrained model does move
    the label loss (what the check used to compare)."""
    out = known_answer_check(SanityConfig(workdir=tmp_path / "s", steps=0, samples=128, batches=2))
    assert not out["passed"]
    assert all(not c["passed"] for c in out["checks"])
    image = out["importance"]["image"]
    assert image["value"] == 0.0 and image["ci95"] == [0.0, 0.0] and image["trained"] == image["twin"]


@pytest.mark.slow
def test_known_answer_image(tmp_path):
    """`mmtool sanity`: fails untrained, passes after 40 steps of a tiny model (positive control 7c:
    the planted modality ranks first over the untrained twin, alone, by ≥ 0.15 nats of label loss)."""
    untrained = known_answer_check(SanityConfig(workdir=tmp_path / "u", informative="image", steps=0))
    assert not untrained["passed"]
    out = known_answer_check(SanityConfig(workdir=tmp_path / "s", informative="image", steps=40))
    failed = [c for c in out["checks"] if not c["passed"]]
    assert not failed, failed
    image = out["importance"]["image"]
    assert image["value"] >= 0.15 and image["ci95"][0] > 0 and image["trained"] > image["twin"]


@pytest.mark.slow
def test_known_answer_text(tmp_path):
    """Text carries the label: the ablation finds it, over the twin, by a wide margin; the probe
    directions are reported but informational for text (`sanity.PROBES_REQUIRED`)."""
    out = known_answer_check(SanityConfig(workdir=tmp_path / "s", informative="text", steps=100,
                                          text_tokenizer="wordpiece"))
    failed = [c for c in out["checks"] if not c["passed"] and c.get("required", True)]
    assert not failed and out["passed"], failed
    assert [c.get("required", True) for c in out["checks"]] == [True, True, False, False]
    text, image = out["importance"]["text"], out["importance"]["image"]
    assert text["ci95"][0] > image["ci95"][1] and text["twin"] < 0.15
