"""Shard store: atomic writes, sha256, manifests, and reading through datasets and pyarrow."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pytest

from mmtool.data import shards as store
from mmtool.data.schema import SCHEMA_VERSION, Sample, Segment, samples_to_batch
from mmtool.errors import MMToolError


def batch(n: int, offset: int = 0) -> pa.RecordBatch:
    return samples_to_batch([
        Sample(f"s{i}", "t", "text", "train",
               [Segment("text", "document", "bytes", (3,), ids=np.array([i, i + 1, i + 2]))])
        for i in range(offset, offset + n)
    ])


def test_parse_size():
    assert store.parse_size("64MB") == 64_000_000
    assert store.parse_size("512KiB") == 512 * 1024
    assert store.parse_size("1e6") == 1_000_000
    for bad in ("lots", "12XB", "0"):
        with pytest.raises(MMToolError, match="--shard-size"):
            store.parse_size(bad)


def test_write_shard_is_readable_by_pyarrow_and_datasets(tmp_path):
    info = store.write_shard(tmp_path / "shard-00000.arrow", [batch(3), batch(2, offset=3)])
    path = tmp_path / info["path"]
    assert info["rows"] == 5 and info["bytes"] == path.stat().st_size
    assert info["sha256"] == store.sha256_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.arrow"]  # no temp file left
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_stream(src).read_all()
    ds = datasets.Dataset.from_file(str(path))
    assert table.column("id").to_pylist() == ds["id"] == [f"s{i}" for i in range(5)]
    assert [s[0]["ids"] for s in ds["segments"]] == [[i, i + 1, i + 2] for i in range(5)]


def test_failed_write_leaves_no_file(tmp_path):
    def broken():
        yield batch(2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        store.write_shard(tmp_path / "shard-00000.arrow", broken())
    assert list(tmp_path.iterdir()) == []


def test_manifest_checks(tmp_path):
    with pytest.raises(MMToolError, match="no manifest.json"):
        store.load_manifest(tmp_path)
    info = store.write_shard(tmp_path / "shard-00000.arrow", [batch(4)])
    store.atomic_write_json(tmp_path / "manifest.json", {"schema_version": SCHEMA_VERSION, "shards": [info]})
    store.verify_shards(tmp_path)
    assert store.read_folder(tmp_path, verify=True).num_rows == 4
    # corrupt one byte in the middle of the shard: sha256 no longer matches
    data = bytearray((tmp_path / info["path"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / info["path"]).write_bytes(bytes(data))
    with pytest.raises(MMToolError, match="corrupt"):
        store.verify_shards(tmp_path)
    (tmp_path / info["path"]).unlink()
    with pytest.raises(MMToolError, match="missing"):
        store.verify_shards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "shards": []}))
    with pytest.raises(MMToolError, match="newer"):
        store.load_manifest(tmp_path)
