"""`mmtool preprocess SOURCE --out DIR`: raw records → tokenized Arrow shards + manifest."""

from __future__ import annotations

import typer
from rich.console import Console

from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.cli._render import preprocess_summary, run_preprocess, slice_summary, print_finished
from mmtool.cli.app import app
from mmtool.cli.inspect import mapping_table, render_view
from mmtool.config import build_config
from mmtool.data.inspect import dry_run
from mmtool.data.preprocess import PreprocessConfig
from mmtool.errors import MMToolError


def parse_fraction(text: str, flag: str) -> float:
    """"1%" → 0.01, "0.05" → 0.05."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise MMToolError(f"{flag} {text!r}: expected a fraction such as 0.01 or a percentage such as 1%") from None


PREPROCESS_FLAGS = ConfigFlags(
    "mmtool.data.preprocess:PreprocessConfig", positional=("source",),
    aliases={"out": ("-o",), "options": ("--opt",), "tokenizers": ("--tokenizer",)},
    repeatable=("options", "tokenizers"),
    parsers={"max_rejected": lambda text: parse_fraction(text, "--max-rejected")},
)
"""`mmtool preprocess`'s flags: every `PreprocessConfig` field."""


@app.command("preprocess", cls=config_command(PREPROCESS_FLAGS))
def preprocess_cmd(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="Registered source name (see `mmtool ls sources -v`)."),
) -> None:
    """Tokenize a dataset into Arrow stream shards with a manifest (resumable, parallel)."""
    cfg = build_config(PreprocessConfig, flags={"source": source, **given_flags(ctx)})
    console = Console(highlight=False)
    if cfg.dry_run:
        view = dry_run(cfg, cfg.max_samples or 8)
        render_view(view, console, f"dry run: {cfg.source} (nothing written)")
        return
    manifest = run_preprocess(cfg, console, on_mapping=lambda rows: console.print(
        mapping_table([r.as_dict() for r in rows])))
    if cfg.num_slices is not None:
        console.print(slice_summary(manifest, str(cfg.out)), soft_wrap=True)
        return
    print_finished(console, manifest, str(cfg.out), preprocess_summary)
    if manifest.get("kept_foreign"):
        console.print(f"[yellow]kept {len(manifest['kept_foreign'])} file(s) in {cfg.out} that mmtool did "
                      f"not write: {', '.join(manifest['kept_foreign'][:5])}[/]")
