"""`mmtool ablate`: how much each modality matters to a trained model, with 95% confidence intervals.

For each modality present in the evaluation batches and each ablation mode (`mmtool ls ablations`):

* `drop` — the modality's tokens are removed from every sample that also has another modality;
  the other tokens keep their positions (the position embedding they had), so what changes is the
  information, not where the rest of the sample sits. (Renumbering them — dropping a leading image
  moves the caption to position 0 — measured mostly the shift: +1.7 nats on `known-answer` for a
  noise image that permuting shows the model ignores.)
* `permute` — the modality's tokens are swapped between samples of the same modality signature
  within the batch (a derangement: no sample keeps its own), so the input stays well-formed but no
  longer belongs to the rest of the sample — the perceptual-score ablation (Gat et al., 2021).
  Samples without a same-signature partner in their batch are left out of that comparison.

Two effects are measured on exactly the affected samples, ablated against intact:

* `loss` — the change in the self-supervised loss on the *remaining* modalities: Σ over the
  (objective, stream) groups of the other modalities of weight · mean loss (the model's objective
  weights). The corruption masks come from the same seed for the intact and ablated batch.
  With `drop`, next-token targets whose only context was the dropped tokens (a caption's first
  token after an image) leave the comparison too: read small drop deltas with that in mind.
* `accuracy` — when the data has labels: a linear probe (`transfer.protocols.probe`: `LogisticRegression`, fixed `C`,
  standardised features) is fit on the intact pooled features (`UnifiedModel.pooled`, label tokens
  left out) of a training share of the labelled samples, and scored on the held-out samples intact
  and ablated. For `permute` the same probe scores the ablated features (does the representation
  rely on the modality — the perceptual score); for `drop` a probe refit on the dropped features of
  the training share does (what the rest of the sample still tells — a fixed probe would mostly
  measure how far the pooled mean moved). Classes are (folder, label) pairs, so folders with their
  own label sets share one probe.

**Importance** = how much worse the ablated input is: the accuracy drop (intact − ablated) when
every ablation could be scored by the probe (labelled data), else the loss increase (ablated −
intact) for all — one metric per result, so the ranking compares like with like (`metric` forces
one). It is measured on the trained model **and on its untrained twin** (`untrained_twin`: the
same architecture with the run's initial weights) on the same batches, permutations, corruption
masks and held-out probe samples, and reported as trained − twin: an untrained model already
"depends" on its inputs (a probe reads digits off random features). 95% intervals are paired
bootstraps: whole batches resampled (loss), batches and then held-out samples within them
(accuracy, `hierarchical_ci`). Raw trained and twin values and intervals stay in the result.

**Ranking** (`rank`, by the first mode): only modalities whose importance interval lies above 0,
in order, ties (intervals overlapping the group leader's) grouped. The rest get a status:
structural zero (with the loss metric, when the modality cannot change the others' loss by
construction — `cannot_change_others`, read from the batch and the model's attention: no
cross-modal layer, or causal attention with the modality after every other in every sample),
negative, indistinguishable from 0, no interval (one batch), not measured.

Output: a JSON-ready dict (`ablate`); `mmtool.analysis.report.plot_ablation` draws the bar chart with error bars.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmtool.data.batch import Batch
from mmtool.data.batching import assemble
from mmtool.data.index import SEPARATOR, RunStreamIndex, Stream, TokenIndex
from mmtool.data.mixture import parse_data_specs
from mmtool.data.schema import SPLITS
from mmtool.errors import MMToolError
from mmtool.analysis.ablated_batches import ABLATIONS, ablated_orders, rebuild, sample_slots
from mmtool.analysis.importance import add_importance, fit_probe, rank, summarise  # noqa: F401  (rank re-exported)
from mmtool.train.rundir import untrained_twin  # noqa: F401  (re-exported)

NOT_INPUTS = ("label",)
"""Modalities that are answers, not inputs: never ablated by default, never seen by the linear probe."""



@dataclass
class AblateConfig:
    """An ablation job. Every field is a flag of `mmtool ablate`."""

    run: Path
    """Training run folder; its newest checkpoint is evaluated."""
    data: list[str] = field(default_factory=list)
    """Preprocessed folders to evaluate on (default: the run's own --data)."""
    modes: list[str] = field(default_factory=lambda: ["drop", "permute"])
    """Ablation modes (`mmtool ls ablations`); the first one ranks the modalities."""
    modalities: list[str] | None = None
    """Modalities to ablate (default: every one present except separators and `label` tokens,
    which are the answer rather than an input)."""
    batches: int = 20
    """Evaluation batches (the confidence intervals resample them)."""
    batch_samples: int = 32
    """Samples per evaluation batch."""
    split: str = "all"
    """Evaluate on samples of this split only: all, train, validation, test."""
    seed: int = 0
    """Sample order, permutations, corruption masks, probe split and bootstrap."""
    probe_c: float = 1.0
    """Inverse L2 strength of the linear probe (fixed, not tuned: the same probe for every ablation)."""
    test_share: float = 0.3
    """Share of the labelled samples the probe is scored on (the rest trains it)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the intervals."""
    twin: bool = True
    """Also measure the untrained twin (the run's initial weights) and report importance as
    trained − twin."""
    metric: str = "auto"
    """Importance metric: accuracy (probe accuracy drop), loss (remaining-modality loss increase),
    or auto (accuracy when every ablation could be scored by the probe, else loss)."""
    device: str = "cpu"
    """cpu or cuda."""


class _RunStreamIndex(RunStreamIndex):
    """The `--data` folders numbered with the run's streams (stream k means the model's encoder k)."""

    def unknown_stream(self, stream: Stream, known: str) -> str:
        return f"--data: stream {stream.key} is one the run never trained on (it knows {known})"

    def retokenized(self, stream: Stream, trained: Stream) -> str:
        return (f"--data: {stream.key} is tokenized with other settings than in the run; "
                "preprocess it with the run's --tokenizer options")


# -- measuring -----------------------------------------------------------------------------------
def remaining_keys(by_stream: dict[str, float], stream_modality: dict[str, str], dropped: str) -> set[str]:
    """The `by_stream` groups ("objective/stream", "contrastive/a+b") not involving modality `dropped`."""
    out = set()
    for key in by_stream:
        group = key.split("/", 1)[1]
        if dropped not in [stream_modality.get(g, g) for g in group.split("+")]:
            out.add(key)
    return out


def weighted_loss(by_stream: dict[str, float], weights: dict[str, float], keys: set[str]) -> float:
    """Σ objective weight · mean loss over the groups `keys`."""
    return float(sum(weights.get(k.split("/", 1)[0], 1.0) * by_stream[k] for k in keys))


def _folder_map(index: TokenIndex, run_folders: list[dict[str, Any]]) -> np.ndarray:
    """For each evaluation folder, the run's folder number (its task embedding): same path, else
    same folder name, else same sources; 0 when nothing matches. `run_folders`: the run's folder
    records (`RunInfo.folders`: path, name, sources), so the run's data need not exist."""
    out = []
    for f in index.folders:
        mine = Path(f.path).resolve()
        hit = next((i for i, r in enumerate(run_folders) if Path(r["path"]).resolve() == mine), None)
        if hit is None:
            hit = next((i for i, r in enumerate(run_folders) if Path(r["path"]).name == mine.name), None)
        if hit is None:
            srcs = set(f.manifest.get("sources", {}))
            hit = next((i for i, r in enumerate(run_folders) if srcs and set(r.get("sources") or []) == srcs),
                       None)
        out.append(hit or 0)
    return np.asarray(out, np.int64)


def _records_from_data(data: list[str]) -> list[dict[str, Any]]:
    """Folder records of `--data` entries whose manifests can be read (a model passed in directly)."""
    records = []
    for spec in parse_data_specs(data):
        try:
            sources = json.loads((Path(spec.path) / "manifest.json").read_text()).get("sources", {})
        except (OSError, ValueError):
            sources = {}
        records.append({"path": str(spec.path), "name": Path(spec.path).name, "sources": sorted(sources)})
    return records


def _eval_data(cfg: "AblateConfig", run_cfg: Any) -> list[str]:
    """`--data`, else the run's own data, which must still exist."""
    if cfg.data:
        return list(cfg.data)
    gone = [str(s.path) for s in parse_data_specs(list(run_cfg.data))
            if not (Path(s.path) / "manifest.json").is_file()]
    if gone:
        raise MMToolError(f"the run's data {', '.join(gone)} is gone (moved run?); give --data DIR: "
                          "a preprocessed folder with the run's streams")
    return list(run_cfg.data)


def _split_mask(index: TokenIndex, split: str) -> np.ndarray:
    if split == "all":
        return np.ones(len(index), bool)
    if split not in SPLITS:
        raise MMToolError(f"--split {split}: expected all, {', '.join(SPLITS)}")
    return index.split_mask([split])


# `untrained_twin` lives with the run folder (`mmtool.train.rundir`); imported here for ablate's callers.
def cannot_change_others(slot_mod: np.ndarray, slots: list[np.ndarray], m: int, causal: bool,
                         cross: bool) -> bool:
    """True when, by construction, modality `m` cannot change the other modalities' loss in these
    samples: no layer lets tokens of different modalities attend to each other (`cross` False: late
    fusion), or attention is causal and in every sample every token of `m` comes after every token
    of the other (non-separator) modalities. `slot_mod` is -1 for separators."""
    if not cross:
        return True
    if not causal:
        return False
    for s in slots:
        mods = slot_mod[s]
        is_m, other = mods == m, (mods >= 0) & (mods != m)
        if is_m.any() and other.any() and np.flatnonzero(other).max() > np.flatnonzero(is_m).min():
            return False
    return True


def _check_flags(cfg: AblateConfig) -> None:
    for mode in cfg.modes:
        ABLATIONS.get(mode)
    if not cfg.modes:
        raise MMToolError("--modes: give at least one of drop, permute")
    if cfg.batches < 1 or cfg.batch_samples < 2:
        raise MMToolError("--batches must be ≥ 1 and --batch-samples ≥ 2")
    if cfg.metric not in ("auto", "loss", "accuracy"):
        raise MMToolError(f"--metric {cfg.metric}: expected auto, loss or accuracy")


def _plan_batches(cfg: AblateConfig, index: TokenIndex) -> tuple[np.random.Generator, list[np.ndarray], np.ndarray]:
    """(the ablation generator, the evaluation batches' samples, bool [N] held out for the probe).

    Batches: a seeded permutation of the split's samples, `batch_samples` at a time (at least 2 each).
    The probe split: a fixed, seeded share `test_share` of the samples, scored but never fitted on.
    """
    rng = np.random.default_rng(cfg.seed)
    pool = np.flatnonzero(_split_mask(index, cfg.split))
    if len(pool) < 2:
        raise MMToolError(f"--data has {len(pool)} sample(s) in split {cfg.split!r}; need at least 2")
    order = rng.permutation(pool)[:cfg.batches * cfg.batch_samples]
    plans = [order[i:i + cfg.batch_samples] for i in range(0, len(order), cfg.batch_samples)]
    plans = [p for p in plans if len(p) >= 2]
    held = np.random.default_rng(cfg.seed + 1).random(len(index)) < cfg.test_share  # [N]
    return rng, plans, held


def _load_run(cfg: AblateConfig, model: Any, run_cfg: Any) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(model in eval mode, its run config, the run's folder records): the run folder's newest
    checkpoint, or the `model` and `run_cfg` given (whose folders are read from their --data)."""
    from mmtool.train.rundir import load_model

    if model is None:  # the run folder alone; data is read from --data (else the run's own)
        model, run_cfg, info = load_model(cfg.run, device=cfg.device)
        run_folders = info.folders
    else:
        run_folders = _records_from_data(list(run_cfg.data))
    model.eval()
    return model, run_cfg, run_folders


def _check_modalities(want: list[str] | None, names: list[str]) -> None:
    unknown = sorted(set(want or []) - set(names))
    if unknown:
        raise MMToolError(f"--modalities {','.join(unknown)}: the run has no such modality "
                          f"(it has {', '.join(n for n in names if n != SEPARATOR)})")


class _Gatherer:
    """The evaluation loop's raw measurements, per model ("trained", "twin"): the intact pooled
    features of every evaluated sample, and per (modality, mode) ablation the affected samples'
    remaining-modality losses (intact and ablated) and ablated features. The trained model
    (`models["trained"]`) defines the modalities, streams and fusion; the twin shares them."""

    def __init__(self, cfg: AblateConfig, models: dict[str, Any], index: TokenIndex, fmap: np.ndarray):
        self.cfg, self.models, self.index, self.fmap = cfg, models, index, fmap
        model = models["trained"]
        self.device = next(model.parameters()).device
        self.names = list(model.modalities)
        self.mod_of_stream = model.modality_of_stream.cpu().numpy()
        self.sep = self.names.index(SEPARATOR) if SEPARATOR in self.names else -1
        self.stream_modality = {s.key: s.modality for s in model.streams}
        self.causal = model.causal
        self.cross = any(kind == "sample" for _, kind in model.fusion.phases())
        self.answer = [i for i, n in enumerate(self.names) if n in NOT_INPUTS]
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.feats_intact: dict[str, dict[int, np.ndarray]] = {w: {} for w in models}
        self.ablated_feats: dict[str, dict[tuple[str, str], list[tuple[int, int, np.ndarray]]]] = \
            {w: {} for w in models}
        self.present: set[str] = set()

    def forward(self, net: Any, batch: Batch, seed: int) -> dict[str, float]:
        gen = torch.Generator().manual_seed(seed)
        return net(batch.to(self.device), generator=gen).by_stream

    def features(self, net: Any, batch: Batch) -> np.ndarray:
        """[B, d] pooled features without label tokens (they would give the probe the answer)."""
        stream = batch.numpy("slot_stream")
        hide = np.isin(self.mod_of_stream[np.maximum(stream, 0)], self.answer) & (stream >= 0)
        if hide.any():
            slots = sample_slots(batch)
            batch = rebuild(batch, [s[~hide[s]] for s in slots], list(range(len(slots))))
        return net.pooled(batch.to(self.device)).float().cpu().numpy()

    def batch(self, bi: int, samples: np.ndarray, rng: np.random.Generator) -> None:
        """Measures evaluation batch `bi` (its samples, in order): intact, then every ablation."""
        batch = assemble(self.index, samples, "packed")
        batch["sample_folder"][:] = torch.from_numpy(self.fmap[batch.numpy("sample_folder")].astype(np.int32))
        for which, net in self.models.items():
            for s, f in zip(samples.tolist(), self.features(net, batch)):  # [B, d]
                self.feats_intact[which][s] = f
        slot_mod = self._slot_modalities(batch)
        sig = self.index.signature[samples]
        for m in self._targets(slot_mod):
            for mode in self.cfg.modes:
                self._ablation(bi, samples, batch, slot_mod, m, mode, sig, rng)

    def _slot_modalities(self, batch: Batch) -> np.ndarray:
        """[slots] modality number of each slot, -1 for separators."""
        stream = batch.numpy("slot_stream")
        slot_mod = np.where(stream >= 0, self.mod_of_stream[np.maximum(stream, 0)], -1)
        return np.where(slot_mod == self.sep, -1, slot_mod)

    def _targets(self, slot_mod: np.ndarray) -> list[int]:
        """The modalities of the batch to ablate: --modalities, else every input one (noted as present)."""
        want, out = self.cfg.modalities, []
        for m in sorted(set(slot_mod[slot_mod >= 0].tolist())):
            name = self.names[m]
            if (want and name not in want) or (not want and name in NOT_INPUTS):
                continue
            self.present.add(name)
            out.append(m)
        return out

    def _ablation(self, bi: int, samples: np.ndarray, batch: Batch, slot_mod: np.ndarray, m: int,
                  mode: str, sig: np.ndarray, rng: np.random.Generator) -> None:
        """One (modality `m`, mode) ablation of the batch, measured on every model."""
        name = self.names[m]
        chosen, intact, abl = ablated_orders(batch, slot_mod, m, mode, sig, rng)
        if not chosen:
            return
        seed = self.cfg.seed * 1_000_003 + bi  # the same corruption masks intact/ablated, trained/twin
        a = rebuild(batch, intact, chosen)
        z = rebuild(batch, abl, chosen, keep_positions=ABLATIONS.get(mode).keep_positions)
        rec = self.records.setdefault((name, mode), {"samples": [], "no_loss": 0, "structural": True,
                                                     **{w: {"intact": [], "ablated": []} for w in self.models}})
        rec["samples"].append(len(chosen))
        rec["structural"] &= cannot_change_others(slot_mod, intact, m, self.causal, self.cross)
        ids = samples[np.asarray(chosen)]
        for which, net in self.models.items():
            self._losses(rec, which, net, a, z, name, seed)
            self.ablated_feats[which].setdefault((name, mode), []).extend(
                (bi, int(s), f) for s, f in zip(ids.tolist(), self.features(net, z)))

    def _losses(self, rec: dict[str, Any], which: str, net: Any, a: Batch, z: Batch, name: str,
                seed: int) -> None:
        """Appends the weighted loss of the modalities other than `name`, intact (`a`) and ablated (`z`)."""
        out_a, out_z = self.forward(net, a, seed), self.forward(net, z, seed)
        keys = remaining_keys(out_a, self.stream_modality, name) & set(out_z)  # same groups
        if not keys and which == "trained":  # nothing left to score (no objective)
            rec["no_loss"] += 1
        rec[which]["intact"].append(weighted_loss(out_a, net.weights, keys) if keys else np.nan)
        rec[which]["ablated"].append(weighted_loss(out_z, net.weights, keys) if keys else np.nan)


def _ranking(cfg: AblateConfig, results: dict[str, dict[str, Any]], models: list[str]
             ) -> tuple[list[str], list[list[str]], dict[str, list[list[str]]]]:
    """(ranking, tie groups, {"<model>_ranking_groups": each model's own groups, with a twin}) by the
    first mode's importance; sets each importance entry's `status`."""
    view = {n: results[n][cfg.modes[0]]["importance"] for n in results if cfg.modes[0] in results[n]}
    ranked, groups, status = rank(view)
    for n, s in status.items():
        view[n]["status"] = s
    alone_groups = {}
    if cfg.twin:  # what each model alone would rank (the twin's is what training must beat)
        for which in models:
            alone = {n: {"value": v[which], "ci95": v[f"{which}_ci95"], "structural_zero": v["structural_zero"]}
                     for n, v in view.items()}
            alone_groups[f"{which}_ranking_groups"] = rank(alone)[1]
    return ranked, groups, alone_groups


def _result(cfg: AblateConfig, data: list[str], plans: list[np.ndarray], held: np.ndarray,
            index: TokenIndex, g: _Gatherer) -> dict[str, Any]:
    """The JSON-ready result from the gathered measurements: probes, intervals, importance, ranking."""
    models = list(g.models)
    labels, folder = index.labels, index.sample_folder
    probes = {w: fit_probe(g.feats_intact[w], held, labels, folder, cfg.probe_c) for w in models}
    notes = [] if probes["trained"] is not None else \
        ["no accuracy: fewer than 10 labelled training samples or 2 classes"]

    boot = np.random.default_rng(cfg.seed + 2)
    results, diffs = summarise(g.records, models, probes, g.feats_intact, g.ablated_feats, held, labels,
                               folder, cfg.probe_c, cfg.bootstrap, boot)
    label = add_importance(results, diffs, models, cfg.metric, cfg.twin, cfg.bootstrap, boot)
    ranked, groups, alone_groups = _ranking(cfg, results, models)
    return {"run": str(cfg.run), "data": data, "settings": json_ready(asdict(cfg)),
            "modalities": sorted(g.present), "results": results, "ranking": ranked,
            "ranking_groups": groups, "ranking_mode": cfg.modes[0], "importance_metric": label,
            "baseline": "untrained twin" if cfg.twin else "none", "notes": notes,
            "batches": len(plans), "samples": int(sum(len(p) for p in plans)), **alone_groups}


def ablate(cfg: AblateConfig, model: Any = None, run_cfg: Any = None,
           on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Runs every (modality, mode) ablation on `cfg.batches` batches, on the trained model and (with
    `cfg.twin`) its untrained twin; returns the JSON-ready result.

    Args:
        cfg: the job. model, run_cfg: an already loaded run (tests, `mmtool sanity --steps 0`);
            default: `rundir.load_model(cfg.run)`. The twin is always built from `run_cfg` (`untrained_twin`).
        on_progress: called with (batches done, batches) after each batch.

    Raises:
        MMToolError: bad flags, a run that does not load, data with streams the run never saw,
            or fewer than 2 samples to evaluate.
    """
    _check_flags(cfg)
    model, run_cfg, run_folders = _load_run(cfg, model, run_cfg)
    models = {"trained": model}
    if cfg.twin:
        models["twin"] = untrained_twin(run_cfg, list(model.streams), next(model.parameters()).device)
    data = _eval_data(cfg, run_cfg)
    index = _RunStreamIndex([s.path for s in parse_data_specs(data)], model.streams)
    rng, plans, held = _plan_batches(cfg, index)
    _check_modalities(cfg.modalities, list(model.modalities))
    gathered = _Gatherer(cfg, models, index, _folder_map(index, run_folders))
    with torch.no_grad():
        for bi, samples in enumerate(plans):
            gathered.batch(bi, samples, rng)
            if on_progress:
                on_progress(bi + 1, len(plans))
    out = _result(cfg, data, plans, held, index, gathered)
    from mmtool.train.loggers import ablation_numbers, log_eval  # headline numbers → the run's trackers

    log_eval(cfg.run, None, ablation_numbers(out))
    return out


def json_ready(doc: Any) -> Any:
    return json.loads(json.dumps(doc, default=str))
