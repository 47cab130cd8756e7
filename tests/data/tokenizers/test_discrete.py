"""Discrete actions and labels: ids, shapes, bounds, errors."""

import numpy as np
import pytest

from mmtool.data.tokenizers import build_tokenizer
from mmtool.data.tokenizers.discrete import Discrete, Label
from mmtool.errors import MMToolError, RecordError


def test_discrete_shapes_and_round_trip():
    tok = Discrete(num_classes=4)
    seg = tok.encode([0, 3, 1], "action")
    assert seg.shape == (3, 1) and seg.ids.tolist() == [0, 3, 1] and seg.modality == "action"
    x = np.array([[0, 1], [2, 3], [3, 0]])
    seg = tok.encode(x, "action")
    assert seg.shape == (3, 2) and np.array_equal(tok.decode(seg), x)
    assert tok.encode(np.array([1.0, 2.0]), "action").ids.tolist() == [1, 2]  # whole floats ok
    assert tok.config() == {"name": "discrete", "num_classes": 4, "vocab_size": 4}


def test_discrete_unknown_num_classes():
    tok = Discrete()
    assert tok.encode([7, 1000], "action").ids.tolist() == [7, 1000]
    assert tok.config()["vocab_size"] is None
    with pytest.raises(RecordError, match="int32"):
        tok.encode([2**31], "action")


@pytest.mark.parametrize("bad, match", [
    ([0, -1], r"-1 at row 1, column 0 is outside \[0, num_classes=4\)"),
    ([[0, 1], [4, 0]], r"4 at row 1, column 0 is outside"),
    ([0.5], "not an integer"),
    ([1.0, np.nan], "row 1, column 0 is not finite"),
    ([[0, 1], [2]], "ragged action rows: row 1 has 1 values, row 0 has 2"),
    ([], "empty"),
    (["a"], "must be numbers"),
    (np.zeros((2, 2, 2), int), "shape"),
])
def test_discrete_rejects(bad, match):
    with pytest.raises(RecordError, match=match):
        Discrete(num_classes=4).encode(bad, "action")


def test_label():
    tok = Label(num_classes=10)
    seg = tok.encode(7, "label")
    assert seg.shape == (1,) and seg.ids.tolist() == [7] and tok.decode(seg) == 7
    assert tok.decode(tok.encode(np.int64(3), "label")) == 3
    assert tok.config() == {"name": "label", "num_classes": 10, "vocab_size": 10}
    assert build_tokenizer("label").config()["vocab_size"] is None


@pytest.mark.parametrize("bad", [10, -1, 2.5, None, "3", [1, 2], float("nan")])
def test_label_rejects(bad):
    with pytest.raises(RecordError):
        Label(num_classes=10).encode(bad, "label")


def test_bad_options():
    with pytest.raises(MMToolError):
        Discrete(num_classes=-1)


def test_every_default_tokenizer_is_registered():
    from mmtool.data.tokenizers import DEFAULT_TOKENIZERS, TOKENIZERS

    for modality, name in DEFAULT_TOKENIZERS.items():
        assert name in TOKENIZERS, modality
        assert TOKENIZERS.describe(name)  # `mmtool ls` shows a one-line description
