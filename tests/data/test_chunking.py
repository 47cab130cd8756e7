"""Long text is chunked, never silently cut: ids, splits, counts and the tokens of each chunk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtool.data import shards
from mmtool.data.chunking import split_options
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import rows_to_samples
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.data.tokenizers.text import Bytes, WordPiece, chunk_spans
from mmtool.errors import MMToolError

DOC = "\n\n".join(f"Paragraph {k}: The Quick brown fox number {k} jumps over the lazy dog; "
                  f"then it rests under tree {k * 7}." for k in range(40))  # ~900 wordpiece tokens
SHORT = "A short Note.\nIt fits."


def _jsonl(tmp_path, records):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(tmp_path, records, *opts, tokenizers=(), out="out"):
    path = _jsonl(tmp_path, records)
    manifest = preprocess(PreprocessConfig("jsonl", tmp_path / out, options=[f"path={path}", *opts],
                                           tokenizers=list(tokenizers)))
    samples = rows_to_samples(shards.read_folder(tmp_path / out))
    return manifest, {s.id: s for s in samples}


def test_chunk_spans_cover_the_document_in_order():
    assert chunk_spans(10, 4, 0, 64) == ([(0, 4), (4, 8), (8, 10)], False)
    assert chunk_spans(10, 4, 1, 64) == ([(0, 4), (3, 7), (6, 10)], False)
    assert chunk_spans(10, 4, 0, 2) == ([(0, 4), (4, 8)], True)
    assert chunk_spans(3, 4, 2, 64) == ([(0, 3)], False)


def test_long_document_becomes_chunks_whose_tokens_concatenate_to_the_document(tmp_path):
    manifest, samples = _run(tmp_path, [{"id": "doc", "text": DOC}, {"id": "note", "text": SHORT}],
                             "max_tokens=64")
    whole = WordPiece(max_tokens=10**6).encode(DOC, "document").ids[1:-1]  # the document's tokens
    chunks = [samples[f"doc#{k}"] for k in range(len(samples) - 1)]
    assert len(chunks) == -(-len(whole) // 62) and "note" in samples  # a short text keeps its id
    joined = np.concatenate([c.segments[0].ids[1:-1] for c in chunks])
    np.testing.assert_array_equal(joined, whole)
    assert all(c.segments[0].ids[0] == WordPiece.CLS and c.segments[0].n_tokens <= 64 for c in chunks)
    assert [c.meta["chunk"] for c in chunks] == list(range(len(chunks)))
    assert {c.meta["record"] for c in chunks} == {"doc"} and len({c.split for c in chunks}) == 1
    assert (manifest["records"], manifest["written"], manifest["rejected"]) == (2, 2, 0)
    assert (manifest["rows"], manifest["chunked"], manifest["chunks"], manifest["truncated"]) == \
        (len(chunks) + 1, 1, len(chunks), 0)
    assert manifest["chunking"]["max_tokens"] == 64


def test_overlap_repeats_the_tail_of_the_previous_chunk(tmp_path):
    _, samples = _run(tmp_path, [{"id": "doc", "text": DOC}], "max_tokens=40", "overlap=8")
    ids = [samples[f"doc#{k}"].segments[0].ids[1:-1] for k in range(len(samples))]
    for a, b in zip(ids, ids[1:]):
        np.testing.assert_array_equal(a[-8:], b[:8])
    whole = WordPiece(max_tokens=10**6).encode(DOC, "document").ids[1:-1]
    np.testing.assert_array_equal(np.concatenate([ids[0]] + [c[8:] for c in ids[1:]]), whole)


def test_bytes_chunks_decode_to_the_exact_text_case_and_newlines_kept(tmp_path):
    text = DOC + "\nÜnïcödé ✓ at the end"
    _, samples = _run(tmp_path, [{"id": "d", "text": text}], "max_tokens=100",
                      tokenizers=["text=bytes"])
    tok = Bytes()
    parts = [tok.decode(samples[f"d#{k}"].segments[0]) for k in range(len(samples))]
    assert "".join(parts) == text and len(parts) > 5
    assert all("\ufffd" not in p for p in parts)  # never cut inside a character


def test_cut_mode_caption_and_max_chunks_are_counted(tmp_path):
    image = str(SAMPLE_DATA / "jsonl" / "media" / "digit3.png")
    records = [{"id": "doc", "text": DOC}, {"id": "cap", "image": image, "text": DOC}]
    manifest, samples = _run(tmp_path, records, "max_tokens=64", "max_chunks=3", "allow_outside=true")
    assert sorted(samples) == ["cap", "doc#0", "doc#1", "doc#2"]  # a caption stays with its image
    assert samples["cap"].segments[1].n_tokens == 64
    assert (manifest["written"], manifest["rows"], manifest["truncated"]) == (2, 4, 2)
    manifest, samples = _run(tmp_path, records[:1], "long_text=cut", out="cut")
    assert list(samples) == ["doc"] and samples["doc"].segments[0].n_tokens == 512
    assert (manifest["rows"], manifest["chunked"], manifest["truncated"]) == (1, 0, 1)


def test_bad_chunking_options_name_the_flag(tmp_path):
    with pytest.raises(MMToolError, match="--opt max_tokens=4096: the wordpiece tokenizer holds at most 512"):
        _run(tmp_path, [{"text": DOC}], "max_tokens=4096")
    with pytest.raises(MMToolError, match="--opt overlap=62"):
        _run(tmp_path, [{"text": DOC}], "max_tokens=64", "overlap=62")
    with pytest.raises(MMToolError, match="--opt long_text=drop: expected one of chunk, cut"):
        split_options(["long_text=drop"])
    assert split_options(["path=x", "overlap=3"])[0] == ["path=x"]


def test_hf_text_blank_lines_are_skipped_and_counted_paragraphs_keep_newlines(tmp_path):
    (tmp_path / "notes.txt").write_text("First line.\n\nSecond line.\n   \nThird,\nstill third.\n")
    cache = f"cache_dir={tmp_path / 'cache'}"
    manifest = preprocess(PreprocessConfig("hf", tmp_path / "lines", options=[
        f"path={tmp_path / 'notes.txt'}", cache], tokenizers=["text=bytes"]))
    texts = [Bytes().decode(s.segments[0]) for s in rows_to_samples(shards.read_folder(tmp_path / "lines"))]
    assert texts == ["First line.", "Second line.", "Third,", "still third."]
    assert (manifest["records"], manifest["rejected"], manifest["skipped"]) == (4, 0, {"blank lines": 2})
    preprocess(PreprocessConfig("hf", tmp_path / "paras", tokenizers=["text=bytes"], options=[
        f"path={tmp_path / 'notes.txt'}", cache, "sample_by=paragraph"]))
    texts = [Bytes().decode(s.segments[0]) for s in rows_to_samples(shards.read_folder(tmp_path / "paras"))]
    assert "Third,\nstill third." in "".join(texts)
