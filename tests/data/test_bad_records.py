"""Bad input stays in its record: each case is one bad record among good ones, preprocessed by the
library; the job finishes, `records == rows + rejected`, and the rejection names the line and why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmtool.data import media, shards
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.data.tokenizers.text import CHARS_PER_TOKEN, WordPiece, bound_text
from mmtool.errors import MMToolError, RecordError

DIGIT3 = SAMPLE_DATA / "jsonl" / "media" / "digit3.png"
GOOD = [json.dumps({"id": f"g{i}", "text": f"good record number {i}"}) for i in range(4)]

# (name, the bad JSONL line, a regex its rejection reason must match)
BAD_LINES = [
    ("deep-json", '{"text": "x", "meta": ' + "[" * 5000 + "]" * 5000 + "}", r"nested too deeply"),
    ("label-2^70", json.dumps({"text": "x", "label": 2**70}), r"label .* \[0, 2\^63\)"),
    ("actions-2^70", json.dumps({"actions": [2**70, 1], "observations": [[0.1], [0.2]]}),
     r"actions must be integers in the int64 range"),
    ("surrogate-text", '{"text": "a \\ud800 b"}', r"text holds a lone surrogate U\+D800 at character 2"),
    ("surrogate-id", '{"id": "x\\udc00", "text": "fine"}', r"id holds a lone surrogate U\+DC00"),
    ("surrogate-task", '{"task": "\\ud83d", "text": "fine"}', r"task holds a lone surrogate"),
    ("num-actions-1e12", json.dumps({"actions": [0, 1], "observations": [[0.1], [0.2]],
                                     "num_actions": 10**12}), r"num_actions .* 1 to 1048576"),
    ("huge-int-literal", '{"text": "x", "meta": {"n": ' + "9" * 5000 + "}}", r"invalid JSON: .*digits"),
    ("nan-observation", '{"observations": [[NaN]], "actions": [0]}', r"observations contain NaN"),
]


def _run(tmp_path: Path, lines: list[str], *opts: str, **kw) -> dict:
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = PreprocessConfig("jsonl", tmp_path / "out", options=[f"path={tmp_path / 'd.jsonl'}", *opts],
                           max_rejected=1.0, **kw)
    return preprocess(cfg)


def _rejected(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,line,reason", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_one_bad_record_is_rejected_and_the_rest_kept(tmp_path, name, line, reason):
    manifest = _run(tmp_path, [GOOD[0], GOOD[1], line, GOOD[2], GOOD[3]])
    assert (manifest["records"], manifest["rows"], manifest["rejected"]) == (5, 4, 1)
    [rej] = _rejected(tmp_path)
    assert rej["location"] == f"{tmp_path / 'd.jsonl'}:3" and rej["index"] == 2
    assert __import__("re").search(reason, rej["reason"]), rej["reason"]
    ids = set(shards.read_folder(tmp_path / "out").column("id").to_pylist())
    assert ids == {"g0", "g1", "g2", "g3"}


def test_every_bad_record_at_once_with_two_workers(tmp_path):
    lines = []
    for i in range(40):  # parts have at least 16 records: several parts, so the pool runs
        lines.append(json.dumps({"id": f"g{i}", "text": f"good {i}"}))
        if i % 4 == 1:
            lines.append(BAD_LINES[(i // 4) % len(BAD_LINES)][1])
    manifest = _run(tmp_path, lines, num_proc=2)
    assert manifest["records"] == 50 and manifest["rows"] == 40 and manifest["rejected"] == 10
    assert manifest["records"] == manifest["rows"] + len(_rejected(tmp_path))


def test_on_error_raise_names_the_record(tmp_path):
    with pytest.raises(RecordError, match=r"d\.jsonl:2: label must be") as exc:
        _run(tmp_path, [GOOD[0], BAD_LINES[1][1]], on_error="raise")
    assert "\n" not in str(exc.value)


def test_long_text_is_cut_before_tokenizing_and_counted(tmp_path):
    words = "alpha beta " * 200_000  # 2.2 M characters: more than max_chunks (64) chunks of 512
    manifest = _run(tmp_path, [GOOD[0], json.dumps({"id": "long", "text": words}), GOOD[1]])
    assert (manifest["written"], manifest["rows"], manifest["rejected"]) == (3, 2 + 64, 0)
    assert manifest["sources"]["jsonl"]["truncated"] == 1 == manifest["chunked"]
    row = [r for r in shards.read_folder(tmp_path / "out").to_pylist() if r["id"] == "long#0"][0]
    ids = row["segments"][0]["ids"]
    assert len(ids) == 512 and ids[0] == WordPiece.CLS and ids[-1] == WordPiece.SEP
    # the kept tokens are those of the whole text: cutting at the char cap lost nothing
    full = WordPiece(max_tokens=10**6).encode("alpha beta " * 300, "document").ids[1:511]
    assert ids[1:511] == full.tolist()


def test_line_limit_and_blank_lines(tmp_path):
    lines = [GOOD[0], "", "   ", json.dumps({"id": "big", "text": "y" * 5000}), GOOD[1]]
    manifest = _run(tmp_path, lines, "max_line_bytes=4096")
    assert (manifest["records"], manifest["rows"], manifest["rejected"]) == (3, 2, 1)
    [rej] = _rejected(tmp_path)
    assert rej["location"].endswith("d.jsonl:4") and "max_line_bytes=4096" in rej["reason"]


def test_bound_text_cuts_at_whitespace():
    text, cut = bound_text("ab " * 100, 2)
    assert cut and len(text) <= 2 * CHARS_PER_TOKEN and not text.endswith(" ") and text.endswith("ab")
    assert bound_text("short", 512) == ("short", False)


def test_discrete_vocabulary_bound_is_a_flag_error():
    from mmtool.data.tokenizers.discrete import Discrete

    with pytest.raises(MMToolError, match=r"num_classes .* 0 \(unknown\) to 1048576"):
        Discrete(num_classes=10**12)
    assert Discrete(num_classes=2**20).config()["vocab_size"] == 2**20


# -- confined media paths --------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path):
    """data/ with one image inside, and secret/ beside it holding an image that must not be read."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    (data / "media").mkdir(parents=True)
    secret.mkdir()
    (data / "media" / "in.png").write_bytes(DIGIT3.read_bytes())
    (secret / "out.png").write_bytes(DIGIT3.read_bytes())
    os.symlink(secret / "out.png", data / "media" / "link.png")
    os.symlink(secret, data / "linkdir")
    return data, secret


