"""`mmtool inspect DIR` and `mmtool preprocess ... --dry-run`, through the real CLI."""

from __future__ import annotations

import json
import wave

from PIL import Image

from mmtool.data import shards
from mmtool.data.schema import rows_to_samples
from tests.conftest import SAMPLE_DATA

RECORDS = SAMPLE_DATA / "jsonl" / "records.jsonl"


def test_inspect_shows_mapping_decoded_text_png_and_wav(tmp_path, cli):
    data, view = tmp_path / "data", tmp_path / "view"
    cli("preprocess", "jsonl", "--opt", f"path={RECORDS}", "--out", data, "--tokenizer", "text=bytes")
    out = cli("inspect", data, "-n", "7", "--out", view).stdout
    samples = rows_to_samples(shards.read_folder(data))[:7]
    lines = [json.loads(x) for x in RECORDS.read_text().splitlines() if x.strip()][:7]
    assert "how the input is read" in out and "records 12 = written 12 + rejected 0" in out
    for sample, line in zip(samples, lines):
        assert sample.id in out
        if "text" in line:
            assert line["text"] in out  # bytes: the decoded text is the input text, case kept
    pngs = sorted(view.glob("*.png"))
    images = [(s, seg) for s in samples for seg in s.segments if seg.modality == "image"]
    assert len(pngs) == len(images) == 3
    for png, (sample, seg) in zip(pngs, images):
        rows, cols, dim = seg.shape
        assert sample.id in png.name.replace("_", "-")
        assert Image.open(png).size == (cols * 4, rows * 4)  # the stored image, decoded
    wavs = sorted(view.glob("*.wav"))
    assert len(wavs) == 2
    with wave.open(str(wavs[0])) as w:
        assert w.getframerate() == 16000 and w.getnframes() > 1000


def test_dry_run_writes_nothing_and_shows_chunks(tmp_path, cli):
    doc = " ".join(f"Sentence {k} of a Long document." for k in range(60))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "long", "text": doc}) + "\n" + json.dumps({"id": "bad"}) + "\n")
    out = tmp_path / "never"
    proc = cli("preprocess", "jsonl", "--opt", f"path={path}", "--opt", "max_tokens=100",
               "--tokenizer", "text=bytes", "--out", out, "--dry-run")
    assert not out.exists()
    text = proc.stdout
    assert "dry run" in text and "long#0" in text and "long#19" in text and "long#20" not in text
    assert "records 2 = written 1 + rejected 1" in text and "1 record(s) chunked" in text
    assert "d.jsonl:2: no known modality" in text.replace("\n", "")
    assert "Sentence 0 of a Long document." in text  # decoded from the bytes tokens, case kept


def test_inspect_errors_are_one_line(tmp_path, cli):
    proc = cli("inspect", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr
