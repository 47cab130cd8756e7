"""`mmtool export RUN --out DIR`: the run's checkpoint as a self-contained model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mmtool.cli.app import app


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="Training run folder (`mmtool train --out`); its data need not exist."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder: model.safetensors, config.json, README.md."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step to export (default: the newest)."),
) -> None:
    """Export a run as model.safetensors + config.json + a model card (Hugging Face folder layout);
    load it with `mmtool.load_pretrained(DIR)`."""
    from mmtool.train.export import export

    doc = export(run, out, step)
    console = Console(highlight=False)
    console.print(f"exported {run} (step {doc['training']['step']}, {doc['parameters']:,} parameters, "
                  f"streams {', '.join(s['key'] for s in doc['streams'])}) to {out}")
    console.print(f"  load it: model, tokenizers = mmtool.load_pretrained({str(out)!r})")
