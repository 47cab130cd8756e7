"""`mmtool sweep`: a base run × a grid × seeds, evaluated, one report (thin layer over `mmtool.experiments.sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmtool.cli.app import app
from mmtool.errors import MMToolError


@app.command("sweep")
def sweep_cmd(
    config: Optional[Path] = typer.Argument(None, help="Sweep YAML: train: (the base run), sweep: (grid, seeds, labels, baseline), evaluate:."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep folder (default sweeps/NAME): data/, runs/, sweep.json, sweep.md, plots/."),
    grid: List[str] = typer.Option([], "--grid", help="Grid axis KEY=V1,V2,... (repeatable; replaces the file's axis of that key)."),
    seeds: Optional[str] = typer.Option(None, help="Seeds, e.g. 0,1,2 (replaces sweep.seeds)."),
    set_: List[str] = typer.Option([], "--set", help="Override of the base run, KEY=VALUE (repeatable), e.g. model.size=small."),
    scale: float = typer.Option(1.0, help="Multiplies max_steps, warmup and save_every (bigger machines); nothing else changes."),
    point: Optional[int] = typer.Option(None, help="Run only point I (0-based, point-major: grid point × seed), e.g. one per Slurm array task."),
    report_only: bool = typer.Option(False, help="Write the report from the finished runs; train nothing."),
    list_points: bool = typer.Option(False, "--list", help="Print the points (index, run folder, values) and exit."),
) -> None:
    """Run a grid of training runs over seeds, evaluate each, and report means, intervals and paired differences."""
    from mmtool.experiments.sweep import load_spec, points, run_sweep

    if config is None and not set_:
        raise MMToolError("give a sweep file (mmtool sweep CONFIG.yaml) or at least --set data=... and --grid")
    seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    spec = load_spec(config, grid, seed_list, set_, scale)
    out = out or Path("sweeps") / spec.name
    console = Console(highlight=False)
    pts = points(spec)
    if list_points:
        for p in pts:
            console.print(f"{p.index:4d}  {out / 'runs' / p.run_name}  {p.values} seed={p.seed}")
        return
    console.print(f"sweep {spec.name}: {len(pts) // len(spec.seeds)} grid point(s) × {len(spec.seeds)} "
                  f"seed(s) = {len(pts)} run(s) in {out}")
    with console.status("sweep") as status:
        def say(msg: str) -> None:
            console.print(msg)
            status.update(msg)

        result = run_sweep(spec, out, point=point, report_only=report_only, say=say)
    if result["report"] is None:
        console.print(f"{len(result['missing'])} run(s) still missing; the report is written when all are done "
                      f"(or with --report-only)")
        return
    report = result["report"]
    table = Table(title=f"{spec.name}: mean over seeds [95% interval]", title_justify="left", show_edge=False)
    table.add_column("metric")
    for p in report["points"]:
        table.add_column(p["label"])
    from mmtool.experiments.sweep_report import _cell

    for m in report["metrics"]:
        if m.startswith("objective/"):
            continue
        cells = [("—" if (e := p["metrics"].get(m)) is None else _cell(e["mean"], e["ci95"])) for p in report["points"]]
        table.add_row(m, *cells)
    console.print(table)
    console.print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {len(report['plots'])} plot(s) in {out / 'plots'}")
