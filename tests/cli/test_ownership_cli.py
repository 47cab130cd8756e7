"""Folder ownership and one writer per folder, through the real CLI (issue 14, items 1 and 4).

Every refusal exits 2 with one line naming the folder and what was found, and leaves every byte of
the user's folder as it was (`tests.folder_state`). Overlap between two writers is made certain,
not hoped for: the first process is paused with SIGSTOP once it holds the lock, the second runs,
then the first is resumed (SIGCONT) and must finish as if alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmtool.data.preprocess import PreprocessConfig, preprocess
from tests.folder_state import changed, snapshot

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
TRAIN = ("--max-steps", "3", "--save-every", "3", "--batch-samples", "8", "--model.size", "tiny",
         "--device", "cpu", "--warmup", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 digits with byte-level captions: training steps stay fast."""
    folder = tmp_path_factory.mktemp("own") / "digits"
    preprocess(PreprocessConfig("digits", folder, max_samples=16, tokenizers=["text=bytes"]))
    return folder


def _one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmtool", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(check, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first:\n{proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def _holds_lock(out: Path, proc: subprocess.Popen):
    def check() -> bool:
        try:
            return json.loads((out / ".mmtool.lock").read_text() or "{}").get("pid") == proc.pid
        except (OSError, ValueError):
            return False
    return check


# -- ownership -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_preprocess_never_touches_a_foreign_folder(tmp_path, cli, overwrite):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "shard-00000.arrow").write_bytes(b"another tool's shard")
    (out / "manifest.json").write_text('{"tool": "someone else", "files": ["shard-00000.arrow"]}')
    before = snapshot(tmp_path)
    proc = cli("preprocess", "digits", "--out", out, "--max-samples", "8", *overwrite, check=False)
    _one_line_error(proc, f"--out {out}", "mmtool did not make it", "manifest.json", "shard-00000.arrow")
    assert changed(before, snapshot(tmp_path)) == []


def test_overwrite_keeps_foreign_files_in_an_owned_folder_and_says_so(tmp_path, cli):
    out = tmp_path / "d"
    cli("preprocess", "digits", "--out", out, "--max-samples", "8")
    (out / "notes.txt").write_text("my notes")
    proc = cli("preprocess", "digits", "--out", out, "--max-samples", "12", "--overwrite")
    assert "kept 1 file(s)" in proc.stdout and "notes.txt" in proc.stdout
    assert (out / "notes.txt").read_text() == "my notes"
    assert json.loads((out / "manifest.json").read_text())["records"] == 12
    assert json.loads((out / ".mmtool.json").read_text())["kind"] == "preprocess"


def test_a_folder_made_before_markers_is_adopted_not_refused(tmp_path, cli):
    out = tmp_path / "old"
    cli("preprocess", "digits", "--out", out, "--max-samples", "8")
    (out / ".mmtool.json").unlink()
    (out / ".mmtool.lock").unlink()  # as an earlier mmtool left it
    before = snapshot(out)
    proc = cli("preprocess", "digits", "--out", out, "--max-samples", "8")
    assert "up to date" in proc.stdout
    assert changed(before, snapshot(out)) == [".mmtool.json", ".mmtool.lock"]  # added, nothing else
    marker = json.loads((out / ".mmtool.json").read_text())
    assert marker["kind"] == "preprocess" and marker["adopted"] is True


@pytest.mark.parametrize("where", ["~", "HOME", "."])
def test_home_and_current_directory_are_refused(tmp_path, cli, where):
    home, cwd = tmp_path / "home", tmp_path / "work"
    for d in (home, cwd):
        d.mkdir()
        (d / "keep.txt").write_text("x")
    out = str(home) if where == "HOME" else where
    before = snapshot(tmp_path)
    proc = cli("preprocess", "digits", "--out", out, "--max-samples", "8", "--overwrite",
               cwd=cwd, env={"HOME": str(home)}, check=False)
    _one_line_error(proc, f"--out {out}: is ", "home folder" if where != "." else "current directory")
    assert changed(before, snapshot(tmp_path)) == []


