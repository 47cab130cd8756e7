"""`mmtool preprocess SOURCE --out DIR`: raw records → tokenized Arrow shards + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from mmtool.cli._render import preprocess_summary, run_preprocess
from mmtool.cli.app import app
from mmtool.data.preprocess import PreprocessConfig
from mmtool.errors import MMToolError


def parse_fraction(text: str, flag: str) -> float:
    """"1%" → 0.01, "0.05" → 0.05."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise MMToolError(f"{flag} {text!r}: expected a fraction such as 0.01 or a percentage such as 1%") from None


@app.command("preprocess")
def preprocess_cmd(
    source: str = typer.Argument(..., help="Registered source name (see `mmtool ls sources -v`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for shards and manifest.json."),
    opt: List[str] = typer.Option([], "--opt", help="Source option key=value (repeatable)."),
    split: str = typer.Option("all", help="all, train, validation or test."),
    max_samples: Optional[int] = typer.Option(None, help="Read at most N records of the split."),
    shard_size: str = typer.Option("64MB", help="Target shard size, e.g. 64MB, 512KiB."),
    num_proc: int = typer.Option(1, help="Worker processes; output is identical for any N."),
    overwrite: bool = typer.Option(False, help="Replace an existing dataset in --out."),
    on_error: str = typer.Option("skip", help="skip: log bad records to rejected.jsonl; raise: stop at the first."),
    max_rejected: str = typer.Option("1%", help="Fail when more records than this are rejected (0.01 or 1%)."),
    tokenizer: List[str] = typer.Option([], "--tokenizer", help="Override: MODALITY=NAME[:key=value,...] (repeatable)."),
) -> None:
    """Tokenize a dataset into Arrow stream shards with a manifest (resumable, parallel)."""
    cfg = PreprocessConfig(
        source=source, out=out, options=list(opt), split=split, max_samples=max_samples,
        shard_size=shard_size, num_proc=num_proc, overwrite=overwrite, on_error=on_error,
        max_rejected=parse_fraction(max_rejected, "--max-rejected"), tokenizers=list(tokenizer),
    )
    console = Console(highlight=False)
    manifest = run_preprocess(cfg, console)
    console.print(preprocess_summary(manifest, str(out)))
