"""Files mmtool reads, malformed: each is a one-line error (exit 2) naming the file, never a
traceback, and nothing the user owns changes."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli
from tests.folder_state import changed, snapshot


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    run_cli("preprocess", "digits", "--out", root / "d", "--max-samples", "40")
    run_cli("train", "--data", root / "d", "--out", root / "run", "--model", "tiny", "--max-steps", "2",
            "--batch-tokens", "1024", "--num-workers", "0")
    empty = root / "empty"  # a folder whose manifest lists no shard (every record rejected)
    shutil.copytree(root / "d", empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (empty / shard["path"]).unlink()
    manifest.update(shards=[], rows=0)
    (empty / "manifest.json").write_text(json.dumps(manifest))
    return root


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


TRAIN = ["--model", "tiny", "--max-steps", "1", "--batch-tokens", "1024", "--num-workers", "0"]


@pytest.mark.parametrize("yaml_text, needles", [
    ("datasets:\n  - path: 123\n", ["datasets[0] path must be a folder path (text), got 123"]),
    ("datasets:\n  - path: d\n    weigth: 2\n", ["unknown key weigth", "keys: path, weight"]),
    ("datasets:\n  - path: d\nmix-by: tokens\n", ["unknown key mix-by", "keys: datasets, mix_by"]),
    ("datasets: 5\n", ["expected a 'datasets:' list"]),
    ("datasets: [\n", ["not valid YAML"]),
])
def test_mixture_yaml(work, tmp_path, yaml_text, needles):
    mix = work / f"mix-{abs(hash(yaml_text))}.yaml"
    mix.write_text(yaml_text)
    before = snapshot(work)
    proc = run_cli("train", "--data", mix, "--out", tmp_path / "r", *TRAIN, check=False)
    one_line_error(proc, str(mix.name), *needles)
    assert changed(before, snapshot(work)) == [] and not (tmp_path / "r").exists()


def test_zero_row_folder_in_train_and_profile(work, tmp_path):
    for args in (["train", "--data", work / "empty", "--out", tmp_path / "r", *TRAIN],
                 ["profile", "--data", work / "empty", "--batch-tokens", "1024", "--json", tmp_path / "p.json"]):
        one_line_error(run_cli(*args, check=False), "empty: holds no samples")


@pytest.mark.parametrize("flags, needle", [
    (["--model.objectives", "next-token=0"], "every weight is 0, so the loss is identically 0"),
    (["--model.objectives", "next-token=-1"], "weight must be a finite number ≥ 0"),
    (["--device", "tpu"], "--device 'tpu': not a device mmtool trains on"),
])
def test_flags_that_would_train_nothing_or_nowhere(work, tmp_path, flags, needle):
    proc = run_cli("train", "--data", work / "d", "--out", tmp_path / "r", *TRAIN, *flags, check=False)
    one_line_error(proc, needle)


@pytest.mark.parametrize("content", ['{"data": ["d"], "model": {"size": ',
                                     pytest.param("[1, 2]", marks=pytest.mark.slow), None])
def test_broken_config_json_in_every_reader(work, tmp_path, content):
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    if content is None:
        (run / "config.json").unlink()
    else:
        (run / "config.json").write_text(content)
    before = snapshot(run)
    for args in (["export", run, "--out", tmp_path / "exp"],
                 ["eval-transfer", run, "--task", "digits", "--protocol", "linear-probe", "--out", tmp_path / "ev"],
                 ["train", "--data", work / "d", "--out", run, *TRAIN, "--resume"]):
        proc = run_cli(*args, check=False)
        one_line_error(proc, str(run))
        assert "config.json" in proc.stderr
    assert changed(before, snapshot(run)) == []


@pytest.mark.parametrize("size", [10**12, -1, "big"])
def test_absurd_vocabulary_in_a_manifest_is_refused_before_allocating(work, tmp_path, size):
    bad = tmp_path / "d"
    shutil.copytree(work / "d", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    key = next(k for k, c in manifest["tokenizers"].items() if "vocab_size" in c)
    manifest["tokenizers"][key]["vocab_size"] = size
    (bad / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("train", "--data", bad, "--out", tmp_path / "r", *TRAIN, check=False)
    one_line_error(proc, "manifest.json", "vocab_size", "is not an integer in [1, 16777216]")