def test_train_into_the_current_directory_is_refused(tmp_path, cli, data):
    (tmp_path / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    proc = cli("train", "--data", data, "--out", ".", *TRAIN, cwd=tmp_path, check=False)
    _one_line_error(proc, "--out .: is the current directory")
    assert changed(before, snapshot(tmp_path)) == []


def test_embed_into_a_folder_with_other_files_is_refused(tmp_path, cli, data):
    out = tmp_path / "vectors"
    out.mkdir()
    (out / "embeddings.npy").write_bytes(b"\x93NUMPY")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        proc = cli("embed", data, "--encoder", "minilm-l6", "--out", out, *extra, check=False)
        _one_line_error(proc, f"--out {out}", "embeddings.npy")
    assert changed(before, snapshot(tmp_path)) == []


def test_a_folder_of_another_kind_is_refused(tmp_path, cli, data):
    before = snapshot(data)
    proc = cli("train", "--data", data, "--out", data, *TRAIN, check=False)
    _one_line_error(proc, f"--out {data}: holds a preprocessed dataset", "not a training run")
    assert changed(before, snapshot(data)) == []


# -- one writer per folder -----------------------------------------------------------------------
def test_second_train_is_refused_and_the_first_completes(tmp_path, cli, data):
    run = tmp_path / "run"
    first = _start("train", "--data", data, "--out", run, *TRAIN, cwd=tmp_path)
    metrics = run / "metrics.jsonl"
    # Stop the first as soon as it holds the lock. (Waiting for its first metrics line raced: a
    # 3-step tiny run can finish, and release the lock, within one poll; CI once saw that.)
    _wait_for(_holds_lock(run, first), first)
    first.send_signal(signal.SIGSTOP)  # certain overlap: the first holds the lock
    try:
        before = snapshot(run)
        second = cli("train", "--data", data, "--out", run, *TRAIN, check=False)
        assert changed(before, snapshot(run)) == []
    finally:
        first.send_signal(signal.SIGCONT)
    _one_line_error(second, f"--out {run}: is being written by pid {first.pid}", "mmtool train")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000003"]


def test_two_preprocess_overwrite_one_is_refused_cleanly(tmp_path, cli):
    out = tmp_path / "d"
    cmd = ("preprocess", "digits", "--out", out, "--overwrite")
    first = _start(*cmd, cwd=tmp_path)
    _wait_for(_holds_lock(out, first), first)
    first.send_signal(signal.SIGSTOP)
    try:
        second = cli(*cmd, check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    _one_line_error(second, f"--out {out}: is being written by pid {first.pid}", "one writer per folder")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not (out / ".partial").exists()
    assert json.loads((out / "manifest.json").read_text())["records"] == 1797


def test_two_preprocess_overwrite_started_together(tmp_path):
    """No pausing: whichever interleaving the scheduler picks, each exits 0 or with the one-line lock
    refusal, never a traceback, and the folder ends complete with no `.partial`."""
    out = tmp_path / "d"
    procs = [_start("preprocess", "digits", "--out", out, "--overwrite", cwd=tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert any(rc == 0 for rc, _ in results)
    for rc, err in results:
        assert rc in (0, 2) and "Traceback" not in err, err
        if rc == 2:
            assert "is being written by pid" in err and len(err.strip().splitlines()) == 1
    assert not (out / ".partial").exists()
    assert json.loads((out / "manifest.json").read_text())["records"] == 1797


def test_a_lock_held_by_a_killed_process_is_taken_over(tmp_path, cli):
    out = tmp_path / "d"
    first = _start("preprocess", "digits", "--out", out, cwd=tmp_path)
    _wait_for(_holds_lock(out, first), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads((out / ".mmtool.lock").read_text())["pid"] == first.pid  # its note is left
    proc = cli("preprocess", "digits", "--out", out)
    assert proc.returncode == 0
    assert json.loads((out / "manifest.json").read_text())["records"] == 1797
    assert (out / ".mmtool.lock").read_text() == ""
