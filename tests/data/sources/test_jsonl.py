"""`jsonl`: the mixed-modality manifest, and one RecordError per kind of bad line."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest

from mmtool.data.schema import Audio
from mmtool.data.sources import build_source
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.errors import MMToolError, RecordError

GOOD = SAMPLE_DATA / "jsonl" / "records.jsonl"
BAD = SAMPLE_DATA / "jsonl" / "bad_records.jsonl"

# id -> (task, [(modality, role), ...], label)
EXPECTED = {
    "doc-hello": ("text", [("text", "document")], None),
    "2": ("text", [("text", "document")], None),
    "cap-3": ("image+text", [("image", "image"), ("text", "caption")], 3),
    "cap-5": ("image+text", [("image", "image"), ("text", "caption")], 5),
    "img-8": ("image", [("image", "image")], 8),
    "asr-seven": ("audio+text", [("audio", "speech"), ("text", "transcript")], 7),
    "asr-two": ("speech", [("audio", "speech"), ("text", "transcript")], 2),
    "cartpole-inline": ("control/cartpole", [("observation", "observation"), ("action", "action"),
                                             ("reward", "reward")], None),
    "pendulum-inline": ("control/pendulum", [("observation", "observation"), ("action", "action"),
                                             ("reward", "reward")], None),
    "cartpole-npz": ("control/cartpole", [("observation", "observation"), ("action", "action"),
                                          ("reward", "reward")], None),
    "qa-1": ("qa", [("text", "document")], None),
    "vqa-3": ("vqa", [("image", "image"), ("text", "caption")], 3),
}

# line -> a regex the reason must match; one entry per line of bad_records.jsonl
BAD_REASONS = {
    1: r"invalid JSON: Unterminated string starting at column 28",
    2: r"image file not found: .*does_not_exist\.png",
    3: r"cannot decode image \(truncated",
    4: r"cannot decode audio as PCM WAV",
    5: r"empty text",
    6: r"observations contain NaN \(first at step 0, value 1\)",
    7: r"ragged observations: step 0 has 2 values but step 1 has 1",
    8: r"line is not valid UTF-8",
    9: r"5000x5000 = 25000000 pixels, above max_pixels",
    10: r"no known modality in record \(keys: bar, foo, id\)",
    11: r"trajectory lengths differ: observations has 3 timesteps, actions has 2",
}


@pytest.fixture(scope="module")
def good():
    return build_source("jsonl", [f"path={GOOD}"])


def test_good_manifest_modalities_per_record(good):
    assert len(good) == len(EXPECTED)
    got = {}
    for i in range(len(good)):
        rec = good.read(i)
        assert rec.id == good.record_id(i)
        got[rec.id] = (rec.task, [(f.modality, f.role) for f in rec.fields], rec.label)
    assert got == EXPECTED


def test_good_manifest_values(good):
    recs = {good.record_id(i): good.read(i) for i in range(len(good))}
    img = recs["cap-3"].fields[0].data
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert img[..., 0].max() > 150 and img[..., 0].max() > img[..., 2].max()  # a red digit
    assert recs["cap-3"].fields[1].data == "a red handwritten digit three"

    audio = recs["asr-seven"].fields[0].data
    assert isinstance(audio, Audio) and audio.sample_rate == 16000 and audio.samples.ndim == 1
    assert 0.2 < len(audio.samples) / 16000 < 1.0

    obs, act, rew = (f for f in recs["cartpole-inline"].fields)
    assert obs.data.dtype == np.float32 and obs.data.shape == (6, 4)
    assert act.data.dtype == np.int64 and act.data.shape == (6, 1)
    assert act.tokenizer == "discrete" and act.options == {"num_classes": 2}
    assert set(np.unique(act.data)) <= {0, 1}
    np.testing.assert_array_equal(rew.data, np.ones(6, np.float32))
    raw = json.loads(GOOD.read_text().splitlines()[7])
    np.testing.assert_allclose(obs.data, raw["observations"], rtol=1e-6)

    p_obs, p_act, p_rew = recs["pendulum-inline"].fields
    assert p_act.tokenizer == "mulaw" and p_act.data.dtype == np.float32 and p_act.data.shape == (5, 1)
    assert np.all(np.abs(p_act.data) <= 2.0) and p_rew.data.shape == (5,)

    n_obs, n_act, n_rew = recs["cartpole-npz"].fields
    with np.load(SAMPLE_DATA / "jsonl" / "episodes" / "ep0.npz") as npz:
        np.testing.assert_array_equal(n_obs.data, npz["observations"])
        np.testing.assert_array_equal(n_act.data[:, 0], npz["actions"])
        assert n_obs.data.shape == (len(npz["actions"]), 4) and n_rew.data.shape == (len(npz["actions"]),)


def test_random_access_equals_sequential(good):
    order = [9, 0, 5, 11, 2]
    shuffled = {i: good.read(i) for i in order}
    for i in order:
        assert repr(shuffled[i]) == repr(build_source("jsonl", {"path": GOOD}).read(i))


@pytest.mark.parametrize("line", sorted(BAD_REASONS))
def test_every_bad_record_is_rejected_with_its_line(line):
    bad = build_source("jsonl", [f"path={BAD}"])
    assert len(bad) == len(BAD_REASONS)  # every line of the file is covered by BAD_REASONS
    with pytest.raises(RecordError) as exc:
        bad.read(line - 1)
    assert exc.value.location == f"{BAD}:{line}"
    assert exc.value.reason and re.search(BAD_REASONS[line], exc.value.reason), \
        exc.value.reason
    assert str(exc.value).startswith(f"{BAD}:{line}: ")


def test_bad_lines_still_have_ids_and_splits():
    bad = build_source("jsonl", [f"path={BAD}"])
    assert bad.record_id(0) == "1"  # invalid JSON: falls back to the line number
    assert bad.record_id(1) == "bad-missing-image"
    parts = [build_source("jsonl", [f"path={BAD}"], split=s).indices()
             for s in ("train", "validation", "test")]
    assert sorted(sum(parts, [])) == list(range(len(BAD_REASONS)))


def test_blank_lines_num_actions_and_more_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [
        {"actions": [0, 2, 1], "observations": [[0.0], [1.0], [2.0]]},
        {"actions": [[0, 1], [1, 1]], "num_actions": 2},
        {"actions": [0, 1], "rewards": [1.0, 2.0, 3.0]},
        {"text": "hi", "observations": [[1.0]], "trajectory": "x.npz"},
        {"text": 5},
        {"image": "missing.png", "label": "cat"},
        {"text": "ok", "label": -1},
        [1, 2],
        {"text": "ok", "observations": [0.5, 0.25]},
        {"text": "extra keys go to meta", "source_url": "http://x", "meta": {"k": 1}},
    ]
    path.write_text("\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n\n")
    s = build_source("jsonl", [f"path={path}"])
    assert len(s) == len(rows) and s.location(0) == f"{path}:3"
    first = s.read(0)
    assert first.fields[1].options == {} and first.fields[1].data.tolist() == [[0], [2], [1]]
    assert s.read(1).fields[0].data.shape == (2, 2)
    assert s.read(9).meta == {"k": 1, "source_url": "http://x"}
    with pytest.raises(RecordError, match=r"action 2 is out of range 0..1 \(num_actions=2\)"):
        build_source("jsonl", [f"path={path}", "num_actions=2"]).read(0)
    assert build_source("jsonl", [f"path={path}", "num_actions=3"]).read(0).fields[1].options == \
        {"num_classes": 3}
    expected = {2: "actions has 2 timesteps, rewards has 3", 3: "either a trajectory file or inline",
                4: "text must be a string", 5: "image file not found", 6: "label must be a non-negative",
                7: "expected a JSON object, got list", 8: r"observations must be T rows of k numbers"}
    for i, reason in expected.items():
        with pytest.raises(RecordError, match=reason) as exc:
            s.read(i)
        assert exc.value.location == f"{path}:{i + 3}"


def test_options_and_pickling(tmp_path):
    with pytest.raises(MMToolError, match="needs --opt path="):
        build_source("jsonl")
    with pytest.raises(MMToolError, match="no such file"):
        build_source("jsonl", [f"path={tmp_path / 'nope.jsonl'}"])
    s = build_source("jsonl", [f"path={GOOD}", "text_role=prompt"])
    assert s.read(2).fields[1].role == "prompt"
    clone = pickle.loads(pickle.dumps(s))
    assert repr(clone.read(5)) == repr(s.read(5))
