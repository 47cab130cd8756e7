"""Nothing silent: every source says which input column became what, before writing; id-, path- and
URL-like strings never become text unless mapped explicitly."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmtool.data import shards
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import rows_to_samples
from mmtool.data.sources import build_source
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.data.tokenizers.image import Patches
from mmtool.data.tokenizers.text import Bytes

ROWS = [{"id": f"r{k}", "img_file": f"imgs/{k}.png", "__url__": f"https://x.org/shard-0.tar#{k}",
         "caption": f"Caption number {k}, Mixed Case.", "score": k * 0.5} for k in range(4)]


def _mapping(source) -> dict[str, tuple[str, str]]:
    return {r.input: (r.target, r.role) for r in source.mapping()}


@pytest.fixture
def caps(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_hf_json_ids_paths_and_urls_never_become_text(tmp_path, caps):
    cache = f"cache_dir={tmp_path / 'cache'}"
    s = build_source("hf", [f"path={caps}", cache])  # a local file: read offline by its suffix
    assert _mapping(s) == {"caption": ("text", "document"), "id": ("id", ""),
                           "img_file": ("meta", ""), "__url__": ("meta", ""), "score": ("ignored", "")}
    manifest = preprocess(PreprocessConfig("hf", tmp_path / "out", options=[f"path={caps}", cache],
                                           tokenizers=["text=bytes"]))
    assert [(m["input"], m["target"]) for m in manifest["mapping"]] == [
        ("caption", "text"), ("id", "id"), ("img_file", "meta"), ("__url__", "meta"), ("score", "ignored")]
    samples = rows_to_samples(shards.read_folder(tmp_path / "out"))
    assert [s.id for s in samples] == [r["id"] for r in ROWS]  # ids are the input's keys
    for sample, row in zip(samples, ROWS):
        assert [seg.modality for seg in sample.segments] == ["text"]
        assert Bytes().decode(sample.segments[0]) == row["caption"]  # case kept with bytes
        assert sample.meta == {"img_file": row["img_file"], "__url__": row["__url__"]}


def test_hf_explicit_map_may_read_an_id_as_text(tmp_path, caps):
    s = build_source("hf", [f"path={caps}", f"cache_dir={tmp_path / 'c'}", "map=id:text,caption:text"])
    assert [f.data for f in s.read(0).fields] == ["r0", ROWS[0]["caption"]]
    assert _mapping(s)["img_file"] == ("ignored", "")


def test_hf_parquet_with_raw_image_bytes(tmp_path):
    sizes = [(8, 12), (16, 8), (4, 4)]
    blobs, keys = [], []
    for k, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
        keys.append(f"sample-{k:03d}")
    table = pa.table({"__key__": keys, "jpg": pa.array(blobs, pa.binary()),
                      "txt": [f"photo {k}" for k in range(3)]})
    pq.write_table(table, tmp_path / "data.parquet")
    cache = f"cache_dir={tmp_path / 'cache'}"
    s = build_source("hf", [f"path={tmp_path / 'data.parquet'}", cache])
    assert _mapping(s) == {"jpg": ("image", "image"), "txt": ("text", "caption"), "__key__": ("id", "")}
    preprocess(PreprocessConfig("hf", tmp_path / "out", options=[f"path={tmp_path / 'data.parquet'}", cache]))
    samples = rows_to_samples(shards.read_folder(tmp_path / "out"))
    assert [s.id for s in samples] == keys
    for sample, (w, h) in zip(samples, sizes):
        img = Patches().decode(sample.segments[0])
        assert img.shape[:2] == (h, w)  # multiples of the patch size: no padding


def test_jsonl_mapping_lists_every_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "hi", "source_url": "http://x"}) + "\n"
                    + json.dumps({"text": "there", "label": 1}) + "\n")
    rows = {r.input: (r.target, r.note) for r in build_source("jsonl", [f"path={path}"]).mapping()}
    assert rows == {"text": ("text", ""), "label": ("label", "in 1 of the first 2 lines"),
                    "id": ("id", "in 1 of the first 2 lines"),
                    "source_url": ("meta", "in 1 of the first 2 lines")}


def test_builtin_sources_report_their_fixed_fields(tmp_path):
    rows = build_source("digits").mapping()
    assert [(r.target, r.role) for r in rows][:3] == [("image", "image"), ("text", "caption"), ("id", "")]
    manifest = preprocess(PreprocessConfig("jsonl", tmp_path / "o", options=[
        f"path={SAMPLE_DATA / 'jsonl' / 'records.jsonl'}"], max_samples=3))
    assert {m["input"] for m in manifest["mapping"]} >= {"image", "text", "id", "label"}
