"""`mmtool ls [KIND]`: every registry and its entries, generated from the registries themselves."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmtool.cli.app import app
from mmtool.errors import MMToolError
from mmtool.registry import all_registries


@app.command("ls")
def ls(
    kind: Optional[str] = typer.Argument(None, help="Registry to list (e.g. sources, tokenizers); all when omitted."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list each entry's options."),
) -> None:
    """List registered sources, tokenizers and other swappable parts."""
    registries = all_registries()
    if kind is not None and kind not in registries:
        raise MMToolError(f"unknown registry {kind!r} (known: {', '.join(registries)})")
    console = Console(highlight=False)
    for name, reg in registries.items():
        if kind is not None and name != kind:
            continue
        table = Table(title=escape(f"{name} — {reg.description}"), title_justify="left", show_edge=False)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description")
        for entry in reg.names():
            desc = reg.describe(entry)
            if verbose:
                desc += _options_text(reg.get(entry))
            table.add_row(entry, escape(desc))
        console.print(table)
        console.print()


def _options_text(obj: object) -> str:
    """The `--opt` options of a source class, one per line (empty for other entries)."""
    from mmtool.data.sources.base import Source, option_help

    if not (isinstance(obj, type) and issubclass(obj, Source)):
        return ""
    rows = option_help(obj)
    return "".join(f"\n  --opt {n}={d}  {h}" for n, d, h in rows)
