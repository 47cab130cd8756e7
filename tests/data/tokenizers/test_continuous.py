"""Mu-law bins (Gato) and raw floats: the formula, clip edges, round-trip bounds, errors."""

import math
import pickle

import numpy as np
import pytest

from mmtool.data.tokenizers.continuous import MuLaw, RawFloat, mu_law
from mmtool.errors import MMToolError, RecordError


def F(x, mu=100.0, M=256.0):
    return math.copysign(math.log(abs(x) * mu + 1) / math.log(M * mu + 1), x)


def test_mu_law_formula_at_hand_points():
    # F(1) = log(101) / log(25601) = 4.61512 / 10.15040
    assert mu_law(np.array([1.0]))[0] == pytest.approx(0.4546737, abs=1e-6)
    assert mu_law(np.array([256.0]))[0] == pytest.approx(1.0)
    assert mu_law(np.array([-256.0]))[0] == pytest.approx(-1.0)
    assert mu_law(np.array([0.0]))[0] == 0.0
    assert mu_law(np.array([1e6]))[0] == 1.0  # clipped


def test_mulaw_ids_at_hand_points():
    tok = MuLaw()
    seg = tok.encode([[0.0, 1.0, -1.0, 0.01]], "observation")
    # floor((F + 1) / 2 * 1024): F(0)=0 → 512; F(1)=0.45467 → 744; F(-1) → 279; F(0.01)=0.06829 → 546
    assert seg.ids.tolist() == [512, 744, 279, 546]
    for x, i in zip([0.0, 1.0, -1.0, 0.01], seg.ids):
        assert i == math.floor((F(x) + 1) / 2 * 1024)
    assert seg.shape == (1, 4) and seg.modality == "observation"


def test_mulaw_clip_edges():
    tok = MuLaw(bins=1024)
    assert tok.encode([1e9, -1e9, 256.0, -256.0], "observation").ids.tolist() == [1023, 0, 1023, 0]
    assert MuLaw(bins=7).encode([1e9], "observation").ids.tolist() == [6]


@pytest.mark.parametrize("bins", [2, 1024, 37])
def test_mulaw_round_trip_error_bound(bins):
    tok = MuLaw(bins=bins)
    x = np.linspace(-1.0, 1.0, 2001)
    back = tok.decode(tok.encode(x, "observation")).reshape(-1)
    err = np.abs(mu_law(back) - mu_law(x))
    assert err.max() <= 1.0 / bins + 1e-12
    # Bin centres are fixed points.
    again = tok.decode(tok.encode(back, "observation")).reshape(-1)
    assert np.allclose(again, back)


def test_mulaw_shapes_and_config():
    tok = MuLaw(mu=50, M=10, bins=256)
    assert tok.encode([1.0, 2.0, 3.0], "reward").shape == (3, 1)
    assert tok.encode(np.zeros((5, 3), np.float32), "observation").shape == (5, 3)
    assert tok.encode(2.0, "reward").shape == (1, 1)
    assert tok.config() == {"name": "mulaw", "mu": 50.0, "M": 10.0, "bins": 256, "vocab_size": 256}
    assert pickle.loads(pickle.dumps(tok)).config() == tok.config()


@pytest.mark.parametrize("cls", [MuLaw, RawFloat])
@pytest.mark.parametrize("bad, match", [
    ([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1]],
     "ragged observation rows: row 3 has 2 values, row 0 has 4"),
    ([[0.0, 1.0], [2.0, np.nan]], "at row 1, column 1 is not finite"),
    ([[0.0, np.inf]], "inf at row 0, column 1"),
    (np.zeros((0, 3)), "empty"),
    ([], "empty"),
    (np.zeros((2, 2, 2)), "shape"),
    ("abc", "numbers"),
    ([[1, [2]], [3, 4]], "ragged"),
])
def test_continuous_rejects(cls, bad, match):
    with pytest.raises(RecordError, match=match):
        cls().encode(bad, "observation")


def test_raw_float():
    x = np.array([[1.5, -2.0], [1e3, 0.25]])
    seg = RawFloat().encode(x, "observation")
    assert seg.shape == (2, 2) and seg.values is not None and seg.n_tokens == 2
    assert np.array_equal(RawFloat().decode(seg), x.astype(np.float32))
    clipped = RawFloat(clip=10).decode(RawFloat(clip=10).encode(x, "observation"))
    assert clipped.tolist() == [[1.5, -2.0], [10.0, 0.25]]
    assert RawFloat().encode([1.0, 2.0, 3.0], "reward").shape == (3, 1)
    assert RawFloat(dim=2).config() == {"name": "raw-float", "clip": None, "dim": 2}
    with pytest.raises(RecordError, match="expected dim=3"):
        RawFloat(dim=3).encode(x, "observation")
    with pytest.raises(RecordError, match="overflow"):
        RawFloat().encode([1e300], "reward")


def test_bad_options():
    with pytest.raises(MMToolError):
        MuLaw(bins=1)
    with pytest.raises(MMToolError):
        RawFloat(clip=0)
