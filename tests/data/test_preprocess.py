"""`preprocess` as a library: manifest counts, read-back equality, parallel = serial, resume."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pytest

from mmtool.data import shards as store
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.tokenizing import TokenizerSet, to_sample
from mmtool.data.sources import build_source
from mmtool.errors import MMToolError


def run(tmp_path, name="out", **kw):
    cfg = PreprocessConfig(**{"source": "digits", "out": tmp_path / name, "max_samples": 300,
                              "shard_size": "40KB", **kw})
    return preprocess(cfg), cfg.out


def test_manifest_counts_add_up(tmp_path):
    manifest, out = run(tmp_path)
    assert manifest["schema_version"] == 1
    assert manifest["records"] == manifest["rows"] + manifest["rejected"] == 300
    assert manifest["rejected"] == 0 and (out / "rejected.jsonl").read_text() == ""
    assert manifest["sources"]["digits"]["rows"] == 300
    assert set(manifest["modalities"]) == {"image", "text"}
    assert manifest["modalities"]["image"]["rows"] == manifest["modalities"]["text"]["rows"] == 300
    assert manifest["modalities"]["image"]["tokens"] == 300 * 4  # 8x8 image, 4x4 patches
    assert (manifest["sources"]["digits"]["tokens"]
            == manifest["modalities"]["image"]["tokens"] + manifest["modalities"]["text"]["tokens"])
    assert sum(manifest["splits"].values()) == 300
    assert len(manifest["shards"]) > 1, "40KB shards should split 300 digits"
    assert sum(s["rows"] for s in manifest["shards"]) == 300
    for shard in manifest["shards"]:
        assert store.sha256_file(out / shard["path"]) == shard["sha256"]
        assert (out / shard["path"]).stat().st_size == shard["bytes"]
    assert set(manifest["tokenizers"]) == {"image/image", "text/caption"}
    assert manifest["tokenizers"]["text/caption"]["name"] == "wordpiece"
    assert not (out / ".partial").exists()
    assert json.loads((out / "manifest.json").read_text())["rows"] == 300


def test_shards_read_back_the_tokens_that_were_written(tmp_path):
    manifest, out = run(tmp_path, max_samples=40)
    source = build_source("digits")
    expected = [to_sample(source, TokenizerSet({}), i) for i in range(40)]
    via_datasets = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(out / s["path"])) for s in manifest["shards"]])
    via_arrow = pa.concat_tables(
        [pa.ipc.open_stream(pa.memory_map(str(out / s["path"]))).read_all() for s in manifest["shards"]])
    assert via_datasets["id"] == via_arrow.column("id").to_pylist() == [s.id for s in expected]
    for want, row_ds, row_pa in zip(expected, via_datasets, via_arrow.to_pylist()):
        assert row_ds["label"] == row_pa["label"] == want.label
        for seg, g_ds, g_pa in zip(want.segments, row_ds["segments"], row_pa["segments"]):
            assert g_ds["modality"] == g_pa["modality"] == seg.modality
            assert tuple(g_ds["shape"]) == tuple(g_pa["shape"]) == seg.shape
            if seg.ids is not None:
                assert g_ds["ids"] == g_pa["ids"] == seg.ids.tolist()
            else:
                np.testing.assert_array_equal(np.asarray(g_ds["values"], np.float32), seg.values)
                np.testing.assert_array_equal(np.asarray(g_pa["values"], np.float32), seg.values)


def test_parallel_output_is_byte_identical_to_serial(tmp_path):
    serial, a = run(tmp_path, "serial", source="cartpole", options=["episodes=60"], max_samples=None,
                    shard_size="20KB")
    parallel, b = run(tmp_path, "parallel", source="cartpole", options=["episodes=60"],
                      max_samples=None, shard_size="20KB", num_proc=2)
    assert len(serial["shards"]) > 2
    assert serial["shards"] == parallel["shards"]  # names, rows, bytes and sha256
    for key in ("records", "rows", "sources", "modalities", "splits", "tokenizers"):
        assert serial[key] == parallel[key]


def test_rerun_settings_and_overwrite(tmp_path):
    first, out = run(tmp_path, max_samples=50)
    again, _ = run(tmp_path, max_samples=50)
    assert again["up_to_date"] and again["shards"] == first["shards"]
    with pytest.raises(MMToolError, match="--overwrite"):
        run(tmp_path, max_samples=60)
    third, _ = run(tmp_path, max_samples=60, overwrite=True)
    assert third["rows"] == 60 and not third["up_to_date"]


def test_split_selection_is_a_partition(tmp_path):
    counts = {}
    for split in ("train", "validation", "test"):
        m, _ = run(tmp_path, split, split=split, max_samples=None)
        assert set(m["splits"]) == {split}
        counts[split] = m["rows"]
    assert sum(counts.values()) == 1797
    assert 0.75 < counts["train"] / 1797 < 0.85


def test_bad_flags_are_named(tmp_path):
    with pytest.raises(MMToolError, match="--on-error"):
        run(tmp_path, on_error="ignore")
    with pytest.raises(MMToolError, match="--max-rejected"):
        run(tmp_path, max_rejected=5)
    with pytest.raises(MMToolError, match="--tokenizer"):
        run(tmp_path, tokenizers=["image"])
    with pytest.raises(MMToolError, match="unknown tokenizer 'patchez'.*did you mean 'patches'"):
        run(tmp_path, tokenizers=["image=patchez"])
    with pytest.raises(MMToolError, match="--opt colour.*no option 'colour'"):
        run(tmp_path, options=["colour=red"])


def test_tokenizer_override_changes_tokens(tmp_path):
    m, _ = run(tmp_path, max_samples=20, tokenizers=["image=patches:patch_size=2", "text=bytes"])
    assert m["modalities"]["image"]["tokens"] == 20 * 16
    assert m["tokenizers"]["text/caption"]["name"] == "bytes"
    assert m["tokenizers"]["image/image"]["patch_size"] == 2
