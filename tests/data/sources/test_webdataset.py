"""`webdataset`: format-faithful tar shards (.jpg + .png + .txt + .json + .cls), read by key."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmtool.data import media
from mmtool.data import shards as store
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.tokenizing import TokenizerSet
from mmtool.data.schema import Field, rows_to_samples
from mmtool.data.sources import build_source
from mmtool.data.tokenizers.base import build_tokenizer
from mmtool.errors import MMToolError, RecordError

CAPTIONS = ["a red square on black", "two green bars", "a blue dot", "noise in grey",
            "stripes of yellow", "a white cross"]


def _image(i: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # [H, W, 3]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder, n_shards: int = 2, per_shard: int = 3):
    """WebDataset shards as `tar --sort=name` writes them: key.jpg/.png, key.txt, key.json, key.cls.

    Even samples are JPEG, odd ones PNG (16x12 pixels); the .txt and the json caption differ.
    Returns {key: (image_bytes, ext, txt, json_obj, cls)}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    samples = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            _add(tar, "README", b"not a sample")  # no key.extension: ignored and reported
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"part{s}/sample{i:04d}"
                ext, fmt = ("jpg", "JPEG") if i % 2 == 0 else ("png", "PNG")
                img = _encode(_image(i, 12, 16), fmt)
                obj = {"caption": f"json caption {i}", "meta": {"label": i % 3}, "uid": f"u{i}"}
                _add(tar, f"{key}.{ext}", img)
                _add(tar, f"{key}.txt", CAPTIONS[i].encode())
                _add(tar, f"{key}.json", json.dumps(obj).encode())
                _add(tar, f"{key}.cls", f"{i % 4}\n".encode())
                samples[key] = (img, ext, CAPTIONS[i], obj, i % 4)
    return samples


@pytest.fixture
def wds(tmp_path):
    return tmp_path / "wds", make_shards(tmp_path / "wds")


def test_keys_extensions_and_default_mapping(wds):
    folder, samples = wds
    src = build_source("webdataset", [f"urls={folder}/shard-{{000..001}}.tar"])
    assert [src.record_id(i) for i in range(len(src))] == list(samples)
    rows = {r.input: r.target for r in src.mapping()}
    assert rows == {"__key__": "id", "__url__": "meta", ".jpg (3 samples)": "image",
                    ".png (3 samples)": "image", ".txt (6 samples)": "text", ".cls (6 samples)": "label",
                    ".json (6 samples)": "meta", "member without key.extension (2)": "ignored"}
    assert src.skipped() == {"member without key.extension": 2}
    assert ".json (6 samples) → meta: fields not mapped (map=TARGET:json.FIELD)" in src.describe_mapping()
    for i, (key, (img, _, txt, obj, cls)) in enumerate(samples.items()):
        rec = src.read(i)
        assert [(f.modality, f.role) for f in rec.fields] == [("image", "image"), ("text", "caption")]
        assert np.array_equal(rec.fields[0].data, media.load_image(img))
        assert rec.fields[1].data == txt and rec.label == cls and rec.id == key
        assert rec.meta["__url__"].endswith(f"shard-{i // 3:03d}.tar") and rec.meta["uid"] == obj["uid"]
        assert all(key not in f.data for f in rec.fields if f.modality == "text")


def test_json_fields_mapped_and_glob(wds):
    folder, samples = wds
    src = build_source("webdataset", [f"urls={folder}/*.tar",
                                      "map=text:json.caption,label:json.meta.label,id:json.uid"])
    assert len(src) == 6
    for i, (key, (_, _, _, obj, _)) in enumerate(samples.items()):
        rec = src.read(i)
        assert rec.fields[1].data == obj["caption"] and rec.label == obj["meta"]["label"]
        assert rec.id == obj["uid"] and rec.meta["__key__"] == key and "caption" not in rec.meta
    assert ("json.caption", "text") in {(r.input, r.target) for r in src.mapping()}
    assert {(r.input, r.target) for r in src.mapping()} >= {("__key__", "meta"), ("json.uid", "id")}


