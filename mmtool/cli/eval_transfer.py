"""`mmtool eval-transfer RUN --task ... --protocol ...`: pretrained vs scratch on downstream tasks.

Thin layer over `mmtool.transfer` (imported when the command runs: torch and scikit-learn stay out
of `mmtool --help`). Prints one table row per task × protocol setting: pretrained and scratch with
95% intervals, their paired gain and verdict, the chance-corrected ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.cli.app import app
from mmtool.config import build_config


def _interval(ci: list[float] | None, signed: bool = False) -> str:
    if not ci or ci[0] != ci[0]:
        return ""
    f = "{:+.2f}" if signed else "{:.2f}"
    return f" [{f.format(ci[0])}, {f.format(ci[1])}]"


def _score(row: dict[str, Any], which: str) -> str:
    return f"{row[which]:.3f}" + _interval(row.get(f"{which}_ci95"))


VERDICT_STYLE = {"better": "[green]better[/]", "worse": "[red]worse[/]", "within noise": "[dim]within noise[/]"}


def transfer_table(report: dict[str, Any]) -> Table:
    """One row per task × protocol (× setting): pretrained, scratch and their gain with 95%
    intervals, the verdict, the chance-corrected ratio, chance."""
    table = Table(title=f"transfer of {report['run']} (step {report['step']}) vs the same model from "
                        f"scratch · seed {report['seed']}", title_justify="left", show_edge=False)
    for col in ("task", "inputs", "protocol", "pretrained", "scratch", "gain", "verdict", "cc ratio",
                "chance"):
        table.add_column(col, justify="left" if col in ("task", "inputs", "protocol", "verdict") else "right",
                         no_wrap=col in ("protocol", "cc ratio", "chance"))
    for name, t in report["tasks"].items():
        first = True
        for proto, res in t["results"].items():
            cells = [name if first else "", "+".join(t["modalities"]) if first else ""]
            first = False
            if not res["applicable"]:
                table.add_row(*cells, proto, "[dim]n/a[/]", "[dim]n/a[/]", "", "", "", "")
                continue
            for row in res["rows"]:
                label = f"{proto} {row['setting']}".strip()
                r = row.get("chance_corrected_ratio")
                table.add_row(*cells, label, _score(row, "pretrained"), _score(row, "scratch"),
                              f"{row['gain']:+.3f}" + _interval(row.get("gain_ci95"), signed=True),
                              VERDICT_STYLE.get(row.get("verdict"), row.get("verdict") or ""),
                              "—" if r is None else f"{r:.2f}×", f"{t['chance']:.3f}")
                cells = ["", ""]
    notes = [f"{n}: pretraining saw the test inputs? {t['pretraining_saw']}" for n, t in report["tasks"].items()]
    notes += [f"{n}: {note}" for n, t in report["tasks"].items() for note in t["notes"]]
    notes += [f"{n}: {note}" for n, t in report["tasks"].items()
              for note in t["results"].get("kshot", {}).get("detail", {}).get("notes", [])]
    notes += [f"{n}: {p} not applicable: {r['reason']}" for n, t in report["tasks"].items()
              for p, r in t["results"].items() if not r["applicable"]]
    notes += [f"{n}: {p} {variant} not applicable: {why}" for n, t in report["tasks"].items()
              for p, r in t["results"].items() if r["applicable"]
              for variant, why in r["detail"].get("not_applicable", {}).items()]
    table.caption = ("test accuracy [95% bootstrap interval: test examples; k-shot: test examples × "
                     "episodes] · gain = pretrained − scratch, paired (same resamples for both) · "
                     "verdict: the gain's interval excludes 0, else within noise · cc ratio (chance-corrected) "
                     "= (pretrained − chance) / (scratch − chance)" + "".join(f"\n{n}" for n in notes))
    table.caption_justify = "left"
    return table


def run_eval_transfer(cfg, console: Console) -> dict[str, Any]:
    """Runs `cfg` (a `TransferConfig`) with a status line, prints the table and where files went."""
    from mmtool.transfer import evaluate_transfer

    with console.status("eval-transfer") as status:
        report = evaluate_transfer(cfg, on_progress=lambda msg: status.update(f"eval-transfer: {msg}"))
    console.print(transfer_table(report))
    if cfg.compile:
        from mmtool.models.compile import stats

        console.print(f"compiled {stats().graphs} graph(s) (both models share them)")
    files = [report["report"], *report["plots"].values()]
    console.print("wrote " + " · ".join(files))
    return report


TRANSFER_FLAGS = ConfigFlags(
    "mmtool.transfer.evaluate:TransferConfig", positional=("run",),
    aliases={"tasks": ("--task", "-t"), "protocols": ("--protocol", "-p"), "out": ("-o",),
             "protocol.ks": ("--k",)},
    negatives={"held_out": "--all-rows"},
)
"""`mmtool eval-transfer`'s flags: every `TransferConfig` field, its `ProtocolConfig` as `--protocol.NAME`."""


@app.command("eval-transfer", cls=config_command(TRANSFER_FLAGS))
def eval_transfer_cmd(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Training run folder (`mmtool train --out`)."),
) -> None:
    """Measure transfer: linear probe, fine-tune, k-shot and zero-shot, pretrained vs scratch."""
    from mmtool.transfer import TransferConfig

    flags = given_flags(ctx)
    cfg = build_config(TransferConfig, flags={"run": run, **flags})
    cfg.protocol.ks_given = "protocol.ks" in flags
    run_eval_transfer(cfg, Console(highlight=False))


def quickstart_stage(out: Path, console: Console) -> None:
    """quickstart's transfer stage: `out/run` vs scratch on digits held out from pretraining — k-shot,
    zero-shot by caption similarity and a linear probe, each with its 95% interval; seconds."""
    from mmtool.transfer import TransferConfig
    from mmtool.transfer.protocols import ProtocolConfig

    budget = ProtocolConfig(fractions=(0.25, 1.0), ks=(1, 5, 10), episodes=50, cs=(0.1, 1.0, 10.0), seed=0)
    cfg = TransferConfig(run=out / "run", tasks=["digits"], protocols=["kshot", "zeroshot", "linear-probe"],
                         out=out / "transfer", protocol=budget)
    run_eval_transfer(cfg, console)
