"""The `mmtool` command line: thin typer modules over the library, one per subcommand.

Errors the user can fix (`MMToolError`) are printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys

from rich.console import Console
from rich.markup import escape

from mmtool.cli import (ablate, embed, eval_transfer, experiment, export, inspect, ls,  # noqa: F401
                        merge, preprocess, profile, quickstart, report, sanity, sweep,
                        train)  # each registers its command
from mmtool.cli.app import app
from mmtool.errors import Interrupted, MMToolError


class _Stopped(BaseException):
    """Raised by the SIGINT/SIGTERM handler. Not a KeyboardInterrupt: typer turns that into a
    silent exit 130, and the user would not learn that rerunning resumes."""


def _stop(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def main() -> None:
    """Entry point of the `mmtool` console script and `python -m mmtool`.

    Exit status: 0 done, 2 a user error (one line on stderr), 130 interrupted (SIGINT or SIGTERM —
    a cluster's preemption ends a job like Ctrl-C; training saves a checkpoint first and says so;
    every job resumes when rerun).
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        app()
    except Interrupted as exc:
        err.print(str(exc), markup=False)
        sys.exit(130)
    except MMToolError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
        sys.exit(2)
    except (_Stopped, KeyboardInterrupt):
        err.print("interrupted; rerun the same command to resume (finished work is kept)")
        sys.exit(130)
