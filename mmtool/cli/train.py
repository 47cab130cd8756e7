"""`mmtool train`: train the unified model (thin layer over `mmtool.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmtool.cli.app import app
from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.config import build_config


TRAIN_FLAGS = ConfigFlags(
    "mmtool.train:TrainConfig",
    aliases={"data": ("-d",), "out": ("-o",), "model.size": ("--model",), "loggers": ("--logger",)},
    repeatable=("data",),
    parsers={"probes": lambda text: __import__("mmtool.train.probes", fromlist=["parse_probes"]).parse_probes(text)},
)
"""`mmtool train`'s flags: every `TrainConfig` field (and `ModelConfig`'s, as `--model.NAME`)."""


@app.command("train", cls=config_command(TRAIN_FLAGS),
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings (flags and key=value override it), e.g. configs/quickstart.yaml."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest checkpoint."),
    embeddings: List[str] = typer.Option([], "--embeddings", help="Embedding folder (`mmtool embed`) to train on instead of the --data folder it was made from (repeatable)."),
    text_encoder: str = typer.Option("learned", help="learned (text ids, embeddings trained from scratch) or frozen:NAME (e.g. frozen:minilm-l6: text embedded once, cached in OUT/embeddings)."),
) -> None:
    """Train the unified multi-modal model (extra KEY=VALUE arguments override settings).

    Settings apply in order: the defaults, --config FILE, the flags, then KEY=VALUE arguments.
    """
    from mmtool.train import TrainConfig  # imports torch and the model: only when training

    cfg = build_config(TrainConfig, config, given_flags(ctx), list(ctx.args))
    console = Console(highlight=False)
    if embeddings or text_encoder != "learned":
        from mmtool.embed import resolve_training_data

        cfg.data = resolve_training_data(cfg.data, embeddings, text_encoder, Path(cfg.out) / "embeddings",
                                         notify=console.print)
    run_training(cfg, resume, console)


def run_training(cfg, resume: bool, console: Console) -> dict:
    """Trains `cfg` (a `TrainConfig`) under a rich progress bar and prints a one-line summary."""
    from mmtool.train import train

    with Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("train", total=cfg.max_steps, info="")

        def on_start(info: dict) -> None:
            bar.update(task, completed=info["start_step"])
            console.print(f"model {cfg.model.size}/{cfg.model.fusion}: {info['parameters']:,} parameters; "
                          f"streams {', '.join(info['streams'])}"
                          + (f"; resuming {info['resumed_from']}" if info["resumed_from"] else ""))
            console.print(f"mixture: weights are shares of {info['mix_by']}; splits {','.join(info['splits'])}")
            if info.get("compile"):
                console.print(f"compile: {info['compile']}")
            if info.get("precision") == "bf16":
                console.print("precision: bf16 autocast (weights, gradients and optimizer state float32)")
            if info.get("amended"):
                console.print(f"resumed with amended settings: {info['amended']} (recorded in config.json "
                              "`amendments`)")
            for line in info["warnings"]:
                console.print(f"[yellow]warning:[/] {line}")

        seconds: list[float] = []  # this process's step times (the first pays for compiling)

        def on_step(line: dict) -> None:
            seconds.append(line["seconds"])
            bar.update(task, completed=line["step"],
                       info=f"loss {line['loss']:.3f} · {line['tokens_per_s']:,.0f} tok/s · wait {line['data_wait']:.0%}")

        summary = train(cfg, resume=resume, on_step=on_step, on_start=on_start)
    if summary["rank"] == 0:
        console.print(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; final loss "
                      f"{summary['final_loss']:.4f}; checkpoint {summary['checkpoint']}")
        if summary.get("compile_graphs") is not None and seconds:
            rest = sorted(seconds[1:])
            steady = f", later steps {rest[len(rest) // 2]:.2f} s (median)" if rest else ""
            console.print(f"compiled {summary['compile_graphs']} graph(s); first step {seconds[0]:.1f} s{steady}")
    return summary
