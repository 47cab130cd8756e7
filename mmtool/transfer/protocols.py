"""Transfer protocols: each scores a task with the pretrained model and with the scratch model.

Every protocol is registered in `PROTOCOLS` as a function `(Evaluation) → ProtocolResult` and runs
the *same* procedure, data, episodes and budget on both models ("pretrained" = the checkpoint,
"scratch" = the same architecture freshly initialised), so that their difference measures transfer:

* `linear-probe`: frozen `pooled` features → standardised → scikit-learn `LogisticRegression`; the
  inverse L2 strength C is chosen on the validation split over `C_GRID`, the probe is refitted on
  train + validation with that C, and scored on test. Repeated on a stratified fraction of the
  labelled data (train and validation alike) for the data-efficiency curve.
* `finetune`: the whole model plus a linear head on `pooled`, AdamW for a fixed number of steps
  (warmup then cosine decay), one run per learning rate of `LR_GRID`; the lr is chosen on
  validation and its test accuracy reported. Also per fraction.
* `kshot`: k labelled examples per class drawn from the train split, classifying validation ∪ test
  (k-shot selects nothing on validation, so its examples are queries too), `episodes` random draws (the same draws for both models); SimpleShot's CL2N
  nearest-centroid rule on frozen features (see `nearest_centroid`).
* `zeroshot`: no labelled data. Two variants, each a row when the checkpoint supports it:
  - *likelihood* (checkpoints with next-token on text, early/mid fusion): each test input is
    followed by each class's prompt ("a handwritten seven"); the class whose prompt gets the highest
    next-token log-likelihood (summed over its tokens; the prefix all prompts share is left out, as
    it scores alike for every class under causal attention) wins. "likelihood calibrated" first
    subtracts each prompt's mean log-likelihood over the validation inputs (labels unused),
    removing the model's prior for a class name ("calibrate before use").
  - *similarity* (checkpoints with the `contrastive` objective, CLIP's rule): each class prompt is
    embedded alone as a text-only sample, each test input alone (its one non-text modality), both as
    the contrastive head embeds them in training (mean final hidden state of the modality → the
    shared `proj` → L2-normalised); the class whose prompt vector has the highest cosine wins.
  Neither applies → "not applicable" with both reasons.

**Numbers you can trust.** Every row carries 95% bootstrap intervals for pretrained, scratch and
their *gain* (pretrained − scratch), the gain's interval from a paired resample (the same test
examples for both models), a `verdict` (better / worse / within noise: the gain interval contains
0), the raw `ratio` pretrained / scratch and the `chance_corrected_ratio`
(pretrained − chance) / (scratch − chance). Probe, fine-tune and zero-shot resample the test
examples; k-shot resamples test examples *and* episodes (`mmtool.stats.crossed_bootstrap`): with a
fixed test set, episodes alone give an interval that shrinks with more episodes while the test set's
own sampling error stays. Seeds derive from `--seed`, so the report is the same for a seed.
"""

from __future__ import annotations

