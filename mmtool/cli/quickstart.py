"""`mmtool quickstart`: the whole pipeline end to end on the built-in sources.

Stages: 1. preprocess every built-in source; 2. profile the batching strategies on them; 3. train a
tiny unified model on the mixture (train split only, token-share weights); 4. embed the digits
captions with the frozen minilm-l6 (`out/embed/digits`); 5. eval-transfer of the run on digits held
out from pretraining, pretrained vs scratch with intervals (`out/transfer`); 6. ablate each modality
against the untrained twin; 7. one report. Rerunning reuses finished work.

The training recipe is the one the positive controls show learning (`mmtool experiment controls`):
late fusion with the contrastive objective, which aligns each sample's modalities (image–caption,
audio–transcript, observation–action) in separately encoded towers, plus next-token within each
discrete modality (see `QUICKSTART_MODEL` for why not masked-patch).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mmtool.cli._render import human_bytes, run_preprocess
from mmtool.cli.app import app
from mmtool.cli.profile import run_profile
from mmtool.data.preprocess import PreprocessConfig

BUILTIN_MIXTURE: dict[str, list[str]] = {
    "digits": [],
    "spoken-digits": [],
    "cartpole": ["episodes=100", "window=50"],
    "acrobot": ["episodes=20", "window=50"],
    "pendulum": ["episodes=50", "window=50"],
    "pydocs": [],
}
"""Sources and options that quickstart preprocesses (all offline, all real data). Episodes are cut
into windows of 50 whole timesteps (Gato's way), so that one episode is not a third of a batch."""

QUICKSTART_MODEL = {"size": "tiny", "fusion": "late", "objectives": {"contrastive": 1.0, "next-token": 1.0}}
"""The model quickstart trains: the fusion and objective the positive controls show learning
(contrastive, late), plus next-token so that text and actions have a loss of their own. Measured on
this mixture (150 steps, seed 0, held-out digits): with masked-patch added as well, zero-shot fell to
chance (0.125) and no k-shot gain was detectable; without it, zero-shot 0.583 [0.47, 0.69] and
k-shot gains +0.08 / +0.05 at k = 1 / 5 over scratch."""

PROFILE_BATCH_TOKENS = 4096
"""Token budget of the profile stage: above the longest built-in sample (cartpole: 1,400 tokens)."""
PROFILE_STEPS = 64
"""Batches per strategy in the profile stage (by-modality-sorted reorders within windows of ~64
batches, so fewer would not show its padding); seconds."""


ABLATE_BATCHES = 8
"""Evaluation batches of 16 samples in the ablate stage; seconds."""


def _preprocess_stage(out: Path, num_proc: int, max_samples: int, console: Console) -> dict[str, dict]:
    """Preprocesses every built-in source into `out/data/SOURCE`; returns their summaries."""
    made = {}
    for source, options in BUILTIN_MIXTURE.items():
        cfg = PreprocessConfig(source=source, out=out / "data" / source, options=options,
                               max_samples=max_samples, num_proc=num_proc)
        made[source] = run_preprocess(cfg, console)
        m = made[source]
        state = "up to date" if m.get("up_to_date") else "written"
        console.print(f"  {source:<14} {m['rows']:>6,} rows  {state}")
    return made


def _data_table(made: dict[str, dict], out: Path) -> Table:
    """One row per preprocessed source: rows, rejected, tokens, modalities, shards, bytes."""
    table = Table(title=f"quickstart data in {out / 'data'}", title_justify="left", show_edge=False)
    for col in ("source", "rows", "rejected", "tokens", "modalities", "shards", "bytes"):
        table.add_column(col, justify="left" if col in ("source", "modalities") else "right")
    for source, m in made.items():
        tokens = sum(c["tokens"] for c in m["sources"].values())
        table.add_row(source, f"{m['rows']:,}", f"{m['rejected']:,}", f"{tokens:,}",
                      ", ".join(m["modalities"]), str(len(m["shards"])),
                      human_bytes(sum(s["bytes"] for s in m["shards"])))
    return table


def _train_stage(out: Path, mixture: list[str], train_steps: int, console: Console) -> Path:
    """Trains (or resumes) the tiny `QUICKSTART_MODEL` on the mixture into `out/run`; returns the run."""
    from mmtool.cli.train import run_training
    from mmtool.models.model import ModelConfig
    from mmtool.train import TrainConfig

    run = out / "run"
    model = ModelConfig(**{**QUICKSTART_MODEL, "objectives": dict(QUICKSTART_MODEL["objectives"])})
    train_cfg = TrainConfig(data=mixture, out=run, max_steps=train_steps, batch_tokens=PROFILE_BATCH_TOKENS,
                            warmup=10, save_every=max(train_steps // 2, 1), model=model)
    run_training(train_cfg, resume=(run / "config.json").is_file(), console=console)
    return run


def _ablate_stage(run: Path, console: Console) -> None:
    from mmtool.analysis.ablate import AblateConfig
    from mmtool.cli.ablate import run_ablate

    run_ablate(AblateConfig(run=run, modes=["drop"], batches=ABLATE_BATCHES, batch_samples=16), console)
    console.print("  (late fusion: no modality's tokens reach another modality's loss, so each loss-based "
                  "importance is a structural zero by construction; the accuracy columns — a probe refit "
                  "without the modality — are the measurement here. README \"Recipe: where to fuse\" "
                  "compares fusions over seeds)")


def _report_stage(out: Path, run: Path, console: Console) -> None:
    from mmtool.cli.report import report_table
    from mmtool.analysis.report import write_report

    report = write_report([run, out / "transfer"], out / "report")
    console.print(report_table(report))
    console.print(f"\nInspect: [bold]mmtool ls[/] · {out / 'data' / 'digits' / 'manifest.json'} · "
                  f"{out / 'profile.png'} · {run / 'metrics.jsonl'} · {out / 'report'}")


@app.command("quickstart")
def quickstart(
    out: Path = typer.Option(Path("mmtool-quickstart"), "--out", "-o", help="Folder for everything quickstart makes."),
    num_proc: int = typer.Option(2, help="Worker processes for preprocessing."),
    max_samples: int = typer.Option(3000, help="Cap per source, to keep the run short."),
    train_steps: int = typer.Option(150, help="Training steps of the tiny model (~2 CPU minutes)."),
) -> None:
    """Run the main job end to end on the built-in sources (rerunning resumes and reuses)."""
    from mmtool import folders

    with folders.writer(out, "quickstart"):  # each stage also claims its own subfolder
        console = Console(highlight=False)
        console.rule("[bold]1. preprocess the built-in sources")
        made = _preprocess_stage(out, num_proc, max_samples, console)
        console.print(_data_table(made, out))

        console.rule("[bold]2. profile batching strategies")
        from mmtool.analysis.profile import ProfileConfig  # imports torch: only when this stage runs

        mixture = [f"{out / 'data' / source}=1" for source in made]  # equal shares of tokens
        profile = ProfileConfig(data=mixture, batch_tokens=PROFILE_BATCH_TOKENS, steps=PROFILE_STEPS)
        run_profile(profile, console, out / "profile.json", out / "profile.png")

        console.rule("[bold]3. train a tiny unified model on the mixture (late fusion, contrastive + next-token)")
        run = _train_stage(out, mixture, train_steps, console)

        console.rule("[bold]4. embed the digits captions with a frozen encoder (minilm-l6)")
        from mmtool.cli.embed import quickstart_embed

        quickstart_embed(out, console)

        console.rule("[bold]5. eval-transfer: the run vs the same model from scratch, on digits held out from pretraining")
        from mmtool.cli.eval_transfer import quickstart_stage

        quickstart_stage(out, console)  # linear probe + small k-shot on image-only digits; seconds

        console.rule("[bold]6. ablate: each modality dropped from the run's inputs")
        _ablate_stage(run, console)

        console.rule("[bold]7. report: the run, its ablation and its transfer side by side")
        _report_stage(out, run, console)
