"""`mmtool preprocess --num-slices K --slice I` and `mmtool merge` through the real CLI: a slice
killed with SIGKILL resumes without touching the others, and the merge is still one run's bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# 64KB shards: 276 parts (69 a slice) and 65 shards, so a slice is still running when it is killed.
ARGS = ["preprocess", "pydocs", "--num-proc", "2", "--shard-size", "64KB"]


def state(folder: Path) -> dict[str, tuple[int, bytes]]:
    """{path: (mtime_ns, bytes)} of every file of a folder but its lock files."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.slow
def test_killed_slice_resumes_alone_and_the_merge_is_one_runs_bytes(tmp_path, cli):
    """Slices 0 and 1 in folders of their own; 3 and the killed 2 sharing one, so that "nothing
    else changed" covers a neighbour's parts in the very folder the killed slice resumes in."""
    dirs = {0: tmp_path / "s0", 1: tmp_path / "s1", 2: tmp_path / "s23", 3: tmp_path / "s23"}
    for i in (0, 1, 3):
        out = cli(*ARGS, "--num-slices", "4", "--slice", i, "--out", dirs[i]).stdout
        assert f"slice {i} of 4 done" in out and "= written" in out
    a3, b3 = json.loads((dirs[3] / "slice-00003-of-00004.json").read_text())["part_range"]
    mine3 = {"slice-00003-of-00004.json"} | {f".partial/part-{k:05d}.{ext}" for k in range(a3, b3)
                                             for ext in ("arrow", "json")}
    before = [state(dirs[0]), state(dirs[1]), {k: v for k, v in state(dirs[3]).items() if k in mine3}]
    assert len(before[2]) == 1 + 2 * (b3 - a3)

    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmtool", *ARGS, "--num-slices", "4", "--slice",
                             "2", "--out", str(dirs[2])], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    started = lambda: len(list((dirs[2] / ".partial").glob("part-*.json"))) - (b3 - a3)  # noqa: E731
    while time.time() < deadline and started() < 4:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= started() < 69 and not (dirs[2] / "slice-00002-of-00004.json").exists()  # killed mid-run

    folders = [dirs[0], dirs[1], dirs[2]]
    refused = cli("merge", tmp_path / "merged", *folders, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "slice 2 of 4 missing" in refused.stderr and "unfinished" in refused.stderr

    resumed = cli(*ARGS, "--num-slices", "4", "--slice", "2", "--out", dirs[2]).stdout
    assert "slice 2 of 4 resumed" in resumed
    after = [state(dirs[0]), state(dirs[1]), {k: v for k, v in state(dirs[3]).items() if k in mine3}]
    assert after == before  # the other slices' files: mtimes and bytes

    merged = cli("merge", tmp_path / "merged", *folders).stdout
    assert "merged 4 slice(s) from 3 folder(s)" in merged and "records 6,342 = written 6,342" in merged
    cli(*ARGS, "--out", tmp_path / "one")
    a = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    b = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and len(a["shards"]) == 65
    assert a == b  # the whole manifest: counts, mapping, tokenizers, plan, inputs
    for shard in b["shards"]:
        assert (tmp_path / "merged" / shard["path"]).read_bytes() == (tmp_path / "one" / shard["path"]).read_bytes()


def test_slice_flags_and_merge_errors_are_one_line(tmp_path, cli):
    for flags, words in ((["--num-slices", "0", "--slice", "0"], "--num-slices 0: must be at least 1"),
                         (["--num-slices", "4", "--slice", "4"], "--slice 4: must be in 0..3 (--num-slices 4)"),
                         (["--slice", "1"], "--slice 1: needs --num-slices")):
        proc = cli("preprocess", "pydocs", "--max-samples", "10", "--out", tmp_path / "x", *flags, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert words in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = cli("embed", tmp_path / "nowhere", "--encoder", "minilm-l6", "--out", tmp_path / "x",
               "--num-slices", "3", "--slice", "3", check=False)
    assert proc.returncode == 2 and "--slice 3: must be in 0..2 (--num-slices 3)" in proc.stderr
    cli("preprocess", "pydocs", "--max-samples", "40", "--shard-size", "4KB", "--num-slices", "2",
        "--slice", "0", "--out", tmp_path / "s0")
    proc = cli("merge", tmp_path / "m", tmp_path / "s0", check=False)
    assert proc.returncode == 2 and "slice 1 of 2 missing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    proc = cli("merge", tmp_path / "m", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'nowhere'}: no such folder" in proc.stderr


def test_slices_running_at_once_in_one_shared_out(tmp_path, cli):
    """Four slice processes write one --out at the same time (each holds only its own lock); the
    folder merged in place is one run's bytes."""
    args = ["preprocess", "pydocs", "--max-samples", "400", "--shard-size", "16KB"]
    shared = tmp_path / "shared"
    env = {**os.environ, "NO_COLOR": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "mmtool", *args, "--num-slices", "4", "--slice",
                               str(i), "--out", str(shared)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, results
    assert len(list(shared.glob("slice-*-of-00004.json"))) == 4
    cli("merge", shared, shared)
    cli(*args, "--out", tmp_path / "one")
    for name in ["manifest.json", "rejected.jsonl"] + [s["path"] for s in json.loads(
            (tmp_path / "one" / "manifest.json").read_text())["shards"]]:
        assert (shared / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not (shared / ".partial").exists() and not list(shared.glob("slice-*.json"))
