"""`mmtool train`: train the unified model (thin layer over `mmtool.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmtool.cli.app import app
from mmtool.config import build_config, parse_weights


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(
    ctx: typer.Context,
    data: List[str] = typer.Option([], "--data", "-d", help="Preprocessed folder DIR[=WEIGHT][:objectives=SPEC][:fraction=F] (repeatable) or a mixture YAML."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings (flags and key=value override it)."),
    model: Optional[str] = typer.Option(None, "--model", help="Size preset: tiny, small, base."),
    fusion: Optional[str] = typer.Option(None, help="early, mid or late (`mmtool ls fusions`)."),
    fusion_layer: Optional[int] = typer.Option(None, help="mid fusion: per-modality layers before joint ones."),
    attention: Optional[str] = typer.Option(None, help="Attention backend (`mmtool ls attention`); default: fastest correct for the device."),
    objectives: Optional[str] = typer.Option(None, help="Weighted objectives (or task presets: `mmtool ls task-presets`), e.g. next-token=1,masked-patch=0.5; a folder's own: --data DIR=W:objectives=caption,contrastive=0.5."),
    task_balance: Optional[str] = typer.Option(None, help="Even out the tasks' loss scales: none (default), loss-scale or uncertainty (`mmtool ls balancers`)."),
    strategy: Optional[str] = typer.Option(None, help="Batching strategy (`mmtool ls strategies`)."),
    mix_by: Optional[str] = typer.Option(None, help="What a --data weight is a share of: tokens (default; the norm for LLM mixtures) or samples (draws)."),
    splits: Optional[str] = typer.Option(None, help="Rows to pretrain on by their split column, e.g. train (default) or train,validation; held-out rows stay free for evaluation."),
    batch_tokens: Optional[int] = typer.Option(None, help="Token budget per micro-batch."),
    batch_samples: Optional[int] = typer.Option(None, help="Fixed samples per micro-batch (instead of --batch-tokens)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    warmup: Optional[int] = typer.Option(None, help="Linear warmup steps."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per step."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    num_workers: Optional[int] = typer.Option(None, help="Loader threads assembling batches ahead."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    keep_last: Optional[int] = typer.Option(None, help="Checkpoints to keep."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest checkpoint."),
    probes: Optional[str] = typer.Option(None, help="Training probes logged to metrics.jsonl, e.g. attention,grad-norm,loss (`mmtool ls probes`)."),
    probe_every: Optional[int] = typer.Option(None, help="Probe step 1 and every N-th step (default 10); these steps also log each modality's trunk-gradient share (grad_share)."),
    embeddings: List[str] = typer.Option([], "--embeddings", help="Embedding folder (`mmtool embed`) to train on instead of the --data folder it was made from (repeatable)."),
    text_encoder: str = typer.Option("learned", help="learned (text ids, embeddings trained from scratch) or frozen:NAME (e.g. frozen:minilm-l6: text embedded once, cached in OUT/embeddings)."),
) -> None:
    """Train the unified multi-modal model (extra KEY=VALUE arguments override settings)."""
    flags = {"data": data, "out": out, "model.size": model, "model.fusion": fusion,
             "model.fusion_layer": fusion_layer, "model.attention": attention,
             "model.objectives": parse_weights(objectives, "--objectives") if objectives else None,
             "model.task_balance": task_balance,
             "strategy": strategy, "mix_by": mix_by,
             "splits": [p.strip() for p in splits.split(",") if p.strip()] if splits else None,
             "batch_tokens": batch_tokens, "batch_samples": batch_samples,
             "max_steps": max_steps, "lr": lr, "warmup": warmup, "grad_accum": grad_accum,
             "seed": seed, "num_workers": num_workers, "device": device,
             "save_every": save_every, "keep_last": keep_last, "probe_every": probe_every}
    if probes is not None:
        from mmtool.train.probes import parse_probes

        flags["probes"] = parse_probes(probes)
    from mmtool.train import TrainConfig  # imports torch and the model: only when training

    cfg = build_config(TrainConfig, config, flags, list(ctx.args))
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
            for line in info["warnings"]:
                console.print(f"[yellow]warning:[/] {line}")

        def on_step(line: dict) -> None:
            bar.update(task, completed=line["step"],
                       info=f"loss {line['loss']:.3f} · {line['tokens_per_s']:,.0f} tok/s · wait {line['data_wait']:.0%}")

        summary = train(cfg, resume=resume, on_step=on_step, on_start=on_start)
    if summary["rank"] == 0:
        console.print(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; final loss "
                      f"{summary['final_loss']:.4f}; checkpoint {summary['checkpoint']}")
    return summary
