"""`--opt window=T`: control episodes cut into records of whole timesteps (Gato's way)."""

from __future__ import annotations

import numpy as np
import pytest

from mmtool.data.index import TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.sources import build_source
from mmtool.errors import MMToolError


@pytest.mark.parametrize("name,window", [("cartpole", 64), ("acrobot", 50), ("pendulum", 30)])
def test_an_episodes_windows_concatenate_to_the_episode(name, window):
    whole = build_source(name, ["episodes=3", "epsilon=0.3"] if name != "pendulum" else ["episodes=3"])
    cut = build_source(name, [*(f"{k}={v}" for k, v in vars(whole.options).items()), f"window={window}"])
    episodes = [whole.read(e) for e in range(3)]
    expected = sum(-(-ep.meta["length"] // window) for ep in episodes)  # ceil per episode
    assert len(cut) == expected
    records = [cut.read(i) for i in range(len(cut))]
    for e, ep in enumerate(episodes):
        mine = [r for r in records if r.meta["episode"] == ep.id]
        assert [r.id for r in mine] == [f"{ep.id}-w{k:02d}" for k in range(len(mine))]
        assert {cut.split_of(records.index(r)) for r in mine} == {whole.split_of(e)}  # one split
        lengths = [r.meta["window_steps"] for r in mine]
        assert all(n == window for n in lengths[:-1]) and 1 <= lengths[-1] <= window
        for f, field in enumerate(ep.fields):  # observation [T, k], action [T, 1], reward [T]
            parts = [r.fields[f].data for r in mine]
            assert all(len(p) == n for p, n in zip(parts, lengths))  # every field: the same steps
            np.testing.assert_array_equal(np.concatenate(parts), field.data)
            assert mine[0].fields[f].tokenizer == field.tokenizer


def test_windows_are_whole_timesteps_after_tokenizing(tmp_path):
    preprocess(PreprocessConfig(source="cartpole", out=tmp_path / "w", options=["episodes=4", "window=50"]))
    preprocess(PreprocessConfig(source="cartpole", out=tmp_path / "e", options=["episodes=4"]))
    cut, whole = TokenIndex([tmp_path / "w"]), TokenIndex([tmp_path / "e"])
    step = 4 + 1 + 1 + 1  # observation ×4 | separator | action | reward
    assert (cut.step_len == step).all() and (cut.lengths == cut.steps * step).all()
    assert cut.lengths.max() == 50 * step and cut.lengths.sum() == whole.lengths.sum()
    assert len(cut) > len(whole)


def test_bad_window_names_the_option():
    with pytest.raises(MMToolError, match="--opt window=-1"):
        build_source("cartpole", ["window=-1"])
