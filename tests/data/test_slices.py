"""Preprocessing in slices, as a library: K slices merged are byte for byte one run; merge refuses
anything that would not add up to that run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.data.slices import slice_file, slice_parts
from mmtool.data.merge import merge
from mmtool.errors import MMToolError

from tests.folder_state import snapshot

# 512KB shards: pydocs makes 35 parts and 7 shards, so shards straddle slice boundaries.
PYDOCS = dict(source="pydocs", shard_size="512KB", num_proc=2)


def files(folder: Path) -> dict[str, str]:
    """{name: sha256} of the dataset files (shards, manifest, rejects) of a folder."""
    return {k: v for k, v in snapshot(folder).items() if not k.startswith(".mmtool")}


@pytest.fixture(scope="module")
def pydocs(tmp_path_factory):
    """One `--num-proc 2` run of pydocs, and its 4 slices (each `--num-proc 2`) in 4 folders."""
    root = tmp_path_factory.mktemp("slices")
    one = preprocess(PreprocessConfig(out=root / "one", **PYDOCS))
    docs = [preprocess(PreprocessConfig(out=root / f"s{i}", num_slices=4, slice=i, **PYDOCS))
            for i in range(4)]
    return root, one, docs


def test_four_slices_merge_to_the_bytes_of_one_run(pydocs, tmp_path):
    root, one, docs = pydocs
    assert len(one["shards"]) == 7 and docs[0]["parts_total"] == 35
    merged = merge(tmp_path / "merged", [root / f"s{i}" for i in (2, 0, 3, 1)])  # any order
    assert merged["shards"] == one["shards"]  # names, rows, bytes, sha256
    assert files(tmp_path / "merged") == files(root / "one")  # every shard, rejected.jsonl, manifest
    assert (tmp_path / "merged" / "manifest.json").read_bytes() == (root / "one" / "manifest.json").read_bytes()
    # The slices split the parts into contiguous blocks and the counts add up.
    assert [d["part_range"] for d in docs] == [[0, 8], [8, 17], [17, 26], [26, 35]]
    for d in docs:
        assert d["records"] == d["written"] + d["rejected"]
        assert not (root / f"s{d['slice']}" / "manifest.json").exists()  # a slice is not a dataset
    assert sum(d["records"] for d in docs) == one["records"] == 6342
    assert sum(d["written"] for d in docs) == one["written"]
    assert sum(d["rejected"] for d in docs) == one["rejected"]
    assert sum(d["rows"] for d in docs) == one["rows"]


def test_slice_parts_are_contiguous_and_cover_every_part():
    for n in (0, 1, 3, 35, 100):
        for k in (1, 2, 4, 7):
            blocks = [slice_parts(n, k, i) for i in range(k)]
            assert [p for b in blocks for p in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_rerunning_a_finished_slice_rewrites_nothing(pydocs):
    root, _one, _docs = pydocs
    before = {p: p.stat().st_mtime_ns for p in (root / "s1").rglob("*") if p.is_file()}
    doc = preprocess(PreprocessConfig(out=root / "s1", num_slices=4, slice=1, **PYDOCS))
    assert doc["up_to_date"] and doc["resumed_parts"] == 9
    after = {p: p.stat().st_mtime_ns for p in (root / "s1").rglob("*") if p.is_file()}
    changed = [p.name for p in before if before[p] != after[p] and not p.name.startswith(".mmtool")]
    assert changed in ([], ["plan.json"])  # the plan (with its inputs table) is refreshed, parts are not
    assert (root / "s1" / slice_file(1, 4)).stat().st_mtime_ns == before[root / "s1" / slice_file(1, 4)]


def _copy(root: Path, name: str, dest: Path) -> Path:
    return Path(shutil.copytree(root / name, dest, ignore=shutil.ignore_patterns(".mmtool.lock")))


def test_merge_refuses_a_missing_slice(pydocs, tmp_path):
    root, _, _ = pydocs
    with pytest.raises(MMToolError, match=r"^slice 2 of 4 missing: not in the folders given"):
        merge(tmp_path / "m", [root / "s0", root / "s1", root / "s3"])
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_duplicated_slice(pydocs, tmp_path):
    root, _, _ = pydocs
    again = _copy(root, "s1", tmp_path / "s1-again")
    with pytest.raises(MMToolError, match=f"^{again}: holds slice 1 of 4, which {root / 's1'} holds too"):
        merge(tmp_path / "m", [root / f"s{i}" for i in range(4)] + [again])
    with pytest.raises(MMToolError, match="given twice"):
        merge(tmp_path / "m", [root / f"s{i}" for i in range(4)] + [root / "s1"])


def test_merge_refuses_slices_of_other_settings(pydocs, tmp_path):
    root, _, _ = pydocs
    other = tmp_path / "other"  # the same slice, other settings (a smaller --max-samples)
    preprocess(PreprocessConfig(out=other, num_slices=4, slice=3, **{**PYDOCS, "num_proc": 1},
                                max_samples=100))
    with pytest.raises(MMToolError, match=f"^{other}: slice 3 of 4 was made with other settings than"):
        merge(tmp_path / "m", [root / "s0", root / "s1", root / "s2", other])
    halves = tmp_path / "halves"  # the same settings, cut in 2 instead of 4
    preprocess(PreprocessConfig(out=halves, num_slices=2, slice=1, **PYDOCS))
    with pytest.raises(MMToolError, match=f"^{halves}: holds slice 1 of 2, but .* holds slice 0 of 4; "
                                          "every slice needs the same --num-slices"):
        merge(tmp_path / "m", [root / "s0", root / "s1", root / "s2", root / "s3", halves])


def test_merge_refuses_an_unfinished_slice_and_a_changed_part(pydocs, tmp_path):
    root, _, _ = pydocs
    unfinished = _copy(root, "s2", tmp_path / "s2-unfinished")
    (unfinished / slice_file(2, 4)).unlink()  # what a slice killed before its end leaves
    with pytest.raises(MMToolError, match=f"^{unfinished}: holds no finished slice .*an unfinished "
                                          "slice: rerun its `--slice I` command"):
        merge(tmp_path / "m", [root / "s0", root / "s1", unfinished, root / "s3"])
    damaged = _copy(root, "s2", tmp_path / "s2-damaged")
    part = damaged / ".partial" / "part-00020.arrow"
    data = bytearray(part.read_bytes())
    data[-100] ^= 1  # same size, other bytes
    part.write_bytes(bytes(data))
    with pytest.raises(MMToolError, match=r"part file \.partial/part-00020\.arrow changed since slice 2 of 4"):
        merge(tmp_path / "m", [root / "s0", root / "s1", damaged, root / "s3"])
    part.unlink()
    with pytest.raises(MMToolError, match=r"part file \.partial/part-00020\.arrow of slice 2 of 4 is missing"):
        merge(tmp_path / "m", [root / "s0", root / "s1", damaged, root / "s3"])
    with pytest.raises(MMToolError, match="not a slice folder"):
        merge(tmp_path / "m", [root / "one"])


def test_merge_refuses_slices_that_read_other_inputs(tmp_path):
    src = tmp_path / "records.jsonl"
    lines = [json.dumps({"id": f"r{i}", "text": f"record number {i} " * 8}) + "\n" for i in range(40)]
    src.write_text("".join(lines))
    cfg = dict(source="jsonl", options=[f"path={src}"], shard_size="4KB")
    preprocess(PreprocessConfig(out=tmp_path / "a", num_slices=2, slice=0, **cfg))
    src.write_text("".join(lines[:-1]) + json.dumps({"id": "r39", "text": "edited"}) + "\n")
    preprocess(PreprocessConfig(out=tmp_path / "b", num_slices=2, slice=1, **cfg))
    with pytest.raises(MMToolError, match=f"^{tmp_path / 'b'}: slice 1 of 2 read other inputs than "
                                          f"{tmp_path / 'a'} \\(1 input file changed"):
        merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])


def test_rejects_add_up_and_merge_checks_max_rejected_on_the_whole_job(tmp_path):
    jsonl = Path(shutil.copytree(SAMPLE_DATA / "jsonl", tmp_path / "jsonl"))
    mixed = jsonl / "mixed.jsonl"  # 12 good records, then 11 bad ones
    mixed.write_bytes((jsonl / "records.jsonl").read_bytes() + (jsonl / "bad_records.jsonl").read_bytes())
    cfg = dict(source="jsonl", options=[f"path={mixed}"], tokenizers=["image=patches:channels=3"],
               shard_size="4KB")
    one = preprocess(PreprocessConfig(out=tmp_path / "one", max_rejected=1.0, **cfg))
    docs = [preprocess(PreprocessConfig(out=tmp_path / f"s{i}", num_slices=2, slice=i, **cfg))
            for i in range(2)]  # a slice does not fail on its share of rejects (slice 1: 11 of 11)
    assert [(d["records"], d["written"], d["rejected"]) for d in docs] == [(16, 12, 4), (7, 0, 7)]
    assert one["rejected"] == 11 and one["written"] == 12
    with pytest.raises(MMToolError, match=r"^11 of 23 records \(47\.8%\) were rejected, more than "
                                          r"--max-rejected 0\.01"):
        merge(tmp_path / "m", [tmp_path / "s0", tmp_path / "s1"])
    merge(tmp_path / "m", [tmp_path / "s0", tmp_path / "s1"], max_rejected=0.5)
    assert files(tmp_path / "m") == files(tmp_path / "one")  # rejected.jsonl included


def test_more_slices_than_parts_and_a_shared_out(tmp_path):
    """Slices that own no part still count; slices may share one --out and merge in place; a plain
    run into a slice folder finishes the job from the slice's parts."""
    cfg = dict(source="pydocs", max_samples=40, shard_size="4KB")  # 3 parts of 16 records
    one = preprocess(PreprocessConfig(out=tmp_path / "one", **cfg))
    docs = [preprocess(PreprocessConfig(out=tmp_path / "shared", num_slices=5, slice=i, **cfg))
            for i in range(5)]
    assert [d["part_range"] for d in docs] == [[0, 0], [0, 1], [1, 1], [1, 2], [2, 3]]
    assert [d["records"] for d in docs] == [0, 16, 0, 16, 8]
    merge(tmp_path / "copy", [tmp_path / "shared"])  # reads the shared folder, leaves it as it is
    assert files(tmp_path / "copy") == files(tmp_path / "one")
    assert len(list((tmp_path / "shared").glob("slice-*.json"))) == 5
    merge(tmp_path / "shared", [tmp_path / "shared"])  # in place: the folder becomes the dataset
    assert files(tmp_path / "shared") == files(tmp_path / "one")
    assert not (tmp_path / "shared" / ".partial").exists()
    assert one["records"] == 40

    part = tmp_path / "part"
    preprocess(PreprocessConfig(out=part, num_slices=3, slice=1, **cfg))
    finished = preprocess(PreprocessConfig(out=part, **cfg))
    assert finished["resumed_parts"] == 1 and finished["shards"] == one["shards"]
    assert not list(part.glob("slice-*.json"))


def test_slice_flags_are_checked(tmp_path):
    for kw, flag in ((dict(num_slices=0, slice=0), "--num-slices 0"), (dict(num_slices=4, slice=4), "--slice 4"),
                     (dict(num_slices=4, slice=-1), "--slice -1"), (dict(slice=1), "--slice 1: needs --num-slices"),
                     (dict(num_slices=2), "--num-slices 2: needs --slice")):
        with pytest.raises(MMToolError, match=f"^{flag}"):
            preprocess(PreprocessConfig(source="pydocs", out=tmp_path / "x", max_samples=10, **kw))
    assert not (tmp_path / "x").exists()
    with pytest.raises(MMToolError, match="a slice is written to a local"):
        preprocess(PreprocessConfig(source="pydocs", out="memory://bucket/x", max_samples=10,
                                    num_slices=2, slice=0))
