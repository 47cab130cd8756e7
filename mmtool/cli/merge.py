"""`mmtool merge OUT SLICE_DIRS...`: the slices of one preprocess or embed job joined into one dataset."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console

from mmtool.cli._render import preprocess_summary, print_finished
from mmtool.cli.app import app
from mmtool.cli.preprocess import parse_fraction


@app.command("merge")
def merge_cmd(
    out: str = typer.Argument(..., help="Dataset folder to write (new, or one of the slice folders), "
                              "or a URL (s3://...): merged locally, then uploaded, manifest last."),
    slice_dirs: List[Path] = typer.Argument(..., help="Folders holding the finished slices "
                                            "(`mmtool preprocess --num-slices K --slice I --out DIR`)."),
    overwrite: bool = typer.Option(False, help="Replace a dataset of other settings in OUT (only "
                                   "files mmtool wrote there)."),
    max_rejected: str = typer.Option("0.01", help="Fail when more than this fraction of all the "
                                     "slices' records was rejected (also a percentage: 1%)."),
) -> None:
    """Join the slices of `mmtool preprocess` or `mmtool embed` `--num-slices K` into shards
    byte-identical to a one-machine run (refuses missing, duplicated, unfinished or mismatched slices)."""
    from mmtool.cli.embed import embed_summary
    from mmtool.data.merge import merge
    import mmtool.embed.job  # noqa: F401  (registers the "embed" slice kind)

    manifest = merge(out, list(slice_dirs), overwrite=overwrite,
                     max_rejected=parse_fraction(max_rejected, "--max-rejected"))
    console = Console(highlight=False)
    console.print(f"merged {manifest['slices']} slice(s) from {len(manifest['folders'])} folder(s) "
                  f"in {manifest['seconds']:.1f}s", soft_wrap=True)
    summary = embed_summary if "embedding" in manifest else preprocess_summary
    print_finished(console, {**manifest, "seconds": None}, str(out), summary)