@pytest.mark.parametrize("value,why", [
    ("ABS", "is an absolute path"),
    ("../secret/out.png", "climbs out with '..'"),
    ("media/../../secret/out.png", "climbs out with '..'"),
    ("media/link.png", "symlink"),
    ("linkdir/out.png", "symlink"),
])
def test_media_paths_outside_the_root_are_rejected(outside, value, why):
    data, secret = outside
    value = str(secret / "out.png") if value == "ABS" else value
    with pytest.raises(RecordError, match=why) as exc:
        media.confined_path(value, data)
    assert repr(value) in exc.value.reason and "allow_outside" in exc.value.reason
    assert media.confined_path(value, data, allow_outside=True).resolve() == (secret / "out.png")


def test_media_paths_inside_the_root_and_media_root(outside):
    data, secret = outside
    assert media.confined_path("media/in.png", data) == data / "media" / "in.png"
    assert media.confined_path(str(data / "media" / "in.png"), data) == data / "media" / "in.png"
    # a wider root (`--opt media_root=`) admits ../secret relative to the manifest's folder
    wide = media.confined_path("../secret/out.png", data, root=data.parent)
    assert wide.resolve() == secret / "out.png"


def test_jsonl_rejects_outside_paths_per_record(outside, tmp_path):
    data, secret = outside
    lines = [json.dumps({"id": "in", "image": "media/in.png", "text": "inside"}),
             json.dumps({"id": "up", "image": "../secret/out.png", "text": "up"}),
             json.dumps({"id": "abs", "image": str(secret / "out.png"), "text": "abs"}),
             json.dumps({"id": "sym", "image": "media/link.png", "text": "sym"})]
    (data / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg = lambda out, *o: PreprocessConfig("jsonl", tmp_path / out, max_rejected=1.0,  # noqa: E731
                                           options=[f"path={data / 'd.jsonl'}", *o])
    confined = preprocess(cfg("confined"))
    assert (confined["rows"], confined["rejected"]) == (1, 3)
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "confined" / "rejected.jsonl").read_text()
               .splitlines()]
    assert ["absolute" in reasons[1], "'..'" in reasons[0], "symlink" in reasons[2]] == [True] * 3
    allowed = preprocess(cfg("allowed", "allow_outside=true"))
    assert (allowed["rows"], allowed["rejected"]) == (4, 0)
    rooted = preprocess(cfg("rooted", f"media_root={tmp_path}"))
    assert (rooted["rows"], rooted["rejected"]) == (4, 0)


