"""benchmarks/peers.py on a tiny mixture, with the peers this Python has (the others are skipped).

The run is real: the built-in sources preprocessed, mmtool's loaders and every installed peer's
own writer and reader, in a subprocess. The checks are on the values of its JSON report.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from peer_loaders import PEERS, Stream, in_form, pad_collate, tokens_of  # noqa: E402

SAMPLES = 150


def run_peers(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "benchmarks/peers.py", "--samples", str(SAMPLES), "--batch", "16",
                           "--cartpole-episodes", "8", "--pydocs-modules", "json", "--repeats", "2",
                           "--workdir", str(tmp / "work"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("peers")
    proc = run_peers(tmp, "--workers", "0", "--json", str(tmp / "peers.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp / "peers.json").read_text()), proc.stdout


def import_error(module: str) -> str | None:
    """Why `module` does not import in this Python (as `Type: message`), or None."""
    try:
        importlib.import_module(module)
    except Exception as e:  # ModuleNotFoundError, or a dependency failing at import
        return f"{type(e).__name__}: {e}"
    return None


def test_every_loader_that_ran_read_each_draw_once_and_every_token(report):
    rep, _ = report
    setup, rows = rep["setup"], rep["rows"]
    assert setup["samples"] == SAMPLES and 0 < setup["unique_samples"] <= SAMPLES
    assert setup["tokens"] > SAMPLES  # documents alone hold hundreds of tokens each
    ran = [r for r in rows if r["status"] == "ran"]
    assert {r["loader"] for r in ran} >= {"mmtool-padded", "mmtool-packed", "collate-only"}
    for r in ran:
        assert r["written"] == r["samples_read"] == SAMPLES, r
        assert r["each_draw_once"], r
        assert r["tokens_read"] == setup["tokens"], r
        lo, hi = r["samples_per_s_range"]
        assert 0 < lo <= r["samples_per_s"] <= hi, r
        lo, hi = r["tokens_per_s_range"]
        assert 0 < lo <= r["tokens_per_s"] <= hi, r
        assert r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(setup["tokens"] / SAMPLES, rel=0.5)
        assert r["repeats"] == 2 and r["workers"] == 0


def test_missing_peers_are_skipped_with_their_import_error(report):
    rep, out = report
    by_name = {r["loader"]: r for r in rep["rows"]}
    assert set(by_name) == {"mmtool-padded", "mmtool-packed", "collate-only", *PEERS}
    for name, peer in PEERS.items():
        row = by_name[name]
        why = import_error(peer.module)
        if why is None:
            assert row["status"] in ("ran", "failed"), row
        else:
            assert row["status"] == "skipped" and row["reason"] == why, row
            assert any(line.startswith(f"| {name}") and line.endswith(f"| skipped | | | {why} |")
                       for line in out.splitlines()), out
    assert sum(line.startswith("|") for line in out.splitlines()) == 2 + len(rep["rows"])  # header, rule, rows


def test_only_and_an_unknown_loader(tmp_path):
    proc = run_peers(tmp_path, "--only", "mmtool-packed,nope", "--repeats", "1")
    assert proc.returncode != 0 and "--only nope: unknown" in proc.stderr


STREAMS = {"text": Stream("text", "int32", None), "audio": Stream("audio", "float32", 3)}


def test_pad_collate_pads_masks_and_treats_empty_as_absent():
    a = {"draw": 0, "label": 7, "text": np.array([5, 6, 7], np.int32)}
    b = {"draw": 1, "label": -1, "audio": np.ones((2, 3), np.float32), "text": np.array([9], np.int32)}
    c = in_form({"draw": 2, "label": 1, "audio": np.full((1, 3), 2.0, np.float32)}, STREAMS, "fixed")
    assert c["text"].shape == (0,)
    out = pad_collate([a, b, c])
    assert out["draw"].tolist() == [0, 1, 2] and out["label"].tolist() == [7, -1, 1]
    assert out["text"].tolist() == [[5, 6, 7], [9, 0, 0], [0, 0, 0]]
    assert out["text.mask"].sum(1).tolist() == [3, 1, 0]
    assert out["audio"].shape == (3, 2, 3) and out["audio.mask"].sum(1).tolist() == [0, 2, 1]
    assert torch.equal(out["audio"][2, 0], torch.full((3,), 2.0)) and out["audio"][0].abs().sum() == 0
    assert sum(int(v.sum()) for k, v in out.items() if k.endswith(".mask")) == sum(
        tokens_of(s, STREAMS) for s in (a, b, c)) == 7


def test_a_reader_that_repeats_or_loses_a_sample_is_reported():
    import peers  # benchmarks/peers.py

    samples = [{"draw": d, "label": 0, "text": np.arange(d + 1, dtype=np.int32)} for d in range(6)]
    tokens = sum(tokens_of(s, STREAMS) for s in samples)  # 21
    good = peers.one_pass(lambda: (pad_collate(samples[i:i + 2]) for i in range(0, 6, 2)), peers.peer_count, 6, 60)
    assert good["each_draw_once"] and (good["samples"], good["tokens"]) == (6, tokens)
    twice = peers.one_pass(lambda: (pad_collate(s) for s in (samples[:2], samples[:2], samples[2:4])),
                           peers.peer_count, 6, 60)
    assert not twice["each_draw_once"] and twice["samples"] == 6  # six read, but draw 0 twice, 4 never
    row = peers.summarize("x", "heterogeneous", 0, [twice], 6, tokens, [], None)
    assert row["status"] == "ran" and any("not each draw once" in b for b in row["broke"])
    assert any(f"read {twice['tokens']:,} tokens for {tokens:,} written" in b for b in row["broke"])
    failed = peers.summarize("x", "fixed", 2, [{"error": "read: OSError: gone"}], 6, tokens, ["write heterogeneous: E"], None)
    assert failed["status"] == "failed" and failed["broke"] == ["write heterogeneous: E", "read: OSError: gone"]
