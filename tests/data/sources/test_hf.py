"""`hf`: datasets' local builders offline, with media decoded by mmtool (no torchcodec/ffmpeg)."""

from __future__ import annotations

import json
import pickle
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmtool.data.schema import Audio
from mmtool.data.sources import build_source
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.errors import MMToolError, RecordError

IMAGES = SAMPLE_DATA / "images"
AUDIO = SAMPLE_DATA / "audio"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return f"cache_dir={tmp_path_factory.mktemp('hf_cache')}"


@pytest.fixture(scope="module")
def images(cache):
    return build_source("hf", ["path=imagefolder", f"data_dir={IMAGES}", cache])


def test_imagefolder_images_and_labels_match_folders(images):
    assert len(images) == 8 and images.label_names == ["0", "1"]
    assert images.indices() == list(range(8))
    seen = set()
    for i in range(len(images)):
        rec = images.read(i)
        file = Path(rec.meta["file"])
        assert rec.meta["label_name"] == file.parent.name
        assert rec.label == images.label_names.index(file.parent.name)
        assert rec.task == "image" and [(f.modality, f.role) for f in rec.fields] == [("image", "image")]
        img = rec.fields[0].data
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3)  # gray PNGs decode to RGB
        np.testing.assert_array_equal(img, np.asarray(Image.open(file).convert("RGB")))
        seen.add(rec.id)
    assert seen == {f"train-{i}" for i in range(8)}


def test_source_pickles_for_workers(images):
    clone = pickle.loads(pickle.dumps(images))
    np.testing.assert_array_equal(clone.read(3).fields[0].data, images.read(3).fields[0].data)


def test_audiofolder_decodes_wavs_without_torchcodec(cache):
    s = build_source("hf", ["path=audiofolder", f"data_dir={AUDIO}", cache], split="train")
    assert len(s) == 6 and s.label_names == ["one", "zero"]
    for i in range(len(s)):
        rec = s.read(i)
        file = Path(rec.meta["file"])
        assert rec.meta["label_name"] == file.parent.name
        (field,) = rec.fields
        assert field.modality == "audio" and isinstance(field.data, Audio)
        assert field.data.sample_rate == 16000
        with wave.open(str(file)) as w:
            assert field.data.samples.shape == (w.getnframes(),)
        assert s.split_of(i) == "train"


def test_map_override_with_json_paths(tmp_path, cache):
    img = sorted((IMAGES / "1").glob("*.png"))[0]
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(img.read_bytes())
    rows = [{"uid": "r0", "picture": "pics/a.png", "caption": "a one", "cls": 1, "note": "ignored"},
            {"uid": "r1", "picture": "pics/missing.png", "caption": "gone", "cls": 0, "note": "x"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = build_source("hf", ["path=json", f"data_files={tmp_path / 'd.jsonl'}", cache,
                            "map=picture:image,caption:text:question,cls:label,uid:id"])
    rec = s.read(0)
    assert rec.id == "r0" and rec.label == 1 and rec.task == "image+text"
    assert [(f.modality, f.role) for f in rec.fields] == [("image", "image"), ("text", "question")]
    np.testing.assert_array_equal(rec.fields[0].data, np.asarray(Image.open(img).convert("RGB")))
    with pytest.raises(RecordError, match=r"column 'picture': image file not found") as exc:
        s.read(1)
    assert exc.value.location == "json[train] row 1"

    # Without map=: the id column gives ids, the image path goes to meta, never to text.
    auto = build_source("hf", ["path=json", f"data_files={tmp_path / 'd.jsonl'}", cache])
    assert [(c, t) for c, t, _ in auto.columns] == \
        [("caption", "text"), ("note", "text"), ("uid", "id"), ("picture", "meta")]
    rec = auto.read(0)
    assert rec.id == "r0" and [f.data for f in rec.fields] == ["a one", "ignored"]
    assert rec.meta == {"picture": "pics/a.png"}
    assert rec.fields[0].role == "caption"  # several text columns: role = column name


def test_map_errors_and_label_dropping(images, cache):
    listed = r"no column 'img'; the dataset has image \(Image\), label \(ClassLabel\)"
    with pytest.raises(MMToolError, match=listed):
        build_source("hf", ["path=imagefolder", f"data_dir={IMAGES}", cache, "map=img:image"])
    with pytest.raises(MMToolError, match="modality 'pixels' is not one of"):
        build_source("hf", ["path=imagefolder", f"data_dir={IMAGES}", cache, "map=image:pixels"])
    only = build_source("hf", ["path=imagefolder", f"data_dir={IMAGES}", cache, "map=image:image"])
    assert only.read(0).label is None and only.read(0).fields[0].data.shape == (32, 32, 3)


def test_splits_and_required_path(cache):
    with pytest.raises(MMToolError, match="no split 'validation'"):
        build_source("hf", ["path=imagefolder", f"data_dir={IMAGES}", cache], split="validation")
    s = build_source("hf", ["path=imagefolder", f"data_dir={IMAGES}", cache, "split=train[:3]"],
                     split="test")
    assert len(s) == 3 and s.split_of(0) == "test" and s.indices() == [0, 1, 2]
    with pytest.raises(MMToolError, match="needs --opt path="):
        build_source("hf")


# -- issue 15: every split, local paths stay local, map= errors name the columns -------------------

def test_split_all_reads_every_split_each_row_keeping_its_own(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["tr a", "tr b", "tr c"]}),
        "test": datasets.Dataset.from_dict({"text": ["te a", "te b"]}),
        "validation": datasets.Dataset.from_dict({"text": ["va a"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    s = build_source("hf", [f"path={tmp_path / 'dd'}"])
    assert len(s) == 6
    got = [(s.record_id(i), s.split_of(i), s.read(i).fields[0].data) for i in s.indices()]
    assert got == [("train-0", "train", "tr a"), ("train-1", "train", "tr b"), ("train-2", "train", "tr c"),
                   ("test-0", "test", "te a"), ("test-1", "test", "te b"),
                   ("validation-0", "validation", "va a")]
    assert s.location(4) == f"{tmp_path / 'dd'}[test] row 1"
    one = build_source("hf", [f"path={tmp_path / 'dd'}"], split="test")
    assert [one.read(i).fields[0].data for i in one.indices()] == ["te a", "te b"]


def test_a_local_file_is_never_sent_to_the_hub(tmp_path, cache, monkeypatch):
    import datasets

    (tmp_path / "t.csv").write_text("caption,n\nhello there,1\nsecond row,2\n")
    seen = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: seen.append(path) or real(path, **kw))
    s = build_source("hf", [f"path={tmp_path / 't.csv'}", cache])
    assert seen == ["csv"] and [s.read(i).fields[0].data for i in range(2)] == ["hello there", "second row"]
    with pytest.raises(MMToolError, match=r"no such file or folder \(a local path is never looked up"):
        build_source("hf", [f"path={tmp_path / 'missing.parquet'}", cache])
    assert seen == ["csv"]  # the missing file never reached load_dataset


def test_map_errors_name_the_columns(tmp_path, cache):
    (tmp_path / "t.csv").write_text("caption,n\nhello,1\n")
    for bad in ("map=caption", "map=title:text"):
        with pytest.raises(MMToolError, match=r"the dataset has caption \(Value\(\w+\)\), n \(Value\(int64\)\)"):
            build_source("hf", [f"path={tmp_path / 't.csv'}", cache, bad])
