"""`mmtool embed DATA --encoder NAME --out DIR`: frozen-encoder embeddings of a preprocessed folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.console import Group
from rich.table import Table
from rich.text import Text

from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.cli._render import human_bytes, slice_summary, print_finished
from mmtool.cli.app import app
from mmtool.config import build_config


def run_embed(cfg, console: Console) -> dict[str, Any]:
    """Runs `mmtool.embed.embed(cfg)` under a progress bar; cache messages are printed."""
    from mmtool.embed import embed

    with Progress(TextColumn(f"[bold]embed {cfg.encoder}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("rows"), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("embed", total=None)
        return embed(cfg, progress=lambda n: bar.advance(task, n),
                     on_start=lambda total: bar.update(task, total=total),
                     notify=lambda msg: console.print(msg, style="yellow", markup=False,
                                                      soft_wrap=True))


def embed_summary(manifest: dict[str, Any], out: str) -> Group:
    """Encoder, cache state, rows and vectors per modality, bytes and speed."""
    block = manifest["embedding"]
    status = "up to date (cache hit)" if manifest.get("up_to_date") else (
        f"resumed ({manifest['resumed_parts']} parts reused)" if manifest.get("resumed_parts") else "done")
    seconds = manifest.get("seconds") or 0.0
    rate = f", {manifest['rows'] / seconds:,.0f} rows/s" if seconds and not manifest.get("up_to_date") else ""
    table = Table(show_edge=False)
    for col in ("modality", "rows", "segments", "tokens"):
        table.add_column(col, justify="left" if col == "modality" else "right")
    for name, c in manifest["modalities"].items():
        style = "[bold]" if name == "embedding" else ""
        table.add_row(f"{style}{name}", f"{c['rows']:,}", f"{c['segments']:,}", f"{c['tokens']:,}")
    what = block["modality"] or "whole samples"
    caption = (f"encoder {block['encoder']} ({block['dim']}-d, weights sha256 "
                     f"{block['weights_sha256'][:12]}) · {what} → stream embedding:{block['slug']} "
                     f"· pool {block['pool']}{' · originals kept' if block['keep_original'] else ''} · "
                     f"source {block['source']['path']} ({block['source']['rows']:,} rows) · "
                     f"{len(manifest['shards'])} shard(s), {human_bytes(sum(s['bytes'] for s in manifest['shards']))}")
    return Group(Text(f"{out}: {status}{rate}", style="bold"), table, Text(caption))


EMBED_FLAGS = ConfigFlags("mmtool.embed:EmbedConfig", positional=("data",),
                         aliases={"encoder": ("-e",), "out": ("-o",)})
"""`mmtool embed`'s flags: every `EmbedConfig` field."""


@app.command("embed", cls=config_command(EMBED_FLAGS))
def embed_cmd(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Preprocessed folder to embed."),
) -> None:
    """Embed a modality of a preprocessed folder with a frozen encoder (cached, resumable)."""
    from mmtool.embed import EmbedConfig

    cfg = build_config(EmbedConfig, flags={"data": data, **given_flags(ctx)})
    console = Console(highlight=False)
    manifest = run_embed(cfg, console)
    if cfg.num_slices is not None:
        console.print(slice_summary(manifest, str(cfg.out)), soft_wrap=True)
        return
    print_finished(console, manifest, str(cfg.out), embed_summary)


QUICKSTART_ENCODER = "minilm-l6"
"""Encoder of the quickstart's embed stage."""


def quickstart_embed(out: Path, console: Console) -> dict[str, Any]:
    """quickstart stage: embed the `digits` captions with minilm-l6 into `out/embed/digits`."""
    from mmtool.embed import EmbedConfig

    cfg = EmbedConfig(data=out / "data" / "digits", encoder=QUICKSTART_ENCODER,
                      out=out / "embed" / "digits", modality="text")
    manifest = run_embed(cfg, console)
    console.print(embed_summary(manifest, str(cfg.out)))
    console.print(f"train on it: [bold]mmtool train --data {cfg.out} --objectives "
                  "masked-patch=1,contrastive=1[/] (stream embedding:minilm-l6)")
    return manifest
