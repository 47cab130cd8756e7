"""Preprocess caches keyed by content: edited inputs rebuild, touched ones do not, resume never mixes.

Every test copies `sample_data/jsonl` (or writes a tiny dataset) to a temporary folder and edits it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmtool.data import shards as store
from mmtool.data.inputs import changed_inputs, file_table, part_key
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import rows_to_samples
from mmtool.data.sources.base import SAMPLE_DATA, build_source


@pytest.fixture
def raw(tmp_path):
    """A private copy of the sample JSONL manifest and its media."""
    shutil.copytree(SAMPLE_DATA / "jsonl", tmp_path / "raw")
    return tmp_path / "raw"


def _job(manifest: Path, out: Path, **kw) -> tuple[dict, list[str]]:
    notes: list[str] = []
    m = preprocess(PreprocessConfig(source="jsonl", options=[f"path={manifest}"], out=out, **kw),
                   notify=notes.append)
    return m, notes


def _texts(out: Path) -> dict[str, str]:
    table = store.read_folder(out)
    # `bytes` tokenizer: ids 0..255 are UTF-8 bytes, 256/257 are BOS/EOS
    return {s.id: bytes(int(i) for i in seg.ids.ravel() if i < 256).decode()
            for s in rows_to_samples(table) for seg in s.segments if seg.modality == "text"}


def _shard_bytes(out: Path) -> list[bytes]:
    return [(out / s["path"]).read_bytes() for s in store.load_manifest(out)["shards"]]


def _edit_line(manifest: Path, line: int, old: str, new: str) -> None:
    lines = manifest.read_text().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new)
    manifest.write_text("".join(lines))


def test_jsonl_record_key_is_the_line_and_the_media_it_names(raw):
    src = build_source("jsonl", [f"path={raw / 'records.jsonl'}"])
    line3 = (raw / "records.jsonl").read_text().splitlines(keepends=True)[2]
    assert src.record_key(2) == b"3\0" + line3.encode()
    assert src.record_files(2) == [raw / "media" / "digit3.png"]
    files = {str(p) for p in src.input_files()}
    assert str(raw / "records.jsonl") in files and str(raw / "episodes" / "ep0.npz") in files
    table = file_table(src.input_files())
    before = part_key(src, [0, 1, 2], table)
    (raw / "media" / "digit3.png").write_bytes((raw / "media" / "digit5.png").read_bytes())
    after = file_table(src.input_files(), table)
    assert changed_inputs(table, after) == [str(raw / "media" / "digit3.png")]
    assert part_key(src, [0, 1, 2], after) != before  # record 2 reads the image
    assert part_key(src, [0, 1], after) == part_key(src, [0, 1], table)  # records 0, 1 do not


def test_edited_line_rebuilds_and_the_shard_holds_the_new_text(raw, tmp_path):
    out = tmp_path / "out"
    _job(raw / "records.jsonl", out, tokenizers=["text=bytes"])
    assert _texts(out)["cap-3"] == "a red handwritten digit three"
    _edit_line(raw / "records.jsonl", 3, "a red handwritten", "a crimson handwritten")
    m, notes = _job(raw / "records.jsonl", out, tokenizers=["text=bytes"])
    assert not m["up_to_date"]
    assert notes == [f"{out}: inputs changed since it was made: 1 input file changed "
                     f"({raw / 'records.jsonl'}); rebuilding every part"]
    assert _texts(out)["cap-3"] == "a crimson handwritten digit three"
    m, notes = _job(raw / "records.jsonl", out, tokenizers=["text=bytes"])
    assert m["up_to_date"] and notes == []


def test_touched_input_is_up_to_date_and_its_mtime_is_recorded(raw, tmp_path):
    out = tmp_path / "out"
    first, _ = _job(raw / "records.jsonl", out)
    shards = _shard_bytes(out)
    image = raw / "media" / "digit8.png"
    os.utime(image, ns=(1_000_000_000, 1_000_000_000))
    m, notes = _job(raw / "records.jsonl", out)
    assert m["up_to_date"] and notes == [] and _shard_bytes(out) == shards
    entry = store.load_manifest(out)["inputs"]["files"][str(image)]
    assert entry["mtime_ns"] == 1_000_000_000
    assert entry["sha256"] == first["inputs"]["files"][str(image)]["sha256"]


def _bmp(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format="BMP")


def _image_of(out: Path, sample_id: str) -> np.ndarray:
    sample = next(s for s in rows_to_samples(store.read_folder(out)) if s.id == sample_id)
    return next(seg.values for seg in sample.segments if seg.modality == "image")


def test_same_size_replacement_with_mtime_restored_needs_rehash(raw, tmp_path):
    """The fast path trusts size+mtime_ns (like make and rsync); --rehash hashes every input."""
    image = raw / "media" / "digit3.png"
    _bmp(image, 10)
    out = tmp_path / "out"
    _job(raw / "records.jsonl", out)
    shards, dark = _shard_bytes(out), _image_of(out, "cap-3")
    st = image.stat()
    _bmp(image, 200)
    assert image.stat().st_size == st.st_size
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    m, _ = _job(raw / "records.jsonl", out)
    assert m["up_to_date"] and _shard_bytes(out) == shards  # the documented blind spot
    m, notes = _job(raw / "records.jsonl", out, rehash=True)
    assert not m["up_to_date"] and str(image) in notes[0]
    assert _shard_bytes(out) != shards
    bright = _image_of(out, "cap-3")  # uniform images: one value each, the new one brighter
    assert len(set(dark.tolist())) == 1 and len(set(bright.tolist())) == 1 and bright[0] > dark[0]


class _Interrupt(Exception):
    pass


def _many(raw: Path, n: int = 48) -> Path:
    """n records, every sixth with an image: three parts of 16 at a tiny shard size."""
    lines = [json.dumps({"id": f"r{i}", "image": f"media/digit{3 + i % 3}.png", "text": f"image {i}"}
                        if i % 6 == 0 else {"id": f"r{i}", "text": f"document number {i}"})
             for i in range(n)]
    lines = [ln.replace("digit4", "digit8") for ln in lines]
    path = raw / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resume_after_edit_redoes_only_the_edited_part(raw, tmp_path):
    manifest, out = _many(raw), tmp_path / "out"
    kw = dict(shard_size="1KB", tokenizers=["text=bytes"])
    calls = []

    def stop_in_third_part(n):
        calls.append(n)
        if len(calls) == 3:
            raise _Interrupt  # parts 0 and 1 are finished, part 2 is not

    with pytest.raises(_Interrupt):
        preprocess(PreprocessConfig(source="jsonl", options=[f"path={manifest}"], out=out, **kw),
                   progress=stop_in_third_part)
    assert sorted(p.name for p in (out / ".partial").glob("part-*.json")) == \
        ["part-00000.json", "part-00001.json"]
    _edit_line(manifest, 3, "document number 2", "document number two")  # record 2: part 0
    m, notes = _job(manifest, out, num_proc=2, **kw)  # workers: the same keys, the same bytes
    assert notes == [f"{out}: resuming an unfinished run whose inputs changed: 1 input file changed "
                     f"({manifest})",
                     "1 of 2 finished parts read changed inputs; redoing them (1 kept)"]
    assert m["resumed_parts"] == 1 and len(m["shards"]) >= 3
    assert _texts(out)["r2"] == "document number two"
    fresh, _ = _job(manifest, tmp_path / "fresh", **kw)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "fresh")


def test_hf_dataset_fingerprint_change_invalidates(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "caps.jsonl"
    data.write_text("".join(json.dumps({"text": f"caption {i}"}) + "\n" for i in range(6)))
    opts = [f"path=json", f"data_files={data}", f"cache_dir={tmp_path / 'hf-cache'}"]
    out = tmp_path / "out"
    cfg = dict(source="hf", options=opts, out=out, tokenizers=["text=bytes"])
    first = preprocess(PreprocessConfig(**cfg))
    assert first["inputs"]["version"].startswith("hf:") and str(data) in first["inputs"]["files"]
    assert preprocess(PreprocessConfig(**cfg))["up_to_date"]
    data.write_text(data.read_text().replace("caption 4", "caption four"))
    notes: list[str] = []
    m = preprocess(PreprocessConfig(**cfg), notify=notes.append)
    assert not m["up_to_date"]
    assert m["inputs"]["version"] != first["inputs"]["version"]  # the dataset's own _fingerprint
    assert "source data version hf:" in notes[0] and str(data) in notes[0]
    assert "caption four" in _texts(out).values()


def test_embed_cache_follows_source_content_not_raw_mtimes(raw, tmp_path):
    """A touched raw file rewrites the source manifest's mtimes, not its content: still a cache
    hit. An edited one rebuilds the source, and the embedding is recomputed with a note naming it."""
    from mmtool.embed import EmbedConfig, embed

    src, emb = tmp_path / "src", tmp_path / "emb"
    _job(raw / "records.jsonl", src, max_samples=3)
    cfg = EmbedConfig(data=src, encoder="minilm-l6", out=emb)
    first = embed(cfg)
    os.utime(raw / "records.jsonl", ns=(3_000_000_000, 3_000_000_000))
    assert _job(raw / "records.jsonl", src, max_samples=3)[0]["up_to_date"]
    assert store.load_manifest(src)["inputs"]["files"][str(raw / "records.jsonl")]["mtime_ns"] \
        == 3_000_000_000  # the manifest was rewritten
    notes: list[str] = []
    assert embed(cfg, notify=notes.append)["up_to_date"] and notes == []
    _edit_line(raw / "records.jsonl", 2, "quick brown fox", "quick red fox")
    _job(raw / "records.jsonl", src, max_samples=3)
    m = embed(cfg, notify=notes.append)
    assert not m["up_to_date"]
    assert len(notes) == 1 and notes[0].startswith(f"cache in {emb} is stale: source ")
    assert "changed (content sha256" in notes[0]
    assert m["embedding"]["source"]["content_sha256"] != first["embedding"]["source"]["content_sha256"]
