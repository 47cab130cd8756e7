"""`mmtool ablate RUN`: each modality dropped and permuted; loss and accuracy changes with 95% CIs;
and `mmtool sanity`: the known-answer check of the ablation and the probes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.cli.app import app
from mmtool.config import build_config
from mmtool.io import atomic_write_json

if TYPE_CHECKING:
    from mmtool.analysis.ablate import AblateConfig


def _ci(v: float, ci: list[float], pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:+.3f}")
    if v is None or v != v:
        return "–"
    lo, hi = ci
    return f"{f(v)} [{f(lo)}, {f(hi)}]" if lo == lo and hi == hi else f(v)


def ablation_table(result: dict[str, Any]) -> Table:
    """One row per (modality, mode): samples, loss intact → ablated, Δ loss, accuracy, importance
    of the trained model, of its untrained twin, and the difference (the importance), status."""
    twin = result.get("baseline") == "untrained twin"
    table = Table(title=f"modality ablations: {result['run']} ({result['batches']} batches, "
                        f"{result['samples']} samples; 95% bootstrap intervals over batches and, for "
                        "accuracy, held-out samples)", title_justify="left", show_edge=False)
    cols = ["modality", "mode", "samples", "loss intact → ablated", "Δ loss (remaining)",
            "accuracy intact → ablated", "Δ accuracy (pp)", "trained"]
    cols += ["untrained twin", "importance (trained − twin)"] if twin else ["importance"]
    for col in cols + ["status"]:
        table.add_column(col, justify="left" if col in ("modality", "mode", "status") else "right")
    for name in result["ranking"] + [m for m in result["results"] if m not in result["ranking"]]:
        for mode, e in result["results"][name].items():
            loss, acc = e.get("loss"), e.get("accuracy")
            imp = e["importance"]
            row = [f"[bold]{name}[/]", mode, f"{e['samples']:,}",
                   f"{loss['intact']:.3f} → {loss['ablated']:.3f}" if loss else "–",
                   _ci(loss["delta"], loss["ci95"]) if loss else "–",
                   f"{acc['intact']:.1%} → {acc['ablated']:.1%}" if acc else "–",
                   _ci(-acc["drop"], [-acc["ci95"][1], -acc["ci95"][0]], pct=True) if acc else "–",
                   _ci(imp["trained"], imp["trained_ci95"])]
            if twin:
                row += [_ci(imp["twin"], imp["twin_ci95"]), _ci(imp["value"], imp["ci95"])]
            else:
                row += [_ci(imp["value"], imp["ci95"])]
            status = imp.get("status", "") if mode == result["ranking_mode"] else ""
            if imp.get("structural_zero"):
                status = "structural zero"
            table.add_row(*row, status)
    groups = result.get("ranking_groups") or []
    table.caption = (f"importance = {result['importance_metric']}"
                     + (" of the trained model minus that of its untrained twin (same batches and masks)"
                        if twin else "") if result["results"] else "no modality could be ablated")
    table.caption += (f" · ranking by {result['ranking_mode']} (only intervals above 0; = tied): "
                      f"{' > '.join(' = '.join(g) for g in groups) or 'nothing ranked'}")
    if twin:
        table.caption += (" · the twin alone would rank: "
                          f"{' > '.join(' = '.join(g) for g in result.get('twin_ranking_groups', [])) or 'nothing'}")
    table.caption += (" · structural zero: under this model's attention the modality cannot change the "
                      "others' loss (e.g. causal, and it always comes last)")
    for note in result.get("notes", []):
        table.caption += f" · {note}"
    table.caption_justify = "left"
    return table


ABLATE_FLAGS = ConfigFlags("mmtool.analysis.ablate:AblateConfig", positional=("run",),
                          aliases={"data": ("-d",)}, repeatable=("data",))
"""`mmtool ablate`'s flags: every `AblateConfig` field."""


@app.command("ablate", cls=config_command(ABLATE_FLAGS))
def ablate_cmd(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Training run folder (`mmtool train --out`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Result JSON (default RUN/ablation.json)."),
    plot: Optional[Path] = typer.Option(None, help="Bar chart with error bars (default RUN/ablation.png)."),
) -> None:
    """Drop and permute each modality: change in remaining-modality loss and probe accuracy, 95% CIs,
    against the untrained twin; ties and structural zeros flagged, not ranked."""
    from mmtool.analysis.ablate import AblateConfig

    cfg = build_config(AblateConfig, flags={"run": run, **given_flags(ctx)})
    run_ablate(cfg, Console(highlight=False), json_out, plot)


def run_ablate(cfg: "AblateConfig", console: Console, json_out: Path | None = None,
               plot: Path | None = None) -> dict[str, Any]:
    """Ablates with a progress bar, prints the table, writes the JSON and the plot (default: in the run)."""
    from mmtool.analysis.ablate import ablate
    from mmtool.analysis.report import plot_ablation

    with Progress(TextColumn("[bold]ablate[/]"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("ablate", total=cfg.batches)
        result = ablate(cfg, on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(ablation_table(result))
    json_out = json_out or cfg.run / "ablation.json"
    plot = plot or cfg.run / "ablation.png"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_out, result)
    plot_ablation(result, plot)
    console.print(f"wrote {json_out} and {plot}")
    return result
