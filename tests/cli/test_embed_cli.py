"""`mmtool embed` through the real CLI (summary, cache hit, one-line errors) and the quickstart stage."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from mmtool.data.preprocess import PreprocessConfig, preprocess


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-cli")
    preprocess(PreprocessConfig(source="digits", out=root / "data" / "digits", max_samples=40))
    return root


def test_embed_summary_and_cache_hit(digits, tmp_path, cli):
    """The computing path runs in-process (and end to end in the quickstart test); the CLI rerun
    is a cache hit, which loads no model."""
    from mmtool.cli.embed import embed_summary
    from mmtool.embed import EmbedConfig, embed

    out = tmp_path / "emb"
    manifest = embed(EmbedConfig(data=digits / "data" / "digits", encoder="minilm-l6", out=out, batch_size=8))
    console = Console(record=True, width=200)
    console.print(embed_summary(manifest, str(out)))
    first = console.export_text()
    assert f"{out}: done" in first and "embedding:minilm-l6" in first and "pool mean" in first
    assert json.loads((out / "manifest.json").read_text())["rows"] == 40
    again = cli("embed", digits / "data" / "digits", "--encoder", "minilm-l6", "--out", out,
                "--batch-size", "8").stdout
    assert f"{out}: up to date (cache hit)" in again
    assert any(line.split()[:2] == ["embedding", "│"] and "40" in line for line in again.splitlines())


@pytest.mark.parametrize("flags, message", [
    (["--encoder", "minilm-l6", "--modality", "image"], "--encoder minilm-l6 serves text, not image"),
    (["--encoder", "hf:/no/such/folder"], "encoder hf:/no/such/folder: model folder /no/such/folder does not exist"),
    (["--encoder", "minilm-l6", "--pool", "max"], "--pool 'max': expected one of mean, tokens"),
])
def test_bad_input_is_one_line_and_exit_2(digits, tmp_path, cli, flags, message):
    proc = cli("embed", digits / "data" / "digits", "--out", tmp_path / "x", *flags, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_quickstart_embed_stage(digits):
    from mmtool.cli import quickstart
    from mmtool.cli.embed import quickstart_embed

    console = Console(record=True, width=200)
    manifest = quickstart_embed(digits, console)
    assert (digits / "embed" / "digits" / "manifest.json").is_file()
    assert manifest["embedding"]["encoder"] == "minilm-l6"
    assert "mmtool train --data" in console.export_text()
    assert quickstart_embed(digits, Console(file=open("/dev/null", "w")))["up_to_date"]
    import inspect

    assert "quickstart_embed(out, console)" in inspect.getsource(quickstart.quickstart)
