"""`mmtool profile` through the real CLI: table, JSON, PNG, and one-line errors."""

from __future__ import annotations

import json

import pytest

from mmtool.data.preprocess import PreprocessConfig, preprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile-cli")
    preprocess(PreprocessConfig(source="digits", out=root / "digits", max_samples=60))
    preprocess(PreprocessConfig(source="cartpole", out=root / "cartpole", options=["episodes=3"]))
    return root


def test_profile_writes_table_json_and_png(data, tmp_path, cli):
    out_json, out_png = tmp_path / "out" / "profile.json", tmp_path / "out" / "profile.png"
    proc = cli("profile", "--data", data / "digits", "--data", f"{data / 'cartpole'}=2",
               "--batch-tokens", "2048", "--steps", "3", "--json", out_json, "--plot", out_png)
    for name in ("per-sample", "by-modality", "by-modality-sorted", "padded", "packed"):
        assert name in proc.stdout
    assert "n/a (no accelerator)" in proc.stdout or "measured on cuda" in proc.stdout
    result = json.loads(out_json.read_text())
    assert list(result["strategies"]) == ["per-sample", "by-modality", "by-modality-sorted", "padded", "packed"]
    assert result["config"]["batch_tokens"] == 2048 and result["config"]["steps"] == 3
    assert all(r["batches"] == 3 and r["samples_per_s"] > 0 for r in result["strategies"].values())
    assert "mixture: requested share of tokens vs realised" in proc.stdout  # the default --mix-by
    assert result["mixture"]["mix_by"] == "tokens"
    assert set(result["mixture"]["folders"]) == {"digits", "cartpole"}
    assert result["mixture"]["folders"]["cartpole"]["requested"] == pytest.approx(2 / 3)
    png = out_png.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert not list(out_json.parent.glob(".*.tmp"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("flags, message", [
    (["--strategies", "packed,pakced", "--batch-samples", "4"], "did you mean 'packed'"),
    (["--batch-samples", "4", "--plot", "chart.txt"], "--plot chart.txt: expected a file ending in .png"),
])
def test_bad_flags_give_one_line_and_exit_2(data, flags, message, cli):
    proc = cli("profile", "--data", data / "digits", *flags, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_help_shows_the_library_default_strategies(cli):
    from mmtool.analysis.profile import DEFAULT_STRATEGIES

    proc = cli("profile", "--help", env={"COLUMNS": "400"})
    assert f"[default: {','.join(DEFAULT_STRATEGIES)}]" in proc.stdout
