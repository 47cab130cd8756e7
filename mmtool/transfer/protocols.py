"""Transfer protocols: each scores a task with the pretrained model and with the scratch model.

Every protocol is registered in `PROTOCOLS` as a function `(Evaluation) → ProtocolResult` and runs
the *same* procedure, data, episodes and budget on both models ("pretrained" = the checkpoint,
"scratch" = the same architecture freshly initialised), so that their ratio measures transfer:

* `linear-probe`: frozen `pooled` features → standardised → scikit-learn `LogisticRegression`; the
  inverse L2 strength C is chosen on the validation split over `C_GRID`, the probe is refitted on
  train + validation with that C, and scored on test. Repeated on a stratified fraction of the
  labelled data (train and validation alike) for the data-efficiency curve.
* `finetune`: the whole model plus a linear head on `pooled`, AdamW for a fixed number of steps
  (warmup then cosine decay), one run per learning rate of `LR_GRID`; the lr is chosen on
  validation and its test accuracy reported. Also per fraction.
* `kshot`: k labelled training examples per class, `episodes` random draws (the same draws for both
  models); nearest class centroid on frozen features (centred by the mean training feature, then
  L2-normalised — SimpleShot); test accuracy as mean ± 95% t-interval, and the paired difference.
* `zeroshot`: each test input is followed by each class's prompt ("a handwritten seven"); the class
  whose prompt gets the highest next-token log-likelihood (summed over its tokens; the prefix all
  prompts share is left out, as it scores alike for every class under causal attention) wins. A second
  row, "calibrated", first subtracts each prompt's mean log-likelihood over the validation inputs
  (labels unused), removing the model's prior for a class name ("calibrate before use"). Applies
  only when the checkpoint predicts text tokens (next-token on a text stream) and text attends to
  the other modalities in the last layer (early or mid fusion); otherwise "not applicable".
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex
from mmtool.errors import MMToolError
from mmtool.registry import Registry
from mmtool.transfer.tasks import TaskData

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Inverse L2 strengths the linear probe chooses from on validation."""
LR_GRID = (1e-4, 3e-4, 1e-3)
"""Learning rates fine-tuning chooses from on validation."""
MODELS = ("pretrained", "scratch")


@dataclass
class ProtocolConfig:
    """The budget every protocol gives both models."""

    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    """Shares of the labelled train/validation data for the data-efficiency curve."""
    ks: tuple[int, ...] = (1, 5, 10)
    """k-shot: labelled examples per class."""
    ks_given: bool = False
    """ks came from the user (a k above the smallest class is then an error, not skipped)."""
    episodes: int = 100
    """k-shot episodes per k."""
    steps: int = 100
    """Fine-tuning optimizer steps per run."""
    lrs: tuple[float, ...] = LR_GRID
    """Fine-tuning learning rates, chosen on validation."""
    cs: tuple[float, ...] = C_GRID
    """Linear-probe inverse L2 strengths, chosen on validation."""
    batch_size: int = 32
    """Fine-tuning batch size (samples)."""
    feature_batch: int = 256
    """Samples per forward pass when extracting features or scoring."""
    seed: int = 0
    device: str = "cpu"


@dataclass
class Evaluation:
    """One task and both models, with their frozen features computed once."""

    task: TaskData
    models: dict[str, nn.Module]
    cfg: ProtocolConfig
    _features: dict[str, np.ndarray] = field(default_factory=dict)

    def features(self, which: str) -> np.ndarray:
        """float64 [N, d] pooled features of every task sample (index order) from model `which`."""
        if which not in self._features:
            self._features[which] = pooled_features(self.models[which], self.task.index,
                                                    np.arange(len(self.task.index)), self.cfg)
        return self._features[which]


