"""`documents`: a folder of text files in, one record per file, ids the relative paths, long files
chunked with nothing lost, undecodable files rejected by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtool.data import shards
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import rows_to_samples
from mmtool.data.sources import build_source
from mmtool.data.tokenizers.text import Bytes
from mmtool.errors import MMToolError, RecordError

LONG = "".join(f"Chapter line {k}: Ünïcode stays — “quoted”, Case Kept.\n" for k in range(60))


def make_docs(folder):
    (folder / "ch01").mkdir(parents=True)
    (folder / "ch01" / "intro.txt").write_text("Intro.\n\nSecond paragraph, Kept As Written.\n")
    (folder / "ch02.md").write_text(LONG)
    (folder / "notes.rst").write_text("Short *rst* note.")
    (folder / "image.png").write_bytes(b"\x89PNG")  # not a text suffix: not read
    return folder


def test_folder_becomes_one_record_per_file_with_relative_ids(tmp_path):
    src = build_source("documents", [f"path={make_docs(tmp_path / 'docs')}"])
    assert [src.record_id(i) for i in range(len(src))] == ["ch01/intro.txt", "ch02.md", "notes.rst"]
    rec = src.read(1)
    assert [(f.modality, f.role) for f in rec.fields] == [("text", "document")]
    assert rec.fields[0].data == LONG and rec.meta == {"file": "ch02.md", "bytes": len(LONG.encode())}
    rows = {r.input.split(" (")[0]: r.target for r in src.mapping()}
    assert rows == {"file contents": "text", "relative path": "id", "file name, bytes": "meta"}
    glob = build_source("documents", [f"path={tmp_path / 'docs'}/**/*.txt"])
    assert len(glob) == 1 and glob.record_id(0) == "intro.txt"


def test_preprocess_chunks_long_files_and_text_round_trips(tmp_path):
    docs = make_docs(tmp_path / "docs")
    (docs / "bad.txt").write_bytes(b"caf\xe9 latin-1\n")
    (docs / "empty.txt").write_text("  \n")
    manifest = preprocess(PreprocessConfig("documents", tmp_path / "out", tokenizers=["text=bytes"],
                                           options=[f"path={docs}", "max_tokens=512", "overlap=0"],
                                           max_rejected=0.5))
    samples = rows_to_samples(shards.read_folder(tmp_path / "out"))
    by_id = {s.id: s for s in samples}
    chunks = [by_id[f"ch02.md#{k}"] for k in range(manifest["chunks"])]
    assert len(chunks) == -(-len(LONG.encode()) // 510)  # 512 minus the two boundary tokens
    ids = np.concatenate([c.segments[0].ids[1:-1] for c in chunks])
    assert bytes(ids.astype(np.uint8)).decode() == LONG  # nothing lost, in order
    assert Bytes().decode(by_id["ch01/intro.txt"].segments[0]) == \
        "Intro.\n\nSecond paragraph, Kept As Written.\n"
    assert (manifest["records"], manifest["written"], manifest["rejected"]) == (5, 3, 2)
    assert manifest["chunked"] == 1 and manifest["truncated"] == 0
    reasons = [json.loads(line)["reason"] for line in
               (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert any("not utf-8 text: byte 3" in r for r in reasons) and any("empty document" in r for r in reasons)
    latin = build_source("documents", [f"path={docs / 'bad.txt'}", "encoding=latin-1"])
    assert latin.read(0).fields[0].data == "café latin-1\n"


def test_bad_options_name_the_flag(tmp_path):
    with pytest.raises(MMToolError, match=r"--opt path=.*: no \.txt/\.md/\.rst/\.text files in folder"):
        (tmp_path / "empty").mkdir()
        build_source("documents", [f"path={tmp_path / 'empty'}"])
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MMToolError, match="--opt encoding=nope: unknown encoding"):
        build_source("documents", [f"path={tmp_path / 'a.txt'}", "encoding=nope"])
    src = build_source("documents", [f"path={tmp_path / 'a.txt'}"])
    (tmp_path / "a.txt").unlink()
    with pytest.raises(RecordError, match="cannot read"):
        src.read(0)