# -- manifests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,message", [
    ("[1, 2]", r"expected a JSON object, got list"),
    ('{"schema_version": 1}', r"'shards' must be a list .* got nothing"),
    ('{"schema_version": 1, "shards": {}}', r"'shards' must be a list .* got dict"),
    ('{"schema_version": 1, "shards": [3]}', r"shards\[0\] must be an object"),
    ('{"schema_version": 1, "shards": [{"path": "a", "rows": "1", "bytes": 1, "sha256": "x"}]}',
     r"shards\[0\]\.rows must be a non-negative integer"),
    ('{"schema_version": 1, "shards": [{"path": "../../other/shard.arrow", "rows": 1, "bytes": 1, '
     '"sha256": "x"}]}', r"'\.\.' climbs outside"),
    ('{"schema_version": 1, "shards": [{"path": "/etc/passwd", "rows": 1, "bytes": 1, '
     '"sha256": "x"}]}', r"is absolute"),
    ('{"schema_version": "1", "shards": []}', r"schema_version must be an integer, got '1'"),
])
def test_malformed_manifests_are_one_line_errors(tmp_path, body, message):
    (tmp_path / "manifest.json").write_text(body)
    with pytest.raises(MMToolError, match=message) as exc:
        shards.read_folder(tmp_path, verify=True)
    assert str(tmp_path / "manifest.json") in str(exc.value) and "\n" not in str(exc.value)


def test_symlinked_shard_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "s.arrow").write_bytes(b"x")
    folder = tmp_path / "f"
    folder.mkdir()
    os.symlink(other / "s.arrow", folder / "shard-00000.arrow")
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": [
        {"path": "shard-00000.arrow", "rows": 1, "bytes": 1, "sha256": "x"}]}))
    with pytest.raises(MMToolError, match="a symlink leads outside"):
        shards.load_manifest(folder)


def test_hf_source_rows_are_bounded_and_contained(tmp_path):
    """The same containment for the `hf` source: a 1 MB text is chunked (64 chunks at most), the
    rest cut and counted, a bad row rejected."""
    rows = [{"uid": "a", "caption": "fine"}, {"uid": "b", "caption": "word " * 200_000},
            {"uid": "c", "caption": "   "}, {"uid": "d", "caption": "also fine"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = PreprocessConfig("hf", tmp_path / "out", max_rejected=1.0, options=[
        "path=json", f"data_files={tmp_path / 'd.jsonl'}", f"cache_dir={tmp_path / 'cache'}",
        "map=caption:text,uid:id"])
    manifest = preprocess(cfg)
    assert (manifest["records"], manifest["written"], manifest["rows"], manifest["rejected"]) \
        == (4, 3, 2 + 64, 1)
    assert manifest["sources"]["hf"]["truncated"] == 1
    [rej] = _rejected(tmp_path)
    assert rej["location"].endswith("row 2") and "empty text" in rej["reason"]


def test_line_scan_in_small_chunks_matches_whole_lines(tmp_path):
    from mmtool.data.sources.jsonl import _scan_lines

    text = b'{"a": 1}\n\n  \n' + b"x" * 37 + b"\n" + b" " * 20 + b"\n{}"
    (tmp_path / "f.jsonl").write_bytes(text)
    whole = [(text.index(line), n) for n, line in enumerate(text.split(b"\n"), 1) if line.strip()]
    for chunk in (1, 3, 4, 1000):
        offsets, lines = _scan_lines(tmp_path / "f.jsonl", chunk)
        assert list(zip(offsets, lines)) == [(0, 1), (13, 4), (72, 6)] == whole