@dataclass
class ProtocolResult:
    """Rows of the report table, the data-efficiency curve, and the details behind them."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    applicable: bool = True
    reason: str = ""


PROTOCOLS: Registry[Callable[[Evaluation], ProtocolResult]] = Registry(
    "protocols", "eval-transfer protocols, each run on the pretrained and the scratch model")


def ratio(pre: float, scratch: float) -> float | None:
    """pretrained / scratch (None when the scratch score is 0)."""
    return float(pre / scratch) if scratch > 0 else None


def _row(setting: str, pre: float, scratch: float, **extra: Any) -> dict[str, Any]:
    return {"setting": setting, "pretrained": float(pre), "scratch": float(scratch),
            "ratio": ratio(pre, scratch), **extra}


# -- features ------------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(model: nn.Module, index: TokenIndex, samples: np.ndarray,
                    cfg: ProtocolConfig) -> np.ndarray:
    """float64 [len(samples), d]: `model.pooled` of each sample, in eval mode, in fixed-size batches."""
    model.eval()
    out = []
    for i in range(0, len(samples), cfg.feature_batch):
        batch = assemble(index, samples[i:i + cfg.feature_batch]).to(cfg.device)
        out.append(model.pooled(batch).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def stratified_subset(samples: np.ndarray, labels: np.ndarray, fraction: float,
                      rng: np.random.Generator) -> np.ndarray:
    """A `fraction` of `samples` drawn per class (at least one of each class), sorted."""
    if fraction >= 1.0:
        return samples
    keep = []
    for c in np.unique(labels[samples]):
        mine = samples[labels[samples] == c]
        n = max(int(round(len(mine) * fraction)), 1)
        keep.append(rng.choice(mine, n, replace=False))
    return np.sort(np.concatenate(keep))


# -- linear probe --------------------------------------------------------------------------------
def probe(c: float):
    """The probe for inverse L2 strength `c`: standardisation then multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))


def linear_probe_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                        test: np.ndarray, grid: tuple[float, ...] = C_GRID) -> dict[str, Any]:
    """C chosen on validation (first best: the strongest regularisation among ties), refit on
    train + validation, test accuracy. Returns {"test", "C", "val_by_C"}."""
    val_by_c = {}
    for c in grid:
        val_by_c[c] = float(probe(c).fit(x[train], y[train]).score(x[val], y[val]))
    best = max(grid, key=lambda c: (val_by_c[c], -c))
    fit = np.concatenate([train, val])
    test_acc = float(probe(best).fit(x[fit], y[fit]).score(x[test], y[test]))
    return {"test": test_acc, "C": best, "val_by_C": {str(c): v for c, v in val_by_c.items()}}


def _fraction_splits(ev: Evaluation):
    """For each data fraction: (fraction, train subset, validation subset, curve point), seeded.

    Train and validation are subsampled by the same fraction (stratified), the test set never.
    """
    t, y = ev.task, ev.task.labels
    for f in ev.cfg.fractions:
        rng = np.random.default_rng([ev.cfg.seed, int(round(f * 1e6))])
        train = stratified_subset(t.splits["train"], y, f, rng)
        val = stratified_subset(t.splits["validation"], y, f, rng)
        yield f, train, val, {"fraction": f, "train": int(len(train)), "validation": int(len(val))}


@PROTOCOLS.register("linear-probe")
def linear_probe(ev: Evaluation) -> ProtocolResult:
    """Logistic regression on frozen pooled features; C tuned on validation; refit on train+val."""
    t, y = ev.task, ev.task.labels
    res = ProtocolResult()
    for f, train, val, point in _fraction_splits(ev):
        for which in MODELS:
            s = linear_probe_scores(ev.features(which), y, train, val, t.splits["test"], ev.cfg.cs)
            point[which] = s["test"]
            point[f"{which}_C"] = s["C"]
            if f == max(ev.cfg.fractions):
                res.detail[which] = s
        res.curve.append(point)
    top = res.curve[-1]
    res.rows.append(_row("" if top["fraction"] == 1 else f"fraction {top['fraction']:g}",
                         top["pretrained"], top["scratch"]))
    return res


# -- fine-tuning ---------------------------------------------------------------------------------
@torch.no_grad()
def _accuracy(model: nn.Module, head: nn.Module, index: TokenIndex, samples: np.ndarray,
              labels: np.ndarray, cfg: ProtocolConfig) -> float:
    model.eval()
    right = 0
    for i in range(0, len(samples), cfg.feature_batch):
        part = samples[i:i + cfg.feature_batch]
        logits = head(model.pooled(assemble(index, part).to(cfg.device)).float())  # [b, C]
        right += int((logits.argmax(1).cpu().numpy() == labels[part]).sum())
    return right / max(len(samples), 1)


