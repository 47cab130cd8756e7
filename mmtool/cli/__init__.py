"""The `mmtool` command line: thin typer modules over the library, one per subcommand.

Errors the user can fix (`MMToolError`) are printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from rich.console import Console

from mmtool.cli import (ablate, embed, eval_transfer, experiment, export, ls, preprocess, profile,  # noqa: F401
                        quickstart, report, sanity, sweep, train)  # each registers its command
from mmtool.cli.app import app
from mmtool.errors import MMToolError


def main() -> None:
    """Entry point of the `mmtool` console script and `python -m mmtool`."""
    try:
        app()
    except MMToolError as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {exc}",
                                                                    markup=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; rerun the same command to resume")
        sys.exit(130)
