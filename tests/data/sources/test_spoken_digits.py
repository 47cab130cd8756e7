"""`spoken-digits`: the bundled espeak-ng clips and user folders with the same layout."""

from __future__ import annotations

import json
import pickle
import shutil
import wave
from collections import Counter

import numpy as np
import pytest

from mmtool.data.schema import Audio
from mmtool.data.sources import build_source
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.data.sources.spoken_digits import WORDS
from mmtool.errors import MMToolError, RecordError

ROOT = SAMPLE_DATA / "spoken_digits"


@pytest.fixture(scope="module")
def source():
    return build_source("spoken-digits")


def test_bundled_clips_cover_every_digit(source):
    assert len(source) == 100
    labels = Counter(source.read(i).label for i in range(len(source)))
    assert labels == {d: 10 for d in range(10)}


def test_record_fields_match_metadata_and_wav(source):
    meta = [json.loads(line) for line in (ROOT / "metadata.jsonl").read_text().splitlines()]
    for i in (0, 37, 71, 99):
        rec, m = source.read(i), meta[i]
        assert rec.id == m["file"].removesuffix(".wav")
        assert rec.task == "speech" and rec.label == m["label"] == WORDS.index(m["word"])
        assert rec.meta == {"voice": m["voice"], "speed": m["speed"], "pitch": m["pitch"],
                            "file": m["file"]}
        (audio, text) = rec.fields
        assert (audio.modality, audio.role, text.modality, text.role) == \
            ("audio", "speech", "text", "transcript")
        assert text.data == m["word"]
        assert isinstance(audio.data, Audio) and audio.data.sample_rate == 16000
        with wave.open(str(ROOT / m["file"])) as w:
            assert audio.data.samples.shape == (w.getnframes(),)
        assert audio.data.samples.dtype == np.float32
        assert 0.1 < np.abs(audio.data.samples).max() <= 1.0
        assert source.location(i) == str(ROOT / m["file"])


def test_ids_are_unique_and_stable(source):
    ids = [source.record_id(i) for i in range(len(source))]
    assert len(set(ids)) == 100
    assert ids == [build_source("spoken-digits").record_id(i) for i in range(100)]


def test_splits_partition_the_records():
    parts = [build_source("spoken-digits", split=s).indices() for s in ("train", "validation", "test")]
    assert sorted(sum(parts, [])) == list(range(100))
    assert 60 <= len(parts[0]) <= 95


def test_user_folder_without_metadata_is_scanned(tmp_path):
    for word in ("three", "nine"):
        src = sorted((ROOT / word).glob("*.wav"))[0]
        (tmp_path / word).mkdir()
        shutil.copy(src, tmp_path / word / src.name)
    shutil.copy(src, tmp_path / "nine" / "take2.wav")
    s = build_source("spoken-digits", [f"root={tmp_path}"])
    assert len(s) == 3
    assert [s.read(i).label for i in range(3)] == [3, 9, 9]
    parsed = s.read(0).meta
    assert parsed["voice"] and isinstance(parsed["speed"], int) and isinstance(parsed["pitch"], int)
    assert s.read(2).meta == {"voice": None, "speed": None, "pitch": None, "file": "nine/take2.wav"}
    assert pickle.loads(pickle.dumps(s)).read(1).fields[1].data == "nine"


def test_bad_clip_and_bad_root(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.wav").write_bytes(b"RIFF....garbage")
    s = build_source("spoken-digits", {"root": tmp_path})
    with pytest.raises(RecordError, match="cannot decode audio") as exc:
        s.read(0)
    assert exc.value.location == str(tmp_path / "one" / "x.wav")
    with pytest.raises(MMToolError, match="no such folder"):
        build_source("spoken-digits", [f"root={tmp_path / 'nope'}"])
    with pytest.raises(MMToolError, match="no <word>/\\*.wav clips"):
        build_source("spoken-digits", [f"root={tmp_path / 'one'}"])