def finetune_run(model: nn.Module, index: TokenIndex, labels: np.ndarray, train: np.ndarray,
                 evals: dict[str, np.ndarray], n_classes: int, lr: float,
                 cfg: ProtocolConfig) -> dict[str, float]:
    """Fine-tunes a copy of `model` and a new linear head; accuracy on each of `evals`."""
    torch.manual_seed(cfg.seed)
    m = copy.deepcopy(model).to(cfg.device).train()
    head = nn.Linear(m.size.d_model, n_classes).to(cfg.device)
    params = list(m.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(cfg.steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + math.cos(math.pi * min(max(s + 1 - warm, 0) / max(cfg.steps - warm, 1), 1.0)))))
    rng = np.random.default_rng([cfg.seed, 7])
    target = torch.from_numpy(labels).to(cfg.device)
    for _ in range(cfg.steps):
        b = rng.choice(train, min(cfg.batch_size, len(train)), replace=False)
        logits = head(m.pooled(assemble(index, b).to(cfg.device)).float())  # [b, C]
        loss = F.cross_entropy(logits, target[torch.from_numpy(b).to(cfg.device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if not torch.isfinite(loss):
            break  # a diverged lr: its validation accuracy rules it out
    return {k: _accuracy(m, head, index, v, labels, cfg) for k, v in evals.items()}


@PROTOCOLS.register("finetune")
def finetune(ev: Evaluation) -> ProtocolResult:
    """Whole model + linear head for a fixed step budget; lr chosen on validation from a small grid."""
    t, y = ev.task, ev.task.labels
    res = ProtocolResult()
    for f, train, val, point in _fraction_splits(ev):
        for which in MODELS:
            runs = {lr: finetune_run(ev.models[which], t.index, y, train,
                                     {"val": val, "test": t.splits["test"]}, len(t.classes), lr, ev.cfg)
                    for lr in ev.cfg.lrs}
            best = max(ev.cfg.lrs, key=lambda lr: (runs[lr]["val"], -lr))
            point[which] = runs[best]["test"]
            point[f"{which}_lr"] = best
            if f == max(ev.cfg.fractions):
                res.detail[which] = {"test": runs[best]["test"], "lr": best, "steps": ev.cfg.steps,
                                     "val_by_lr": {str(lr): r["val"] for lr, r in runs.items()}}
        res.curve.append(point)
    top = res.curve[-1]
    res.rows.append(_row("" if top["fraction"] == 1 else f"fraction {top['fraction']:g}",
                         top["pretrained"], top["scratch"], steps=ev.cfg.steps))
    return res


# -- k-shot --------------------------------------------------------------------------------------
def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval of the mean)."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def centroid_accuracy(x: np.ndarray, y: np.ndarray, support: np.ndarray, query: np.ndarray,
                      centre: np.ndarray) -> float:
    """Nearest class centroid (cosine, after subtracting `centre`) accuracy on `query`."""
    z = x - centre
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    classes = np.unique(y[support])
    cents = np.stack([z[support[y[support] == c]].mean(0) for c in classes])  # [C, d]
    pred = classes[np.argmax(z[query] @ cents.T, axis=1)]
    return float((pred == y[query]).mean())


def feasible_ks(task: TaskData, cfg: ProtocolConfig) -> tuple[list[int], list[str]]:
    """The ks to run and notes on skipped ones; an explicit k above the smallest class is an error."""
    y = task.labels
    counts = np.bincount(y[task.splits["train"]], minlength=len(task.classes))
    smallest = int(counts[counts > 0].min())
    too_big = [k for k in cfg.ks if k > smallest]
    if too_big and cfg.ks_given:
        raise MMToolError(f"--k {','.join(map(str, too_big))}: task {task.name}'s smallest class has "
                          f"only {smallest} training examples; use --k at most {smallest}")
    notes = [f"k={k} skipped: the smallest class has {smallest} training examples" for k in too_big]
    return [k for k in cfg.ks if k <= smallest], notes


@PROTOCOLS.register("kshot")
def kshot(ev: Evaluation) -> ProtocolResult:
    """k labelled examples per class, many episodes; nearest centroid on frozen features; mean ± 95% CI."""
    t, y, cfg = ev.task, ev.task.labels, ev.cfg
    ks, notes = feasible_ks(t, cfg)
    res = ProtocolResult(detail={"notes": notes, "episodes": cfg.episodes, "classifier": "nearest centroid"})
    train, test = t.splits["train"], t.splits["test"]
    by_class = [train[y[train] == c] for c in np.unique(y[train])]
    for k in ks:
        accs = {w: np.zeros(cfg.episodes) for w in MODELS}
        for e in range(cfg.episodes):
            rng = np.random.default_rng([cfg.seed, k, e])
            support = np.concatenate([rng.choice(m, k, replace=False) for m in by_class])
            for w in MODELS:
                x = ev.features(w)
                accs[w][e] = centroid_accuracy(x, y, support, test, x[train].mean(0))
        (pm, pci), (sm, sci) = mean_ci95(accs["pretrained"]), mean_ci95(accs["scratch"])
        dm, dci = mean_ci95(accs["pretrained"] - accs["scratch"])
        res.rows.append(_row(f"k={k}", pm, sm, pretrained_ci95=pci, scratch_ci95=sci,
                             difference=dm, difference_ci95=dci))
        res.curve.append({"k": k, "pretrained": pm, "pretrained_ci95": pci, "scratch": sm,
                          "scratch_ci95": sci})
    return res


# -- zero-shot -----------------------------------------------------------------------------------
def zeroshot_reason(model: nn.Module) -> str:
    """Why the checkpoint cannot score prompts by likelihood ("" when it can)."""
    nt = model.objectives["next-token"] if "next-token" in model.objectives else None
    if nt is None:
        return "the checkpoint was not trained with next-token prediction"
    if not any(model.streams[k].modality == "text" for k in nt.targets):
        return "the checkpoint does not predict text tokens"
    if model.fusion.final != "sample":
        return f"{model.cfg.fusion} fusion: text never attends to the other modalities in the last layer"
    return ""


@torch.no_grad()
def prompt_loglik(model: nn.Module, index: TokenIndex, cfg: ProtocolConfig, skip: int = 0) -> np.ndarray:
    """float64 [N]: Σ log p(text token | everything before it) over each sample's text tokens,
    leaving out the first `skip` tokens of each text segment (a prefix every prompt shares)."""
    model.eval()
    text = [k for k in model.objectives["next-token"].targets if model.streams[k].modality == "text"]
    out = []
    for i in range(0, len(index), cfg.feature_batch):
        batch = assemble(index, np.arange(i, min(i + cfg.feature_batch, len(index)))).to(cfg.device)
        hidden, view = model.hidden_states(batch)  # [N, d]
        score = torch.zeros(batch.batch_size, dtype=torch.float64, device=hidden.device)
        for k in text:
            if k not in batch.streams:
                continue
            idx = view.packed(batch[f"s{k}.slot"])  # [n_k] rows of the text tokens
            # A sample's first token has nothing before it; a shared prefix cannot change the ranking.
            ok = (view.pos[idx] > 0) & (batch[f"s{k}.pos"].long() >= skip)
            idx = idx[ok]
            head = model.embedder.encoders[str(k)].head_weight  # [V, d]
            logp = F.log_softmax((hidden[idx - 1] @ head.T).float(), dim=1)  # [n, V]
            target = batch[f"s{k}.ids"].long()[ok]
            score.index_add_(0, view.sample[idx], logp.gather(1, target[:, None])[:, 0].double())
        out.append(score.cpu().numpy())
    return np.concatenate(out)


@PROTOCOLS.register("zeroshot")
def zeroshot(ev: Evaluation) -> ProtocolResult:
    """Score each class's prompt after the input by next-token likelihood; no labelled data used."""
    t = ev.task
    reason = t.zeroshot_reason or zeroshot_reason(ev.models["pretrained"])
    if reason or t.zeroshot_index is None:
        return ProtocolResult(applicable=False, reason=reason or "no zero-shot candidates")
    n_c, n_val = len(t.classes), len(t.splits["validation"])
    truth = t.labels[t.splits["test"]]
    res = ProtocolResult(detail={"prompt": t.info.get("zeroshot_prompt"), "predicted_classes": {}})
    raw, calibrated = {}, {}
    for w in MODELS:
        ll = prompt_loglik(ev.models[w], t.zeroshot_index, ev.cfg,
                           t.info["zeroshot_shared_prefix_tokens"]).reshape(-1, n_c)  # [n_val+n_test, C]
        prior, test = ll[:n_val].mean(0), ll[n_val:]  # [C] mean score of each prompt; [n_test, C]
        raw[w] = float((test.argmax(1) == truth).mean())
        calibrated[w] = float(((test - prior).argmax(1) == truth).mean())
        res.detail["predicted_classes"][w] = np.bincount(test.argmax(1), minlength=n_c).tolist()
    res.rows.append(_row("", raw["pretrained"], raw["scratch"]))
    res.rows.append(_row("calibrated", calibrated["pretrained"], calibrated["scratch"]))
    return res
