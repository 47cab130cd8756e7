"""mmtool.folders: who owns an output folder (marker, claim, adoption, --overwrite) and who writes it
now (the flock, its message, takeover after a kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmtool import folders
from mmtool.errors import MMToolError
from tests.folder_state import changed, snapshot


def test_claim_marks_a_new_folder_and_keeps_the_marker(tmp_path):
    out = tmp_path / "a" / "b"
    claim = folders.claim(out, "preprocess", command="mmtool preprocess x")
    marker = json.loads((out / folders.MARKER).read_text())
    assert claim.created and not claim.adopted
    assert marker["kind"] == "preprocess" and marker["command"] == "mmtool preprocess x"
    assert marker["mmtool_version"] and marker["created"].endswith("+00:00")
    again = folders.claim(out, "preprocess", command="later")
    assert not again.created and json.loads((out / folders.MARKER).read_text()) == marker


@pytest.mark.parametrize("where", ["home", "root", "cwd", "tilde"])
def test_home_root_and_cwd_are_refused(tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    out = {"home": str(home), "root": "/", "cwd": ".", "tilde": "~"}[where]
    refusal = r"^--out .*: is (your home folder|the root folder|the current directory)"
    with pytest.raises(MMToolError, match=refusal):
        folders.claim(out, "run")
    assert not (home / folders.MARKER).exists() and not (tmp_path / folders.MARKER).exists()


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MMToolError, match="exists and is not a folder"):
        folders.claim(tmp_path / "f", "run")


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_non_empty_folder_is_refused_and_untouched(tmp_path, overwrite):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "shard-00000.arrow").write_bytes(b"not ours")
    (out / "manifest.json").write_text('{"name": "another tool"}')
    before = snapshot(out)
    found = r"mmtool did not make it \(found manifest.json, shard-00000.arrow\)"
    with pytest.raises(MMToolError, match=found):
        folders.writer(out, "preprocess", overwrite=overwrite).__enter__()
    assert changed(before, snapshot(out)) == []
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.arrow"]


def test_marker_of_another_kind_is_refused(tmp_path):
    folders.claim(tmp_path / "run", "run", command="mmtool train --out run")
    with pytest.raises(MMToolError, match=r"holds a training run \(made by `mmtool train --out run`\) "
                                          r"and is not a preprocessed dataset"):
        folders.claim(tmp_path / "run", "preprocess", overwrite=True)


def test_legacy_folders_are_adopted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": [], "plan": {}}))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "data": ["x"]}))
    assert folders.claim(data, "preprocess").adopted
    assert folders.claim(run, "run").adopted
    assert json.loads((run / folders.MARKER).read_text())["adopted"] is True
    legacy_run = tmp_path / "run2"
    (legacy_run / "checkpoints").mkdir(parents=True)
    (legacy_run / "config.json").write_text(json.dumps({"model": {}, "data": ["x"]}))
    with pytest.raises(MMToolError,
                       match="holds a training run .made before ownership markers. and is not an embedding"):
        folders.claim(legacy_run, "embed")


def test_overwrite_removes_only_what_mmtool_wrote(tmp_path):
    out = tmp_path / "d"
    folders.claim(out, "preprocess")
    (out / ".partial").mkdir()
    (out / ".partial" / "part-00000.arrow").write_bytes(b"p")
    for name in ("manifest.json", "rejected.jsonl", "shard-00000.arrow", "shard-00001.arrow",
                 ".manifest.json.abc123.tmp"):
        (out / name).write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "shard-final.arrow").write_text("mine too: not our pattern")
    claim = folders.claim(out, "preprocess", overwrite=True)
    assert sorted(os.listdir(out)) == [folders.MARKER, "notes.txt", "shard-final.arrow"]
    assert claim.foreign == ["notes.txt", "shard-final.arrow"]
    assert claim.removed == [".manifest.json.abc123.tmp", ".partial", "manifest.json", "rejected.jsonl",
                             "shard-00000.arrow", "shard-00001.arrow"]


def test_refused_writer_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(MMToolError, match="bad flag"):
        with folders.writer(out, "run"):
            raise MMToolError("bad flag")
    assert not out.exists()


HOLD = textwrap.dedent("""
    import sys, time
    from mmtool import folders
    with folders.writer(sys.argv[1], "run", command="holder-command"):
        print("locked", flush=True)
        time.sleep(120)
""")


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder_then_takes_over_after_kill_9(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(MMToolError) as err:
            with folders.lock(out):
                pass
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and "holder-command" in msg and "\n" not in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the flock; the file still names the dead holder, and is taken over
    assert json.loads((out / folders.LOCK).read_text())["pid"] == holder.pid
    with folders.lock(out, command="me"):
        doc = json.loads((out / folders.LOCK).read_text())
        assert doc["pid"] == os.getpid() and doc["command"] == "me"
    assert (out / folders.LOCK).read_text() == ""  # released: names no holder


def test_lock_is_reentrant_in_one_process(tmp_path):
    with folders.lock(tmp_path, command="outer"):
        with folders.lock(tmp_path, command="inner"):
            pass
        assert json.loads((tmp_path / folders.LOCK).read_text())["command"] == "outer"
    t0 = time.perf_counter()
    with folders.lock(tmp_path):  # free again
        pass
    assert time.perf_counter() - t0 < 5
