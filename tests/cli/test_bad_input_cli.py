"""Bad input stays in its record, and reads stay inside the data: the real CLI in a subprocess.

Each case asserts the exit code, a one-line message naming the file/record, and — where a file
outside the data is involved — that its bytes never reach the shards and that nothing outside
`--out` changed (`tests/folder_state.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.folder_state import changed, snapshot

GOOD = [json.dumps({"id": f"g{i}", "text": f"good record number {i}"}) for i in range(40)]
BAD = {
    "deep": '{"id": "deep", "text": "x", "meta": ' + "[" * 5000 + "]" * 5000 + "}",
    "label": json.dumps({"id": "label", "text": "x", "label": 2**70}),
    "actions": json.dumps({"id": "actions", "actions": [2**70], "observations": [[0.5]]}),
    "surrogate-text": '{"id": "surrogate-text", "text": "lone \\ud800 here"}',
    "surrogate-id": '{"id": "\\udc00", "text": "lone id"}',
    "num-actions": json.dumps({"id": "num-actions", "actions": [0, 1], "observations": [[0.1], [0.2]],
                               "num_actions": 10**12}),
}
REASONS = {
    "deep": "nested too deeply", "label": "label must be an integer class index in [0, 2^63)",
    "actions": "int64 range", "surrogate-text": "text holds a lone surrogate U+D800",
    "surrogate-id": "id holds a lone surrogate U+DC00", "num-actions": "num_actions must be",
}
SECRET = np.array([1234.5, -987.25, 31337.125, 0.0625], np.float32)  # distinctive float32 bytes


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_each_bad_record_is_rejected_and_the_job_finishes(tmp_path, cli):
    lines = [GOOD[0], *[line for pair in zip(BAD.values(), GOOD[1:7]) for line in pair], *GOOD[7:]]
    data = write_jsonl(tmp_path / "data" / "d.jsonl", lines)  # 46 records: 3 parts, so 2 workers
    before = snapshot(tmp_path)
    cli("preprocess", "jsonl", "--opt", f"path={data}", "--out", tmp_path / "out",
        "--max-rejected", "100%", "--num-proc", "2")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["records"], manifest["rows"], manifest["rejected"]) == (46, 40, 6)
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    for (name, reason), rej, line_no in zip(REASONS.items(), rejected, range(2, 13, 2)):
        assert rej["location"] == f"{data}:{line_no}" and reason in rej["reason"], (name, rej)
    assert changed(before, snapshot(tmp_path, ignore=("out",))) == []


@pytest.mark.parametrize("name", list(BAD))
def test_on_error_raise_is_one_line_naming_the_record(tmp_path, cli, name):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], BAD[name], GOOD[1]])
    proc = cli("preprocess", "jsonl", "--opt", f"path={data}", "--out", tmp_path / "out",
               "--on-error", "raise", check=False)
    line = one_line(proc)
    assert f"{data}:2" in line and REASONS[name] in line


def _measured(args: list[str]) -> tuple[float, int]:
    """Runs `mmtool ARGS` under a fresh parent; returns (wall seconds, the child's peak RSS in MB)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run([sys.executable, '-m', 'mmtool', *sys.argv[1:]]).returncode; "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                         env={**os.environ, "NO_COLOR": "1"}, timeout=300).stdout.split()
    assert out[-1] == "0"
    return float(out[-3]), int(out[-2]) // 1024


def test_a_5mb_line_is_cut_before_tokenizing_in_bounded_time_and_memory(tmp_path):
    long_text = "tokenizers must not see this whole line " * 130_000  # 5.2 MB
    small = write_jsonl(tmp_path / "small.jsonl", GOOD[:6])
    big = write_jsonl(tmp_path / "big.jsonl", [*GOOD[:6], json.dumps({"id": "long", "text": long_text})])
    t_small, rss_small = _measured(["preprocess", "jsonl", "--opt", f"path={small}", "--out",
                                    str(tmp_path / "o1")])
    t_big, rss_big = _measured(["preprocess", "jsonl", "--opt", f"path={big}", "--out",
                                str(tmp_path / "o2")])
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    # chunked (64 chunks of 512 tokens at most, --opt max_chunks), the rest cut and counted
    assert manifest["rows"] == 6 + 64 and manifest["sources"]["jsonl"]["truncated"] == 1
    assert manifest["sources"]["jsonl"]["tokens"] - json.loads(
        (tmp_path / "o1" / "manifest.json").read_text())["sources"]["jsonl"]["tokens"] == 64 * 512
    # Before the bound: ~12 s and ~700 MB more for 5 MB in the wordpiece tokenizer.
    assert t_big - t_small < 4.0, (t_small, t_big)
    assert rss_big - rss_small < 200, (rss_small, rss_big)


def test_num_actions_option_is_bounded(tmp_path, cli):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    line = one_line(cli("preprocess", "jsonl", "--opt", f"path={data}", "--opt", "num_actions=1000000000000",
                        "--out", tmp_path / "out", check=False))
    assert "--opt num_actions=1000000000000" in line and "2^20" in line


# -- confined media paths --------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path):
    """data/ with one trajectory inside, secret/ beside it with one holding `SECRET` as rewards."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    (data / "ep").mkdir(parents=True)
    secret.mkdir()
    obs = np.zeros((4, 2), np.float32)
    np.savez(data / "ep" / "in.npz", observations=obs, actions=np.arange(4) % 2, rewards=np.ones(4))
    np.savez(secret / "out.npz", observations=obs, actions=np.arange(4) % 2, rewards=SECRET)
    os.symlink(secret / "out.npz", data / "ep" / "link.npz")
    return data, secret


def _shard_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.glob("shard-*.arrow")))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_media_outside_the_data_is_rejected_unless_allowed(tmp_path, cli, outside, how):
    data, secret = outside
    value = {"absolute": str(secret / "out.npz"), "dotdot": "../secret/out.npz",
             "symlink": "ep/link.npz"}[how]
    manifest = write_jsonl(data / "d.jsonl", [json.dumps({"id": "in", "trajectory": "ep/in.npz"}),
                                              json.dumps({"id": "out", "trajectory": value})])
    before = snapshot(tmp_path)
    cli("preprocess", "jsonl", "--opt", f"path={manifest}", "--out", tmp_path / "confined",
        "--max-rejected", "100%")
    m = json.loads((tmp_path / "confined" / "manifest.json").read_text())
    assert (m["rows"], m["rejected"]) == (1, 1)
    [rej] = [json.loads(x) for x in (tmp_path / "confined" / "rejected.jsonl").read_text().splitlines()]
    word = {"absolute": "absolute path", "dotdot": "'..'", "symlink": "symlink"}[how]
    assert rej["location"] == f"{manifest}:2" and repr(value) in rej["reason"] and word in rej["reason"]
    assert SECRET.tobytes() not in _shard_bytes(tmp_path / "confined")
    assert changed(before, snapshot(tmp_path, ignore=("confined",))) == []

    line = one_line(cli("preprocess", "jsonl", "--opt", f"path={manifest}", "--out", tmp_path / "raise",
                        "--on-error", "raise", check=False))
    assert f"{manifest}:2" in line and "outside the data root" in line

    cli("preprocess", "jsonl", "--opt", f"path={manifest}", "--opt", "allow_outside=true",
        "--out", tmp_path / "allowed")
    assert json.loads((tmp_path / "allowed" / "manifest.json").read_text())["rejected"] == 0
    assert SECRET.tobytes() in _shard_bytes(tmp_path / "allowed")  # the check above can fail


def test_media_root_widens_the_data_root(tmp_path, cli, outside):
    data, _ = outside
    manifest = write_jsonl(data / "d.jsonl", [json.dumps({"trajectory": "../secret/out.npz"})])
    cli("preprocess", "jsonl", "--opt", f"path={manifest}", "--opt", f"media_root={tmp_path}",
        "--out", tmp_path / "out")
    assert SECRET.tobytes() in _shard_bytes(tmp_path / "out")


# -- manifests that cannot mislead -----------------------------------------------------------------

@pytest.mark.parametrize("body,message", [
    ({"schema_version": 1, "shards": [{"path": "../../other/shard.arrow", "rows": 1, "bytes": 8,
                                       "sha256": "0" * 64}]}, "'..' climbs outside"),
    ({"schema_version": 1, "rows": 3}, "'shards' must be a list"),
    ([{"path": "shard-00000.arrow"}], "expected a JSON object, got list"),
])
def test_train_refuses_a_malformed_manifest_in_one_line(tmp_path, cli, body, message):
    folder = tmp_path / "data" / "d"
    folder.mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard.arrow").write_bytes(b"not yours")
    (folder / "manifest.json").write_text(json.dumps(body))
    before = snapshot(tmp_path)
    line = one_line(cli("train", "--data", folder, "--out", tmp_path / "run", "--max-steps", "1",
                        check=False))
    assert str(folder / "manifest.json") in line and message in line
    assert changed(before, snapshot(tmp_path, ignore=("run",))) == []
