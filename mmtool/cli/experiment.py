"""`mmtool experiment NAME`: run a shipped experiment (the positive controls) and print its checks."""

from __future__ import annotations


import typer
from rich.console import Console
from rich.table import Table

from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.cli.app import app
from mmtool.config import build_config
from mmtool.errors import MMToolError


EXPERIMENT_FLAGS = ConfigFlags("mmtool.experiments:ExperimentConfig")
"""`mmtool experiment`'s flags: every `ExperimentConfig` field."""


@app.command("experiment", cls=config_command(EXPERIMENT_FLAGS))
def experiment(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Experiment (`mmtool ls experiments`), e.g. controls."),
) -> None:
    """Run a shipped experiment; a positive control exits 2 when its instrument misses the known answer."""
    from mmtool.experiments import ExperimentConfig, run_experiment

    cfg = build_config(ExperimentConfig, flags=given_flags(ctx))
    workdir = cfg.workdir
    console = Console(highlight=False)
    with console.status(f"experiment {name}") as status:
        results = run_experiment(name, cfg, say=lambda m: status.update(m))
    for r in results:
        table = Table(title=f"{r.name}: {'[green]passed[/]' if r.passed else '[red]FAILED[/]'}",
                      title_justify="left", show_edge=False)
        table.add_column("claim")
        table.add_column("result")
        table.add_column("measured")
        for c in r.checks:
            table.add_row(c.claim, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail)
        console.print(table)
        console.print(f"  details: {workdir / r.name / 'result.json'}\n")
    failed = [r.name for r in results if not r.passed]
    if failed:
        raise MMToolError(f"positive control(s) failed: {', '.join(failed)}: the instrument did not "
                          "find the known answer (see the tables above)")