import copy
import math
import zlib
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
from mmtool.stats import RESAMPLES, crossed_bootstrap, paired_bootstrap, verdict
from mmtool.transfer.tasks import TaskData

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Inverse L2 strengths the linear probe chooses from on validation."""
LR_GRID = (1e-4, 3e-4, 1e-3)
"""Learning rates fine-tuning chooses from on validation."""
MODELS = ("pretrained", "scratch")
CURVE_KEYS = ("pretrained", "pretrained_ci95", "scratch", "scratch_ci95", "gain", "gain_ci95")
"""Fields of a row that each data-efficiency curve point repeats."""


@dataclass
class ProtocolConfig:
    """The budget every protocol gives both models."""

    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    """Shares of the labelled train/validation data for the data-efficiency curve."""
    ks: tuple[int, ...] = (1, 5, 10)
    """k-shot: labelled examples per class (a k above the smallest class is skipped, unless --k
    named it: then it is an error)."""
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
    bootstrap: int = RESAMPLES
    """Bootstrap resamples behind every interval."""
    seed: int = 0
    """Seed of the split, subsets, episodes, fine-tuning and the scratch model."""
    device: str = "cpu"
    """cpu or cuda."""


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


def chance_corrected_ratio(pre: float, scratch: float, chance: float) -> float | None:
    """(pretrained − chance) / (scratch − chance): how many times scratch's gain over chance the
    pretrained model gets (None when scratch is at or below chance: no gain to compare with)."""
    return float((pre - chance) / (scratch - chance)) if scratch - chance > 1e-9 else None


def rng_for(cfg: ProtocolConfig, *tags: str | int) -> np.random.Generator:
    """A generator seeded by `--seed` and `tags` (stable across processes, unlike `hash`)."""
    return np.random.default_rng([cfg.seed, *(t if isinstance(t, int) else zlib.crc32(t.encode())
                                              for t in tags)])


def comparison(pair: dict[str, Any], chance: float) -> dict[str, Any]:
    """Row fields from a `paired_bootstrap`/`crossed_bootstrap` result (a = pretrained, b = scratch)."""
    pre, scratch = pair["a"], pair["b"]
    return {"pretrained": pre, "pretrained_ci95": pair["a_ci95"], "scratch": scratch,
            "scratch_ci95": pair["b_ci95"], "gain": pair["difference"],
            "gain_ci95": pair["difference_ci95"], "verdict": verdict(pair["difference_ci95"]),
            "ratio": ratio(pre, scratch), "chance_corrected_ratio": chance_corrected_ratio(pre, scratch, chance)}


def paired_row(ev: Evaluation, setting: str, correct: dict[str, np.ndarray], tag: str,
               **extra: Any) -> dict[str, Any]:
    """A report row from each model's per-test-example correctness [n_test] (paired bootstrap)."""
    pair = paired_bootstrap(correct["pretrained"], correct["scratch"], rng_for(ev.cfg, tag, setting),
                            ev.cfg.bootstrap)
    return {"setting": setting, **comparison(pair, ev.task.chance),
            "interval": f"95% paired bootstrap over the {len(correct['pretrained'])} test examples "
                        f"({ev.cfg.bootstrap} resamples)", **extra}


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
    train + validation, test accuracy. Returns {"test", "C", "val_by_C", "correct"} ("correct":
    bool [len(test)], whether each test example was classified right)."""
    val_by_c = {}
    for c in grid:
        val_by_c[c] = float(probe(c).fit(x[train], y[train]).score(x[val], y[val]))
    best = max(grid, key=lambda c: (val_by_c[c], -c))
    fit = np.concatenate([train, val])
    correct = probe(best).fit(x[fit], y[fit]).predict(x[test]) == y[test]
    return {"test": float(correct.mean()), "C": best,
            "val_by_C": {str(c): v for c, v in val_by_c.items()}, "correct": correct}


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
        correct = {}
        for which in MODELS:
            s = linear_probe_scores(ev.features(which), y, train, val, t.splits["test"], ev.cfg.cs)
            correct[which] = s.pop("correct")
            point[f"{which}_C"] = s["C"]
            if f == max(ev.cfg.fractions):
                res.detail[which] = s
        row = paired_row(ev, "" if f == 1 else f"fraction {f:g}", correct, "linear-probe")
        point.update({k: row[k] for k in CURVE_KEYS})
        res.curve.append(point)
    res.rows.append(row)
    return res


# -- fine-tuning ---------------------------------------------------------------------------------
@torch.no_grad()
def _correct(model: nn.Module, head: nn.Module, index: TokenIndex, samples: np.ndarray,
             labels: np.ndarray, cfg: ProtocolConfig) -> np.ndarray:
    """bool [len(samples)]: whether the fine-tuned model classifies each sample right."""
    model.eval()
    out = [np.zeros(0, bool)]
    for i in range(0, len(samples), cfg.feature_batch):
        part = samples[i:i + cfg.feature_batch]
        logits = head(model.pooled(assemble(index, part).to(cfg.device)).float())  # [b, C]
        out.append(logits.argmax(1).cpu().numpy() == labels[part])
    return np.concatenate(out)


def finetune_run(model: nn.Module, index: TokenIndex, labels: np.ndarray, train: np.ndarray,
                 evals: dict[str, np.ndarray], n_classes: int, lr: float,
                 cfg: ProtocolConfig) -> dict[str, np.ndarray]:
    """Fine-tunes a copy of `model` and a new linear head; per-sample correctness (bool) on each
    of `evals`."""
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
    return {k: _correct(m, head, index, v, labels, cfg) for k, v in evals.items()}


@PROTOCOLS.register("finetune")
def finetune(ev: Evaluation) -> ProtocolResult:
    """Whole model + linear head for a fixed step budget; lr chosen on validation from a small grid."""
    t, y = ev.task, ev.task.labels
    res = ProtocolResult()
    for f, train, val, point in _fraction_splits(ev):
        correct = {}
        for which in MODELS:
            runs = {lr: finetune_run(ev.models[which], t.index, y, train,
                                     {"val": val, "test": t.splits["test"]}, len(t.classes), lr, ev.cfg)
                    for lr in ev.cfg.lrs}
            val_acc = {lr: float(r["val"].mean()) for lr, r in runs.items()}
            best = max(ev.cfg.lrs, key=lambda lr: (val_acc[lr], -lr))
            correct[which] = runs[best]["test"]
            point[f"{which}_lr"] = best
            if f == max(ev.cfg.fractions):
                res.detail[which] = {"test": float(correct[which].mean()), "lr": best,
                                     "steps": ev.cfg.steps,
                                     "val_by_lr": {str(lr): v for lr, v in val_acc.items()}}
        row = paired_row(ev, "" if f == 1 else f"fraction {f:g}", correct, "finetune",
                         steps=ev.cfg.steps)
        point.update({k: row[k] for k in CURVE_KEYS})
        res.curve.append(point)
    res.rows.append(row)
    return res


# -- k-shot --------------------------------------------------------------------------------------
def nearest_centroid(x: np.ndarray, y: np.ndarray, support: np.ndarray, query: np.ndarray,
                     centre: np.ndarray) -> np.ndarray:
    """Predicted class of each `query` sample by SimpleShot's CL2N rule (Wang et al., 2019).

    Features are centred by `centre` (the mean feature of the labelled pool: no labels used) and
    L2-normalised; each class centroid is the mean of its normalised support features, and a query
    goes to the nearest centroid by Euclidean distance. Why this rule: it is the published baseline
    for few-shot classification on frozen features, and it is a true nearest-centroid classifier —
    ‖z − c‖² = 1 − 2 z·c + ‖c‖² weighs a centroid's length in both directions, where the dot product
    z·c alone (the old rule) lets a class whose support points agree (long centroid) win queries
    that are closer to another class, more so as k grows and centroids stop being unit vectors.

    Args:
        x: float [N, d] features of every sample; y: int [N] labels.
        support, query: sample numbers of the labelled support set and the samples to classify.
        centre: float [d] vector subtracted before normalising.

    Returns:
        int [len(query)] predicted labels.
    """
    z = x - centre
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)  # [N, d] unit vectors
    classes = np.unique(y[support])
    cents = np.stack([z[support[y[support] == c]].mean(0) for c in classes])  # [C, d]
    dist = (cents ** 2).sum(1)[None, :] - 2 * z[query] @ cents.T  # [Q, C] ‖z − c‖² − 1
    return classes[np.argmin(dist, axis=1)]


def centroid_accuracy(x: np.ndarray, y: np.ndarray, support: np.ndarray, query: np.ndarray,
                      centre: np.ndarray) -> float:
    """Accuracy of `nearest_centroid` on `query`."""
    return float((nearest_centroid(x, y, support, query, centre) == y[query]).mean())


def support_pool(task: TaskData) -> np.ndarray:
    """The samples k-shot draws support sets from: the train split."""
    return task.splits["train"]


def kshot_queries(task: TaskData) -> np.ndarray:
    """The samples k-shot classifies: validation ∪ test. k-shot tunes nothing on validation, so its
    examples serve as queries too; twice the queries make the interval ~1.4× narrower (on held-out
    digits, 144 queries instead of 72)."""
    return np.sort(np.concatenate([task.splits["validation"], task.splits["test"]]))


def feasible_ks(task: TaskData, cfg: ProtocolConfig) -> tuple[list[int], list[str]]:
    """The ks to run and notes on skipped ones; an explicit k above the smallest class is an error."""
    y = task.labels
    counts = np.bincount(y[support_pool(task)], minlength=len(task.classes))
    smallest = int(counts[counts > 0].min())
    too_big = [k for k in cfg.ks if k > smallest]
    if too_big and cfg.ks_given:
        raise MMToolError(f"--k {','.join(map(str, too_big))}: task {task.name}'s smallest class has "
                          f"only {smallest} train examples; use --k at most {smallest}")
    notes = [f"k={k} skipped: the smallest class has {smallest} train examples"
             for k in too_big]
    return [k for k in cfg.ks if k <= smallest], notes


@PROTOCOLS.register("kshot")
def kshot(ev: Evaluation) -> ProtocolResult:
    """k labelled examples per class, many episodes; SimpleShot (CL2N) nearest centroid, frozen features.

    The intervals resample episodes and test examples together (`crossed_bootstrap`)."""
    t, y, cfg = ev.task, ev.task.labels, ev.cfg
    ks, notes = feasible_ks(t, cfg)
    pool, test = support_pool(t), kshot_queries(t)
    res = ProtocolResult(detail={"notes": notes, "episodes": cfg.episodes, "support_pool": "train",
                                 "queries": "validation+test",
                                 "classifier": "nearest centroid, SimpleShot CL2N (centred, "
                                               "L2-normalised, Euclidean)"})
    by_class = [pool[y[pool] == c] for c in np.unique(y[pool])]
    for k in ks:
        correct = {w: np.zeros((cfg.episodes, len(test)), bool) for w in MODELS}  # [E, n_test]
        for e in range(cfg.episodes):
            rng = np.random.default_rng([cfg.seed, k, e])
            support = np.concatenate([rng.choice(m, k, replace=False) for m in by_class])
            for w in MODELS:
                x = ev.features(w)
                correct[w][e] = nearest_centroid(x, y, support, test, x[pool].mean(0)) == y[test]
        pair = crossed_bootstrap(correct["pretrained"], correct["scratch"], rng_for(cfg, "kshot", k),
                                 cfg.bootstrap)
        row = {"setting": f"k={k}", **comparison(pair, t.chance),
               "interval": f"95% bootstrap over {cfg.episodes} episodes × {len(test)} validation+test examples, "
                           f"both resampled ({cfg.bootstrap} resamples)"}
        res.rows.append(row)
        res.curve.append({"k": k, **{key: row[key] for key in CURVE_KEYS}})
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


def similarity_reason(model: nn.Module, task: TaskData) -> str:
    """Why the checkpoint cannot match inputs to prompts by embedding similarity ("" when it can)."""
    if "contrastive" not in model.objectives:
        return "the checkpoint was not trained with the contrastive objective"
    inputs = [m for m in task.modalities if m != "text"]
    if len(inputs) != 1:
        return f"needs exactly one non-text input modality to embed (the task's inputs: {', '.join(task.modalities)})"
    if inputs[0] not in model.modalities or "text" not in model.modalities:
        return f"the checkpoint has no {inputs[0]} and text modalities to compare"
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


@torch.no_grad()
def contrastive_embeddings(model: nn.Module, index: TokenIndex, samples: np.ndarray, modality: str,
                           cfg: ProtocolConfig) -> np.ndarray:
    """float64 [len(samples), d]: each sample's `modality` embedded as the contrastive objective
    embeds it in training — the mean of that modality's final hidden states, the shared `proj`,
    L2-normalised. Every sample must contain the modality."""
    model.eval()
    m = model.modalities.index(modality)
    proj = model.objectives["contrastive"].proj
    out = []
    for i in range(0, len(samples), cfg.feature_batch):
        batch = assemble(index, samples[i:i + cfg.feature_batch]).to(cfg.device)
        pools, present = model.modality_pools(batch)  # [B, M, d], [B, M]
        if not bool(present[:, m].all()):
            raise MMToolError(f"zeroshot similarity: a sample without {modality} tokens to embed")
        out.append(F.normalize(proj(pools[:, m]).float(), dim=-1).cpu().numpy())  # [B, d]
    return np.concatenate(out).astype(np.float64)


def _likelihood_rows(ev: Evaluation, res: ProtocolResult) -> None:
    t = ev.task
    n_c, n_val = len(t.classes), len(t.splits["validation"])
    truth = t.labels[t.splits["test"]]
    raw, calibrated = {}, {}
    for w in MODELS:
        ll = prompt_loglik(ev.models[w], t.zeroshot_index, ev.cfg,
                           t.info["zeroshot_shared_prefix_tokens"]).reshape(-1, n_c)  # [n_val+n_test, C]
        prior, test = ll[:n_val].mean(0), ll[n_val:]  # [C] mean score of each prompt; [n_test, C]
        raw[w] = test.argmax(1) == truth  # [n_test]
        calibrated[w] = (test - prior).argmax(1) == truth
        res.detail["predicted_classes"][f"likelihood/{w}"] = np.bincount(test.argmax(1), minlength=n_c).tolist()
    res.rows.append(paired_row(ev, "likelihood", raw, "zeroshot"))
    res.rows.append(paired_row(ev, "likelihood calibrated", calibrated, "zeroshot"))


def _similarity_rows(ev: Evaluation, res: ProtocolResult) -> None:
    t = ev.task
    test = t.splits["test"]
    modality = next(m for m in t.modalities if m != "text")
    correct = {}
    for w in MODELS:
        prompts = contrastive_embeddings(ev.models[w], t.prompt_index, np.arange(len(t.classes)),
                                         "text", ev.cfg)  # [C, d]
        inputs = contrastive_embeddings(ev.models[w], t.index, test, modality, ev.cfg)  # [n_test, d]
        pred = (inputs @ prompts.T).argmax(1)  # [n_test] the prompt of highest cosine
        correct[w] = pred == t.labels[test]
        res.detail["predicted_classes"][f"similarity/{w}"] = np.bincount(pred, minlength=len(t.classes)).tolist()
    res.rows.append(paired_row(ev, "similarity", correct, "zeroshot"))


@PROTOCOLS.register("zeroshot")
def zeroshot(ev: Evaluation) -> ProtocolResult:
    """Class prompts ranked by next-token likelihood (next-token) or embedding cosine (contrastive).

    No labelled data. Rows: "likelihood" and "likelihood calibrated" when the checkpoint predicts
    text tokens with early/mid fusion; "similarity" when it was trained with `contrastive`."""
    t, model = ev.task, ev.models["pretrained"]
    reasons = {"likelihood": t.zeroshot_reason or zeroshot_reason(model),
               "similarity": t.zeroshot_reason or similarity_reason(model, t)}
    if all(reasons.values()):
        reason = reasons["likelihood"] if reasons["likelihood"] == reasons["similarity"] else \
            "; ".join(f"{k}: {v}" for k, v in reasons.items())
        return ProtocolResult(applicable=False, reason=reason)
    res = ProtocolResult(detail={"prompt": t.info.get("zeroshot_prompt"), "predicted_classes": {},
                                 "not_applicable": {k: v for k, v in reasons.items() if v}})
    if not reasons["likelihood"]:
        _likelihood_rows(ev, res)
    if not reasons["similarity"]:
        _similarity_rows(ev, res)
    return res
