"""TokenIndex: what it reads from the shards, and the clear errors for folders it must refuse."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mmtool.data import shards as store
from mmtool.data.index import SEPARATOR, TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError


def test_index_matches_the_rows(data):
    index = TokenIndex(data.all)
    samples = data.samples()
    pydocs = json.loads((data.dirs["pydocs"] / "manifest.json").read_text())["sources"]["pydocs"]
    # 300 pydocs records; each one longer than max_len becomes several samples (chunks)
    assert pydocs["written"] == 300 and pydocs["chunked"] > 0
    assert pydocs["rows"] == 300 - pydocs["chunked"] + pydocs["chunks"]
    assert index.folder_sizes() == [300, 100, 30, 10, pydocs["rows"], 12, 1]
    steps = [next((g.shape[0] for g in s.segments if g.role == "observation"), 0) for s in samples]
    np.testing.assert_array_equal(index.steps, steps)
    np.testing.assert_array_equal(index.lengths, [s.n_tokens + t for s, t in zip(samples, steps)])
    np.testing.assert_array_equal(index.labels, [-1 if s.label is None else s.label for s in samples])
    np.testing.assert_array_equal(index.sample_folder, np.repeat(np.arange(7), index.folder_sizes()))
    assert index.sample_ids([0, 400, len(samples) - 1]) == [samples[0].id, samples[400].id, "prompted-cartpole"]
    keys = [s.key for s in index.streams]
    assert keys[-1] == SEPARATOR and keys[:-1] == sorted(keys[:-1])
    assert {"action:discrete", "action:mulaw", "audio:logmel", "image:patches",
            "observation:mulaw", "reward:raw-float", "text:wordpiece"} == set(keys[:-1])
    by_key = {s.key: s for s in index.streams}
    assert by_key["image:patches"].dim == 48 and by_key["audio:logmel"].dim == 320
    assert by_key["reward:raw-float"].dim == 1 and by_key["text:wordpiece"].vocab_size == 30522
    assert by_key["observation:mulaw"].kind == "ids" and by_key["audio:logmel"].kind == "values"
    # signatures: one bit per stream used, plus the separator for trajectories
    bit = {k: 1 << i for i, k in enumerate(keys)}
    digit = int(np.flatnonzero(index.sample_folder == 0)[0])
    assert index.signature[digit] == bit["image:patches"] | bit["text:wordpiece"]
    cart = int(np.flatnonzero(index.sample_folder == 2)[0])
    assert index.signature[cart] == (bit["observation:mulaw"] | bit["action:discrete"]
                                     | bit["reward:raw-float"] | bit[SEPARATOR])


def test_a_folder_with_two_tokenizers_for_one_role_opens(data):
    """jsonl actions are discrete for cartpole and mu-law for pendulum: both are in the manifest."""
    manifest = store.load_manifest(data.dirs["jsonl"])
    names = {k: v["name"] for k, v in manifest["tokenizers"].items() if k.startswith("action/")}
    assert sorted(names.values()) == ["discrete", "mulaw"]
    TokenIndex([data.dirs["jsonl"]])


# -- bad input: each refused with a clear MMToolError before any batch is made -----------------
def test_missing_folder(tmp_path):
    with pytest.raises(MMToolError, match=r"nowhere: no manifest.json; run `mmtool preprocess"):
        TokenIndex([tmp_path / "nowhere"])
    with pytest.raises(MMToolError, match="no data folders"):
        TokenIndex([])


def test_missing_shard(data, tmp_path):
    folder = data.copy("cartpole", tmp_path)
    shard = folder / store.load_manifest(folder)["shards"][0]["path"]
    shard.unlink()
    with pytest.raises(MMToolError, match=rf"{shard.name}: shard listed in manifest.json is missing"):
        TokenIndex([data.dirs["digits"], folder])
    with pytest.raises(MMToolError, match="not a readable Arrow stream shard"):
        TokenIndex([folder], verify=False)


def test_corrupt_shard(data, tmp_path):
    folder = data.copy("digits", tmp_path)
    shard = folder / store.load_manifest(folder)["shards"][0]["path"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(MMToolError, match=r"shard is corrupt \(sha256 differs from manifest.json\)"):
        TokenIndex([folder])


def test_newer_schema_version(data, tmp_path):
    folder = data.copy("pendulum", tmp_path)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(MMToolError, match="schema_version 99 is newer than this mmtool understands"):
        TokenIndex([data.dirs["cartpole"], folder])


def test_incompatible_tokenizers(data, tmp_path):
    other = tmp_path / "digits-p2"
    preprocess(PreprocessConfig(source="digits", out=other, max_samples=20,
                                tokenizers=["image=patches:patch_size=2,channels=3"]))
    with pytest.raises(MMToolError) as err:
        TokenIndex([data.dirs["digits"], other])
    msg = str(err.value)
    assert re.search(r"tokenize image with incompatible patches settings \((dim, )?patch_size differ\)",
                     msg), msg
    assert "--tokenizer" in msg and str(other) in msg and str(data.dirs["digits"]) in msg


def test_mixed_vector_sizes_are_refused(data, tmp_path):
    """Same tokenizer settings, but gray digits make 16-float patches and RGB images 48."""
    gray = tmp_path / "digits-gray"
    preprocess(PreprocessConfig(source="digits", out=gray, max_samples=20))
    rgb = tmp_path / "jsonl-default"
    preprocess(PreprocessConfig(source="jsonl", out=rgb, options=data.options("jsonl")))
    with pytest.raises(MMToolError, match=r"image:patches vectors have sizes \[16, 48\].*"
                                          r"--tokenizer options \(e.g. image=patches:channels=3\)"):
        TokenIndex([gray, rgb])