def test_bad_inputs_name_what_exists(wds, tmp_path):
    folder, _ = wds
    with pytest.raises(MMToolError, match=r"no such file: .*shard-002\.tar$"):
        build_source("webdataset", [f"urls={folder}/shard-{{001..002}}.tar"])
    with pytest.raises(MMToolError, match="unknown target 'caption'"):
        build_source("webdataset", [f"urls={folder}", "map=caption:json.caption"])
    src = build_source("webdataset", [f"urls={folder}", "map=text:json.title"])
    with pytest.raises(RecordError, match=r"shard-000\.tar:part0/sample0000: json\.title: json has "
                                          r"no field 'title' \(fields: caption, meta, uid\)"):
        src.read(0)
    gz = tmp_path / "x.tar"
    gz.write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(MMToolError, match="cannot read .*x.tar as an uncompressed tar"):
        build_source("webdataset", [f"urls={gz}"])


def test_preprocess_content(wds, tmp_path):
    folder, samples = wds
    out = tmp_path / "out"
    preprocess(PreprocessConfig(source="webdataset", out=out,
                                options=[f"urls={folder}/shard-{{000..001}}.tar"]))
    rows = {s.id: s for s in rows_to_samples(store.read_folder(out))}
    assert set(rows) == set(samples)
    tok = TokenizerSet({})
    image_tok, text_tok = build_tokenizer("patches"), build_tokenizer("wordpiece")
    for key, (img, ext, txt, _, cls) in samples.items():
        sample = rows[key]
        image, text = sample.segments
        assert (image.modality, text.modality, text.role) == ("image", "text", "caption")
        expected = tok.encode(Field("image", "image", media.load_image(img)))  # default tokenizer
        assert image.shape == expected.shape and np.allclose(image.values, expected.values)
        assert text_tok.decode(text) == txt and sample.label == cls
        assert sample.meta["__url__"].endswith(".tar")
        if ext == "png" and image_tok.config().get("size") is None:  # lossless, native size
            decoded = image_tok.decode(image)  # uint8 [H, W, C]
            assert decoded.shape[:2] == (12, 16)
            assert np.abs(decoded.astype(int) - media.load_image(img).astype(int)).max() <= 1


def test_content_key_follows_the_tar(wds):
    folder, _ = wds
    src = build_source("webdataset", [f"urls={folder}"])
    assert src.record_files(0) == [folder / "shard-000.tar"] and src.input_files() == \
        [folder / "shard-000.tar", folder / "shard-001.tar"]
    assert src.record_key(0) != src.record_key(1)


def test_cli_preprocess(wds, tmp_path, cli):
    folder, samples = wds
    out = tmp_path / "cli"
    proc = cli("preprocess", "webdataset", "--opt", f"urls={folder}/shard-{{000..001}}.tar",
               "--out", out, "--num-proc", "2")
    manifest = store.load_manifest(out)
    ids = sorted(s.id for s in rows_to_samples(store.read_folder(out)))
    assert ids == sorted(samples) and manifest["sources"]["webdataset"]["rows"] == 6, proc.stdout


def test_keys_repeated_across_tars_get_the_tar_stem(tmp_path):
    for s in range(2):  # each shard restarts its keys at 000000
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
            for i in range(2):
                _add(tar, f"{i:06d}.txt", f"text {s} {i}".encode())
    src = build_source("webdataset", [f"urls={tmp_path}"])
    assert [src.record_id(i) for i in range(4)] == ["shard-0/000000", "shard-0/000001",
                                                     "shard-1/000000", "shard-1/000001"]
    assert src.read(3).fields[0].data == "text 1 1" and src.read(3).fields[0].role == "document"


def test_edited_tar_rebuilds_with_the_new_text(tmp_path):
    def write(caption: str) -> None:
        with tarfile.open(tmp_path / "wds" / "shard-001.tar", "w") as tar:
            _add(tar, "k1.txt", caption.encode())

    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "shard-000.tar", "w") as tar:
        _add(tar, "k0.txt", b"first shard")
    write("old caption")
    cfg = dict(source="webdataset", options=[f"urls={tmp_path / 'wds'}"], out=tmp_path / "out",
               tokenizers=["text=bytes"])

    def texts() -> dict[str, str]:
        return {s.id: bytes(int(i) for i in s.segments[0].ids if i < 256).decode()
                for s in rows_to_samples(store.read_folder(tmp_path / "out"))}

    preprocess(PreprocessConfig(**cfg))
    assert texts() == {"k0": "first shard", "k1": "old caption"}
    write("new caption")
    notes: list[str] = []
    m = preprocess(PreprocessConfig(**cfg), notify=notes.append)
    assert not m["up_to_date"] and "shard-001.tar" in notes[0]
    assert texts() == {"k0": "first shard", "k1": "new caption"}
    assert preprocess(PreprocessConfig(**cfg))["up_to_date"]
