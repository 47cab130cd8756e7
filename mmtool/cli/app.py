"""The typer application that every `mmtool` subcommand registers on."""

import typer

app = typer.Typer(
    name="mmtool",
    help="Experiments on unified multi-modal, multi-task transformers, from raw datasets to "
    "tokenized shards (`mmtool quickstart` runs everything on the built-in data).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
