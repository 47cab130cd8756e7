"""`mmtool eval-transfer RUN --task ... --protocol ...`: pretrained vs scratch on downstream tasks.

Thin layer over `mmtool.transfer` (imported when the command runs: torch and scikit-learn stay out
of `mmtool --help`). Prints one table row per task × protocol setting: pretrained and scratch with
95% intervals, their paired gain and verdict, the chance-corrected ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmtool.cli.app import app
from mmtool.errors import MMToolError

DEFAULT_PROTOCOLS = "linear-probe,finetune,kshot,zeroshot"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _numbers(text: str, flag: str, cast: type) -> tuple:
    try:
        return tuple(cast(t) for t in _names(text))
    except ValueError:
        raise MMToolError(f"{flag} {text!r}: expected comma-separated {cast.__name__}s") from None


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
    files = [report["report"], *report["plots"].values()]
    console.print("wrote " + " · ".join(files))
    return report


@app.command("eval-transfer")
def eval_transfer_cmd(
    run: Path = typer.Argument(..., help="Training run folder (`mmtool train --out`)."),
    task: str = typer.Option("digits", "--task", "-t", help="Tasks, comma-separated (`mmtool ls tasks`) or label:DIR."),
    protocol: str = typer.Option(DEFAULT_PROTOCOLS, "--protocol", "-p", help="Protocols, comma-separated (`mmtool ls protocols`)."),
    modalities: Optional[str] = typer.Option(None, help="Modalities the model sees, e.g. image,text (default: each task's own; digits: image, spoken-digits: audio)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default RUN/transfer)."),
    seed: int = typer.Option(0, help="Seed of the split, subsets, episodes, fine-tuning and the scratch model."),
    fractions: str = typer.Option("0.1,0.25,0.5,1", help="Fractions of the labelled data for the data-efficiency curve."),
    k: Optional[str] = typer.Option(None, "--k", help="k-shot examples per class [default: 1,5,10, skipping k above the smallest class]."),
    episodes: int = typer.Option(100, help="k-shot episodes per k."),
    steps: int = typer.Option(100, help="Fine-tuning steps per run (each lr, each fraction, each model)."),
    batch_size: int = typer.Option(32, help="Fine-tuning batch size."),
    lrs: str = typer.Option("1e-4,3e-4,1e-3", help="Fine-tuning learning rates, chosen on validation."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples behind every 95% interval."),
    held_out: bool = typer.Option(True, "--held-out/--all-rows", help="On a folder the run pretrained on (digits, spoken-digits): evaluate only the rows pretraining never read (split not in the run's `splits`), or every row."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Measure transfer: linear probe, fine-tune, k-shot and zero-shot, pretrained vs from scratch."""
    from mmtool.transfer import TransferConfig
    from mmtool.transfer.protocols import ProtocolConfig

    budget = ProtocolConfig(fractions=_numbers(fractions, "--fractions", float),
                            ks=_numbers(k, "--k", int) if k else (1, 5, 10), ks_given=k is not None,
                            episodes=episodes, steps=steps, batch_size=batch_size,
                            lrs=_numbers(lrs, "--lrs", float), bootstrap=bootstrap, seed=seed,
                            device=device)
    cfg = TransferConfig(run=run, tasks=_names(task), protocols=_names(protocol),
                         modalities=_names(modalities) if modalities else None, out=out,
                         held_out=held_out, protocol=budget)
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
