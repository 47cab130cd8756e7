"""`mmtool report RUN_OR_DIR ...`: runs side by side — table, report.json, loss curves, importance bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mmtool.cli.app import app


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _iv(m: dict[str, Any]) -> str:
    lo, hi = m.get("ci95") or [None, None]
    if m.get("mean") is None:
        return f"not in the last 20% of steps (last at step {m['last_step']})" if m.get("last_step") else "–"
    return f"{m['mean']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def final_cell(fin: dict[str, Any]) -> str:
    """Per source: tail mean [interval over steps]; the total when no source was logged."""
    if not fin:
        return "–"
    by = fin.get("by_source") or {}
    if by:
        return "\n".join(f"{k} {_iv(v)}" for k, v in by.items())
    return f"total {_iv(fin['loss_tail'])}" if fin.get("loss_tail") else "–"


def importance_cell(abl: dict[str, Any]) -> str:
    """Ranked groups (ties joined by =) with intervals, then each unranked modality's status."""
    mode = abl["ranking_mode"]
    imp = {m: v[mode] for m, v in abl["importance"].items() if mode in v}

    def one(m: str) -> str:
        v = imp[m]
        lo, hi = v.get("ci95") or [None, None]
        ci = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and lo == lo else ""
        twin = f" (twin {v['twin']:+.2f})" if v.get("twin") is not None and v["twin"] == v["twin"] else ""
        return f"{m} {v['value']:+.2f}{ci}{twin}" if v.get("value") == v.get("value") else m

    groups = abl.get("ranking_groups")
    if groups is None:  # an ablation.json from before the twin: its ranking, unflagged
        groups = [[m] for m in abl.get("ranking", [])]
    ranked = [m for g in groups for m in g]
    parts = [" = ".join(one(m) for m in g) for g in groups]
    rest = [f"{one(m)}: {imp[m].get('status') or 'unranked'}" for m in imp if m not in ranked]
    return "\n".join([" > ".join(parts) or "nothing ranked"] + rest)


def share_cell(shares: dict[str, Any] | None, tasks: dict[str, Any] | None = None) -> str:
    """`audio 0.12 [0.05, 0.20] / 0.30 [0.22, 0.41]`: loss share / trunk-gradient share, 95% intervals,
    per modality, then per (folder, objective) task when the run had several."""
    if not shares:
        return "–"
    cells = []
    items = list(shares["modalities"].items()) + list((tasks or {}).get("tasks", {}).items())
    for m, v in items:
        grad = "–" if v["grad"] is None else f"{v['grad']:.2f} [{v['grad_ci95'][0]:.2f}, {v['grad_ci95'][1]:.2f}]"
        cells.append(f"{m} {v['loss']:.2f} [{v['loss_ci95'][0]:.2f}, {v['loss_ci95'][1]:.2f}] / {grad}")
    return "\n".join(cells)


def transfer_cell(transfer: dict[str, Any] | None) -> str:
    """`digits/kshot k=5 +0.07 [+0.03, +0.11] better`, one line per row; ratios for older reports."""
    if not transfer:
        return "–"
    if transfer.get("gains"):
        return "\n".join(f"{k} {v['gain']:+.2f} [{v['gain_ci95'][0]:+.2f}, {v['gain_ci95'][1]:+.2f}] {v['verdict']}"
                         for k, v in transfer["gains"].items())
    return " ".join(f"{k} {v:.2f}×" for k, v in (transfer.get("ratios") or {}).items()) or "–"


def report_table(report: dict[str, Any]) -> Group:
    """Two tables, one row per entry each: the runs (settings, final metrics, steadiness), and what
    they learned (probe summary, importance ranking, transfer)."""
    runs = Table(title="runs side by side", title_justify="left", show_edge=False)
    for col in ("run", "fusion", "data", "batching", "steps", "final loss per source", "per objective",
                "tok/s", "grad norm (cv)"):
        runs.add_column(col, justify="right" if col in ("steps", "tok/s", "grad norm (cv)") else "left",
                        no_wrap=col == "run")
    learned = Table(title="what they learned", title_justify="left", show_edge=False)
    for col in ("run", "attention to other modalities", "grad/token", "loss / trunk-grad share",
                "importance", "transfer gain over scratch"):
        learned.add_column(col, no_wrap=col == "run")
    for e in report["entries"]:
        cfg, fin = e.get("config", {}), e.get("final", {})
        probes = (e.get("probes") or {}).get("last", {})
        abl = e.get("ablation")
        imp = "–"
        if abl:
            imp = importance_cell(abl)
        fusion = cfg.get("fusion") or "–"
        if fusion == "mid":
            fusion += f"@{cfg.get('fusion_layer')}"
        batching = cfg.get("strategy") or "–"
        if cfg.get("batch_samples"):
            batching += f", {cfg['batch_samples']} samples"
        elif cfg.get("batch_tokens"):
            batching += f", {cfg['batch_tokens']:,} tokens"
        grad = fin.get("grad_norm")
        name = f"[bold]{e['name']}[/]"
        runs.add_row(
            name, fusion, ", ".join(Path(str(d)).name for d in cfg.get("data") or []) or "–", batching,
            str(fin.get("step", "–")),
            final_cell(fin),
            " ".join(f"{k} {v:.3f}" for k, v in (fin.get("losses_tail") or {}).items()) or "–",
            _fmt(fin.get("tokens_per_s"), ",.0f"),
            f"{grad['mean']:.2f} ({grad['cv']:.2f})" if grad else "–")
        learned.add_row(
            name,
            " ".join(f"{k} {v:.2f}" for k, v in (probes.get("attention_to_others") or {}).items()
                     if k != "separator") or "–",
            " ".join(f"{k} {v:.1e}" for k, v in (probes.get("grad_per_token") or {}).items()) or "–",
            share_cell(e.get("shares"), e.get("task_shares")),
            imp,
            transfer_cell(e.get("transfer")))
    runs.caption = ("final loss: per source, mean over the last 20% of steps that held it [95% interval "
                    "over those steps] (total when the run logged no sources) · grad norm: mean (std / mean) "
                    "after the first 10% of steps")
    learned.caption = ("attention: share each modality's tokens send to other modalities, mean over layers "
                       "and the last quarter of probe steps · grad/token: at each modality's encoder · "
                       "loss / trunk-grad share: each modality's (then each FOLDER/OBJECTIVE task's) mean share over the last quarter of "
                       "steps (grad: of the steps that logged it), 95% bootstrap interval · "
                       "importance: `mmtool ablate`, trained − untrained twin [95% interval], ranked groups (= tied), "
                       "then the unranked with their status · transfer: pretrained − scratch [95% interval] and verdict, "
                       "`mmtool eval-transfer` (pretrained/scratch ratio for reports written before gains)")
    for t in (runs, learned):
        t.caption_justify = "left"
    return Group(runs, Text(""), learned)


@app.command("report")
def report_cmd(
    paths: List[Path] = typer.Argument(..., help="Run folders, evaluation folders, or folders of runs."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.json, loss_curves.png, importance.png."),
) -> None:
    """Put several runs side by side: final metrics, probes, ablations, transfer; JSON and PNG plots."""
    from mmtool.analysis.report import write_report

    console = Console(highlight=False)
    report = write_report(list(paths), out)
    console.print(report_table(report))
    console.print("wrote " + ", ".join(report["files"].values()))
