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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmtool.io import atomic_write_json
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
        (cfg.workdir / r.name).mkdir(exist_ok=True)
        atomic_write_json(cfg.workdir / r.name / "result.json", r.to_dict())
    return results


# -- shared pieces -------------------------------------------------------------------------------
CONTRASTIVE_STEPS = 200
"""Steps of the image–caption contrastive run (tiny model, 64 samples per step; ~20 s on 2 cores)."""


def _data(cfg: ExperimentConfig, source: str) -> Path:
    """A built-in source preprocessed into WORKDIR/data/SOURCE (reused when up to date)."""
    from mmtool.data.preprocess import PreprocessConfig, preprocess

    out = cfg.workdir / "data" / source
    preprocess(PreprocessConfig(source, out, num_proc=1))
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


def _interval(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_ci95"]
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


# -- the positive controls -----------------------------------------------------------------------
@EXPERIMENTS.register("control-transfer")
def control_transfer(cfg: ExperimentConfig, say: Say) -> list[ExperimentResult]:
    """k-shot on held-out digits: contrastive pretraining beats scratch at k = 1, 5, 10 (intervals > 0)."""
    run = contrastive_digits_run(cfg, say)
    entry = _transfer(cfg, run, ["kshot"], say)
    rows = {r["setting"]: r for r in entry["results"]["kshot"]["rows"]}
    res = ExperimentResult("control-transfer", settings={"run": str(run), "task": "digits",
                                                         "pretraining_saw": entry["pretraining_saw"]})
    res.numbers = {"chance": entry["chance"], "kshot": {}}
    for k in (1, 5, 10):
        row = rows.get(f"k={k}")
        if row is None:
            res.checks.append(Check(f"k={k}: pretrained beats scratch", False, "k-shot row missing"))
            continue
        res.numbers["kshot"][str(k)] = {key: row[key] for key in (
            "pretrained", "pretrained_ci95", "scratch", "scratch_ci95", "gain", "gain_ci95")}
        res.checks.append(Check(
            f"k={k}: pretrained beats scratch (gain interval above 0)", row["gain_ci95"][0] > 0,
            f"gain {_interval(row, 'gain')}; pretrained {_interval(row, 'pretrained')} vs scratch "
            f"{_interval(row, 'scratch')}"))
    return [res]


@EXPERIMENTS.register("control-zeroshot")
def control_zeroshot(cfg: ExperimentConfig, say: Say) -> list[ExperimentResult]:
    """Digits zero-shot by caption similarity after contrastive pretraining: far above chance."""
    run = contrastive_digits_run(cfg, say)
    entry = _transfer(cfg, run, ["zeroshot"], say)
    result = entry["results"]["zeroshot"]
    rows = {r["setting"]: r for r in result["rows"]}
    chance = entry["chance"]
    res = ExperimentResult("control-zeroshot", settings={"run": str(run), "task": "digits",
                                                         "pretraining_saw": entry["pretraining_saw"]})
    row = rows.get("similarity")
    if row is None:
        res.checks.append(Check("similarity zero-shot applies", False,
                                result.get("reason") or "no similarity row"))
        return [res]
    res.numbers = {"chance": chance,
                   "pretrained": {"accuracy": row["pretrained"], "ci95": row["pretrained_ci95"]},
                   "scratch": {"accuracy": row["scratch"], "ci95": row["scratch_ci95"]},
                   "gain": {"value": row["gain"], "ci95": row["gain_ci95"]}}
    res.checks = [
        Check("pretrained: far above chance (interval above 2 × chance)", row["pretrained_ci95"][0] > 2 * chance,
              f"{_interval(row, 'pretrained')}, chance {chance:.3f}"),
        Check("scratch: no better than chance would allow (interval reaches below 2 × chance)",
              row["scratch_ci95"][0] < 2 * chance, f"{_interval(row, 'scratch')}"),
        Check("pretrained beats scratch (gain interval above 0)", row["gain_ci95"][0] > 0,
              f"gain {_interval(row, 'gain')}"),
    ]
    return [res]


IMPORTANCE_STEPS = 40
"""Training steps of the known-answer run (as `mmtool sanity`)."""


@EXPERIMENTS.register("control-importance")
def control_importance(cfg: ExperimentConfig, say: Say) -> list[ExperimentResult]:
    """known-answer (only the image carries the label): trained passes `sanity`, untrained fails."""
    from mmtool.analysis.sanity import SanityConfig, known_answer_check

    steps = cfg.steps or IMPORTANCE_STEPS
    out = {}
    for name, n in (("trained", steps), ("untrained", 0)):
        say(f"known-answer check, {name} ({n} steps)")
        out[name] = known_answer_check(SanityConfig(workdir=cfg.workdir / f"sanity-{name}-s{cfg.seed}",
                                                    informative="image", steps=n, seed=cfg.seed),
                                       say=say)
    res = ExperimentResult("control-importance", settings={"informative": "image", "steps": steps})
    res.numbers = {w: {"passed": o["passed"], "checks": o["checks"]} for w, o in out.items()}
    failed_untrained = [c["check"] for c in out["untrained"]["checks"] if not c["passed"]]
    res.checks = [Check(f"trained: {c['check']}", c["passed"], c["detail"]) for c in out["trained"]["checks"]]
    res.checks.append(Check("untrained model fails the same check (it cannot pass without training)",
                            not out["untrained"]["passed"],
                            f"untrained fails: {'; '.join(failed_untrained) or 'nothing'}"))
    return [res]


@EXPERIMENTS.register("controls")
def controls(cfg: ExperimentConfig, say: Say) -> list[ExperimentResult]:
    """All positive controls: transfer, zero-shot and importance (one contrastive run shared)."""
    return [r for name in ("control-transfer", "control-zeroshot", "control-importance")
            for r in EXPERIMENTS.get(name)(cfg, say)]
