"""`--compile` through the real CLI: train and profile report their graphs; losses equal eager's.

The fast tests set MMTOOL_COMPILE_BACKEND=aot_eager: dynamo and AOTAutograd capture the very
graphs `--compile` builds (buckets, guards, recompiles, the backward) and run them eagerly, so a run takes seconds; the slow one
compiles with inductor.
"""

from __future__ import annotations

import json

import pytest

from mmtool.data.preprocess import PreprocessConfig, preprocess

EAGER_CAPTURE = {"MMTOOL_COMPILE_BACKEND": "aot_eager"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile-cli")
    preprocess(PreprocessConfig("digits", root / "digits", max_samples=24, tokenizers=["text=bytes"]))
    preprocess(PreprocessConfig("cartpole", root / "cartpole", options=["episodes=2", "max_steps=50"]))
    return root


def train(cli, data, out, *extra, env=None):
    proc = cli("train", "--data", data / "digits", "--data", data / "cartpole", "--out", out,
               "--model", "tiny", "--objectives", "next-token=1,masked-patch=1", "--batch-samples", "5",
               "--max-steps", "4", "--warmup", "1", "--num-workers", "0", "--device", "cpu", *extra, env=env)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return proc, lines


@pytest.mark.slow
def test_train_compile_reports_graphs_and_matches_eager(cli, data, tmp_path):
    _, eager = train(cli, data, tmp_path / "eager")
    proc, compiled = train(cli, data, tmp_path / "compiled", "--compile", env=EAGER_CAPTURE)
    assert "compile: torch.compile on the tied heads' loss (trunk blocks eager" in proc.stdout
    assert "graph(s); first step" in proc.stdout
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert "compile_graphs" not in a
    graphs = [line["compile_graphs"] for line in compiled]
    assert graphs == sorted(graphs) and 0 < graphs[0] and graphs[-1] <= 8
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True


def test_profile_compile_counts_graphs_in_warm_up(cli, data):
    proc = cli("profile", "--data", data / "digits", "--data", data / "cartpole", "--strategies", "packed",
               "--batch-samples", "5", "--steps", "2", "--model", "tiny", "--compile", env=EAGER_CAPTURE)
    assert "first model step (warm-up): packed" in proc.stdout
    assert "graphs compiled)" in proc.stdout


@pytest.mark.slow
def test_train_compile_with_inductor(cli, data, tmp_path):
    _, eager = train(cli, data, tmp_path / "eager")
    proc, compiled = train(cli, data, tmp_path / "compiled", "--compile")
    assert "graph(s); first step" in proc.stdout
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-5)  # same weights, fused kernels
    for a, b in zip(eager[1:], compiled[1:], strict=True):  # rounding differences, grown by AdamW steps
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert compiled[-1]["compile_graphs"] <= 8
