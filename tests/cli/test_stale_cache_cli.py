"""`mmtool preprocess` reruns through the real CLI: a changed input is rebuilt and named in one line,
a touched one is "up to date", and neither a rerun nor a refusal changes a byte of the user's files."""

from __future__ import annotations

import os
import shutil

from tests.folder_state import changed, snapshot
from mmtool.data import shards as store
from mmtool.data.schema import rows_to_samples
from mmtool.data.sources.base import SAMPLE_DATA


def _setup(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(SAMPLE_DATA / "jsonl", raw)
    return raw, raw / "records.jsonl", tmp_path / "out"


def _words(text: str) -> str:
    """The summary table's title wraps at its width: compare words."""
    return " ".join(text.split())


def _preprocess(cli, manifest, out, *extra, check=True):
    return cli("preprocess", "jsonl", "--opt", f"path={manifest}", "--out", out,
               "--tokenizer", "text=bytes", *extra, check=check)


def _texts(out) -> set[str]:
    """Every text segment of a folder (`bytes` ids 0..255; 256/257 are BOS/EOS)."""
    return {bytes(int(i) for i in seg.ids.ravel() if i < 256).decode()
            for s in rows_to_samples(store.read_folder(out)) for seg in s.segments
            if seg.modality == "text"}


def test_edited_input_is_rebuilt_with_one_line_naming_it(cli, tmp_path):
    raw, manifest, out = _setup(tmp_path)
    _preprocess(cli, manifest, out)
    manifest.write_text(manifest.read_text().replace("quick brown fox", "quick red fox"))
    before = snapshot(raw)
    proc = _preprocess(cli, manifest, out)
    notes = [ln for ln in proc.stdout.splitlines() if "inputs changed" in ln]
    assert notes == [f"{out}: inputs changed since it was made: 1 input file changed ({manifest}); "
                     "rebuilding every part"]
    assert "up to date" not in _words(proc.stdout)
    assert changed(before, snapshot(raw)) == []  # the raw data is read, never written
    assert "The quick red fox jumps over the lazy dog." in _texts(out)
    assert "up to date" in _words(_preprocess(cli, manifest, out).stdout)


def test_touched_input_is_up_to_date_with_and_without_rehash(cli, tmp_path):
    raw, manifest, out = _setup(tmp_path)
    _preprocess(cli, manifest, out)
    shards = snapshot(out, ignore=("manifest.json",))
    os.utime(raw / "media" / "two.wav", ns=(2_000_000_000, 2_000_000_000))
    before = snapshot(raw)
    for extra in ((), ("--rehash",)):
        proc = _preprocess(cli, manifest, out, *extra)
        assert "up to date" in _words(proc.stdout) and "inputs changed" not in proc.stdout
    assert changed(before, snapshot(raw)) == [] and changed(shards, snapshot(out, ("manifest.json",))) == []


def test_other_settings_are_refused_before_inputs_are_checked(cli, tmp_path):
    raw, manifest, out = _setup(tmp_path)
    _preprocess(cli, manifest, out)
    manifest.write_text(manifest.read_text().replace("quick brown fox", "quick red fox"))
    before = snapshot(tmp_path)
    proc = _preprocess(cli, manifest, out, "--max-samples", "5", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--out {out}: already holds a dataset made with other settings" in lines[0]
    assert changed(before, snapshot(tmp_path)) == []  # neither the raw data nor the folder changed
