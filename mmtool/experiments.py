"""`mmtool experiment NAME`: shipped experiments, first of all the positive controls.

A positive control is an experiment whose answer is known. If it fails, the instrument is broken,
not the hypothesis — so each instrument mmtool reports with has one, and CI runs them all
(`pytest -m slow`). Each starts from the built-in data, trains what it needs, measures with the
same library calls the CLI uses, and returns checks that pass only when the instrument sees the
known answer *with an interval that excludes the null* — never a point estimate alone:

* `control-transfer`: image–caption contrastive pretraining on the train split of `digits` (late
  fusion, the recipe that transfers), then k-shot on digits **held out from pretraining**:
  pretrained beats the same architecture from scratch at k = 1, 5 and 10, each paired-difference
  interval above zero (it resamples episodes and test examples).
* `control-zeroshot`: the same run; digits zero-shot by caption similarity (each test image against
  the ten class prompts, CLIP-style) far above chance: the interval's lower end above twice chance,
  while the scratch model stays near chance.
* `control-importance`: the `known-answer` source, where only the image carries the label; the
  ablation ranks image first *relative to the untrained twin* and the probes move toward it, and the
  same check run on the untrained model fails (so the check cannot pass without training).
* `controls`: all three, one report.

Every experiment writes `WORKDIR/NAME/result.json` (checks, numbers, the settings used) and reuses
finished work in WORKDIR (a finished training run is resumed as finished, i.e. not retrained).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmtool.data.shards import atomic_write_json
from mmtool.errors import MMToolError
from mmtool.registry import Registry

Say = Callable[[str], None]


@dataclass
class ExperimentConfig:
    """An experiment run. Every field is a flag of `mmtool experiment`."""

    workdir: Path = Path("mmtool-experiments")
    """Folder for the data, runs and results (finished work in it is reused)."""
    seed: int = 0
    """Seed of the data split, training and evaluation."""
    steps: int | None = None
    """Training steps (None: each experiment's own, the setting its checks were calibrated on)."""
    episodes: int = 100
    """k-shot episodes per k."""


@dataclass
class Check:
    """One claim of a positive control and whether the measurement supports it."""

    claim: str
    passed: bool
    detail: str


@dataclass
class ExperimentResult:
    """What an experiment found: its checks (all must pass) and the numbers behind them."""

    name: str
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed,
                "checks": [vars(c) for c in self.checks], "numbers": self.numbers,
                "settings": self.settings}


EXPERIMENTS: Registry[Callable[[ExperimentConfig, Say], list[ExperimentResult]]] = Registry(
    "experiments", "shipped experiments (`mmtool experiment NAME`): positive controls of the instruments")


def run_experiment(name: str, cfg: ExperimentConfig, say: Say | None = None) -> list[ExperimentResult]:
    """Runs experiment `name`; writes `WORKDIR/NAME/result.json` for each result and returns them."""
    fn = EXPERIMENTS.get(name)
    say = say or (lambda _m: None)
    cfg.workdir = Path(cfg.workdir)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    results = fn(cfg, say)
    for r in results:
        atomic_write_json(cfg.workdir / r.name / "result.json", r.to_dict())
    return results


# -- shared pieces -------------------------------------------------------------------------------
CONTRASTIVE_STEPS = 200
"""Steps of the image–caption contrastive run (tiny model, 64 samples per step; ~3 CPU minutes)."""


def _data(cfg: ExperimentConfig, source: str, options: list[str] | None = None,
          tokenizers: list[str] | None = None) -> Path:
    """A built-in source preprocessed into WORKDIR/data/SOURCE (reused when up to date)."""
    from mmtool.data.preprocess import PreprocessConfig, preprocess

    out = cfg.workdir / "data" / source
    preprocess(PreprocessConfig(source, out, options=list(options or []),
                                tokenizers=list(tokenizers or []), num_proc=1))
    return out


def contrastive_digits_run(cfg: ExperimentConfig, say: Say) -> Path:
    """Image–caption contrastive pretraining on the train split of digits (late fusion, tiny).

    Late fusion keeps the image and caption towers apart until pooling, so InfoNCE must align two
    separate encoders (CLIP's setting) rather than let attention share a sample signature; the
    validation and test rows of digits are never read, so transfer is measured on held-out images.
    """
    from mmtool.models.model import ModelConfig
    from mmtool.train import TrainConfig, train

    steps = cfg.steps or CONTRASTIVE_STEPS
    data = _data(cfg, "digits")
    run = cfg.workdir / f"digits-contrastive-s{cfg.seed}-{steps}"
    say(f"contrastive pretraining on the digits train split: {steps} steps")
    train(TrainConfig(data=[str(data)], out=run, splits=["train"], batch_samples=64, batch_tokens=None,
                      max_steps=steps, warmup=10, num_workers=0, save_every=steps, seed=cfg.seed,
                      model=ModelConfig(size="tiny", fusion="late", objectives={"contrastive": 1.0})),
          resume=(run / "config.json").is_file())
    return run


def _transfer(cfg: ExperimentConfig, run: Path, protocols: list[str], say: Say) -> dict[str, Any]:
    from mmtool.transfer.evaluate import TransferConfig, evaluate_transfer
    from mmtool.transfer.protocols import ProtocolConfig

    out = run / f"transfer-{'-'.join(protocols)}"
    return evaluate_transfer(TransferConfig(run=run, tasks=["digits"], protocols=protocols, out=out,
                                            protocol=ProtocolConfig(ks=(1, 5, 10), episodes=cfg.episodes,
                                                                    seed=cfg.seed)),
                             on_progress=say)["tasks"]["digits"]
