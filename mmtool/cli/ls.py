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
    """The options of a source (`--opt`) or tokenizer (`--tokenizer`) class, one per line (empty for
    other entries)."""
    from mmtool.data.sources.base import Source, option_help
    from mmtool.data.tokenizers.base import Tokenizer

    if isinstance(obj, type) and issubclass(obj, Source):
        return "".join(f"\n  --opt {n}={d}  {h}" for n, d, h in option_help(obj))
    if isinstance(obj, type) and issubclass(obj, Tokenizer):
        flag = f"--tokenizer {obj.modality}={obj.registry_name}:"
        return "".join(f"\n  {flag}{n}={d}  {h}" for n, d, h in tokenizer_option_help(obj))
    return ""


def tokenizer_option_help(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each keyword option of a tokenizer class, for `mmtool ls -v`.

    Names and defaults come from the constructor's signature, help from the class docstring's
    Google-style `Args:` section (an entry may name several options: `fmin, fmax: ...`), so the
    listing cannot drift from the code. Defaults are written as `--tokenizer` takes them
    (`none`, `true`, `false`).
    """
    import inspect

    helps = _docstring_args(inspect.getdoc(cls) or "")
    out = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = param.default
        shown = ("required" if default is param.empty else "none" if default is None
                 else str(default).lower() if isinstance(default, bool)
                 else "+".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default))
        out.append((name, shown, helps.get(name, "")))
    return out


def _docstring_args(doc: str) -> dict[str, str]:
    """Option name → its one-paragraph help from a Google-style `Args:` section."""
    import re

    helps: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return helps
    names: list[str] = []
    entry_indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if entry_indent is None:
            entry_indent = indent
        if indent < entry_indent:
            break  # the next section
        match = re.match(r"([\w, ]+):\s*(.*)$", line.strip()) if indent == entry_indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for n in names:
                helps[n] = match.group(2)
        else:
            for n in names:
                helps[n] += " " + line.strip()
    return helps
