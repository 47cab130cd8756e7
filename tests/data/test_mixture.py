"""The mixture: deterministic weighted epochs, exact per-folder counts, and `--data` parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmtool.data.mixture import DataSpec, Mixture, parse_data_specs
from mmtool.errors import MMToolError

SIZES = [300, 100, 30, 10, 300]


def folder_of(m: Mixture, order: np.ndarray) -> np.ndarray:
    return np.searchsorted(m.offsets, order, side="right") - 1


def test_same_seed_same_epochs_other_seed_or_epoch_differs():
    a, b = Mixture(SIZES, [1, 2, 3, 4, 5], seed=7), Mixture(SIZES, [1, 2, 3, 4, 5], seed=7)
    for e in range(3):
        np.testing.assert_array_equal(a.epoch(e), b.epoch(e))
    assert not np.array_equal(a.epoch(0), Mixture(SIZES, [1, 2, 3, 4, 5], seed=8).epoch(0))
    assert not np.array_equal(a.epoch(0), a.epoch(1))
    u = Mixture(SIZES, seed=7)
    np.testing.assert_array_equal(u.epoch(2), Mixture(SIZES, seed=7).epoch(2))
    assert not np.array_equal(u.epoch(0), Mixture(SIZES, seed=8).epoch(0))


def test_no_weights_visits_each_sample_exactly_once_per_epoch():
    m = Mixture(SIZES, seed=0)
    for e in range(3):
        order = m.epoch(e)
        assert order.dtype == np.int64
        np.testing.assert_array_equal(np.sort(order), np.arange(sum(SIZES)))
    np.testing.assert_allclose(m.probabilities, np.array(SIZES) / sum(SIZES))


@pytest.mark.parametrize("weights,length", [([1, 1, 1, 1, 1], 740), ([5, 1, 2, 8, 0.5], 1000),
                                            ([1, 3, 1, 3, 1], 333)])
def test_weighted_counts_are_round_p_times_length(weights, length):
    m = Mixture(SIZES, weights, seed=2, samples_per_epoch=length)
    p = np.asarray(weights, float) / sum(weights)
    np.testing.assert_allclose(m.probabilities, p)
    counts = m.counts()
    assert counts.sum() == length
    assert (np.abs(counts - p * length) < 1).all()  # largest remainder: within one of exact
    if np.round(p * length).sum() == length:
        np.testing.assert_array_equal(counts, np.round(p * length))
    for e in range(3):
        order = m.epoch(e)
        assert len(order) == length
        np.testing.assert_array_equal(np.bincount(folder_of(m, order), minlength=len(SIZES)),
                                      counts)


def test_exact_counts_case():
    # p = [0.5, 0.25, 0.25] of 100 draws: exactly 50, 25, 25
    m = Mixture([40, 200, 5], [2, 1, 1], seed=0, samples_per_epoch=100)
    np.testing.assert_array_equal(m.counts(), [50, 25, 25])


def test_within_a_folder_no_repeats_before_it_is_exhausted():
    """A tiny, heavily weighted folder is drawn many times per epoch: in visiting order, across
    epochs, every run of n consecutive draws of that folder is a permutation of it."""
    m = Mixture([7, 500, 60], [20, 1, 3], seed=4, samples_per_epoch=400)
    visits = np.concatenate([m.epoch(e) for e in range(4)])
    folders = folder_of(m, visits)
    for f, n in enumerate(m.sizes.tolist()):
        local = visits[folders == f] - m.offsets[f]
        if f == 0:
            assert len(local) >= 20 * n, "folder 0 should be lapped many times"
        for start in range(0, len(local) - n + 1, n):
            np.testing.assert_array_equal(np.sort(local[start:start + n]), np.arange(n))
        if len(local) % n:  # the unfinished lap has no repeats either
            tail = local[len(local) // n * n:]
            assert len(np.unique(tail)) == len(tail)


def test_weighted_epochs_interleave_folders():
    m = Mixture([100, 100], [1, 1], seed=0)
    folders = folder_of(m, m.epoch(0))
    assert 0 < folders[:20].sum() < 20  # not one folder after the other


def test_temperature_formula():
    sizes = np.array([1000, 100, 10])
    w = np.array([1.0, 2.0, 4.0])
    for t in (0.5, 1.0, 2.0, 5.0):
        m = Mixture(sizes.tolist(), w.tolist(), temperature=t)
        want = w * sizes ** (1 / t)
        np.testing.assert_allclose(m.probabilities, want / want.sum())
    np.testing.assert_allclose(Mixture(sizes.tolist(), temperature=1.0).probabilities,
                               sizes / sizes.sum())  # T=1, no weights: proportional to size
    np.testing.assert_allclose(Mixture(sizes.tolist(), temperature=1e6).probabilities,
                               np.full(3, 1 / 3), atol=1e-4)  # large T: uniform
    np.testing.assert_allclose(Mixture(sizes.tolist(), w.tolist(), temperature=1e6).probabilities,
                               w / w.sum(), atol=1e-4)  # large T: the weights alone
    with pytest.raises(MMToolError, match="--temperature"):
        Mixture(sizes.tolist(), temperature=0)


def test_bad_mixture_arguments():
    with pytest.raises(MMToolError, match="weights must be > 0"):
        Mixture([10, 10], [1, 0])
    with pytest.raises(MMToolError, match="needs samples"):
        Mixture([10, 0])


# -- --data parsing ---------------------------------------------------------------------------
def test_parse_dir_and_weight(tmp_path):
    specs = parse_data_specs([f"{tmp_path}/a=2", f"{tmp_path}/b"])
    assert specs == [DataSpec(tmp_path / "a", 2.0), DataSpec(tmp_path / "b", 1.0)]
    assert parse_data_specs([f"{tmp_path}/a", "b"]) == [DataSpec(tmp_path / "a"), DataSpec(Path("b"))]
    assert parse_data_specs(["x=0.25"])[0].weight == 0.25


def test_parse_mixture_yaml(tmp_path):
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - path: data/digits\n    weight: 2\n  - path: /abs/pydocs\n")
    specs = parse_data_specs([str(mix), f"{tmp_path}/c=3"])
    assert specs == [DataSpec(tmp_path / "data/digits", 2.0), DataSpec(Path("/abs/pydocs"), 1.0),
                     DataSpec(tmp_path / "c", 3.0)]
    (tmp_path / "bad.yaml").write_text("datasets: [{weight: 2}]\n")
    with pytest.raises(MMToolError, match=r"datasets\[0\] needs a 'path'"):
        parse_data_specs([str(tmp_path / "bad.yaml")])
    (tmp_path / "empty.yaml").write_text("other: 1\n")
    with pytest.raises(MMToolError, match="expected a 'datasets:' list"):
        parse_data_specs([str(tmp_path / "empty.yaml")])
    (tmp_path / "zero.yaml").write_text("datasets:\n  - path: a\n    weight: 0\n")
    with pytest.raises(MMToolError, match=r"--data .*zero.yaml datasets\[0\]: weight must be > 0"):
        parse_data_specs([str(tmp_path / "zero.yaml")])


@pytest.mark.parametrize("weight,reason", [("0", "must be > 0"), ("-1", "must be > 0"),
                                           ("abc", "is not a number"), ("nan", "must be > 0"),
                                           ("inf", "must be > 0")])
def test_bad_weights_name_the_flag(weight, reason):
    with pytest.raises(MMToolError, match=rf"^--data data/digits={weight}: .*{reason}"):
        parse_data_specs([f"data/digits={weight}"])


# -- --mix-by: what a weight is a share of -------------------------------------------------------
def test_mix_by_tokens_draws_in_proportion_to_weight_over_mean_length():
    sizes, tokens = [100, 50, 200], [2_000, 70_000, 10_000]  # mean lengths 20, 1400, 50
    m = Mixture(sizes, [1, 1, 2], seed=0, mix_by="tokens", tokens=tokens)
    np.testing.assert_allclose(m.probabilities, [0.25, 0.25, 0.5])
    q = np.array([0.25 / 20, 0.25 / 1400, 0.5 / 50])
    np.testing.assert_allclose(m.draw_probabilities, q / q.sum())
    counts = m.counts()
    drawn_tokens = counts * np.array(tokens) / np.array(sizes)  # [F] expected tokens per folder
    np.testing.assert_allclose(drawn_tokens / drawn_tokens.sum(), [0.25, 0.25, 0.5], atol=0.01)
    assert abs(drawn_tokens.sum() - sum(tokens)) < 0.02 * sum(tokens)  # an epoch ≈ the data's tokens
    s = Mixture(sizes, [1, 1, 2], seed=0, mix_by="samples", tokens=tokens)
    np.testing.assert_array_equal(s.counts(), [88, 87, 175])  # shares of draws: 350 · (¼, ¼, ½)
    unweighted = Mixture(sizes, seed=0, mix_by="tokens", tokens=tokens)  # natural: each sample once
    np.testing.assert_array_equal(np.sort(unweighted.epoch(0)), np.arange(350))


def test_mix_by_is_checked_and_read_from_the_mixture_file(tmp_path):
    from mmtool.data.mixture import resolve_mix_by

    with pytest.raises(MMToolError, match="--mix-by 'words': expected tokens or samples"):
        Mixture([3], mix_by="words")
    mix = tmp_path / "mix.yaml"
    mix.write_text("mix_by: samples\ndatasets:\n  - path: a\n")
    assert resolve_mix_by(None, [str(mix)]) == "samples"
    assert resolve_mix_by("tokens", [str(mix)]) == "tokens"  # the flag wins
    assert resolve_mix_by(None, ["a=1"]) == "tokens"  # the default
    mix.write_text("mix_by: bytes\ndatasets:\n  - path: a\n")
    with pytest.raises(MMToolError, match="mix.yaml: mix_by 'bytes'"):
        resolve_mix_by(None, [str(mix)])


def test_parse_per_folder_objectives_and_fraction(tmp_path):
    specs = parse_data_specs(["d/digits=2:objectives=caption,contrastive=0.5:fraction=0.25",
                              "d/pydocs:objectives=next-token:modalities=text=2", "d/cartpole"])
    assert [(str(s.path), s.weight, s.objectives, s.fraction) for s in specs] == [
        ("d/digits", 2.0, {"caption": 1.0, "contrastive": 0.5}, 0.25),
        ("d/pydocs", 1.0, {"next-token:modalities=text": 2.0}, 1.0),
        ("d/cartpole", 1.0, None, 1.0)]
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - path: digits\n    objectives: {caption: 1, mae: 0.5}\n"
                   "    fraction: 0.5\n  - path: cartpole\n    objectives: behaviour-cloning\n")
    a, b = parse_data_specs([str(mix)])
    assert a.objectives == {"caption": 1.0, "mae": 0.5} and a.fraction == 0.5
    assert b.objectives == {"behaviour-cloning": 1.0} and b.path == tmp_path / "cartpole"


@pytest.mark.parametrize("spec, reason", [("d=1:fraction=0", "fraction must be in"),
                                          ("d=1:fraction=abc", "not a number"),
                                          ("d:objectives=caption=-1", "must be ≥ 0"),
                                          ("d:objectives=", "names no objective")])
def test_bad_folder_options_name_the_entry(spec, reason):
    with pytest.raises(MMToolError, match=reason):
        parse_data_specs([spec])


def test_unknown_mixture_key_is_named(tmp_path):
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - path: digits\n    weigth: 2\n")
    with pytest.raises(MMToolError, match="unknown key weigth"):
        parse_data_specs([str(mix)])
