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
* `accuracy` — when the data has labels: a linear probe (sklearn `LogisticRegression`, fixed `C`,
  standardised features) is fit on the intact pooled features (`UnifiedModel.pooled`, label tokens
  left out) of a training share of the labelled samples, and scored on the held-out samples intact
  and ablated. For `permute` the same probe scores the ablated features (does the representation
  rely on the modality — the perceptual score); for `drop` a probe refit on the dropped features of
  the training share does (what the rest of the sample still tells — a fixed probe would mostly
  measure how far the pooled mean moved). Classes are (folder, label) pairs, so folders with their
  own label sets share one probe.

**Importance** = how much worse the ablated input is: the accuracy drop (intact − ablated) when
every ablation could be scored by the probe (labelled data), else the loss increase (ablated −
intact) for all — one metric per result, so the ranking compares like with like. Each is given with a 95% bootstrap interval
over batches (resampling whole batches; ratio of sums for accuracy). The modality ranking uses the
importance of the first mode.

Output: a JSON-ready dict (`ablate`); `mmtool.report.plot_ablation` draws the bar chart with error bars.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmtool.data.batch import Batch, BufferBuilder
from mmtool.data.batching import assemble
from mmtool.data.index import SEPARATOR, Stream, TokenIndex
from mmtool.data.mixture import parse_data_specs
from mmtool.errors import MMToolError
from mmtool.registry import Registry

NOT_INPUTS = ("label",)
"""Modalities that are answers, not inputs: never ablated by default, never seen by the linear probe."""

ABLATIONS: Registry[str] = Registry("ablations", "ablation modes of `mmtool ablate --modes`")
ABLATIONS.add("drop", "drop", "remove the modality's tokens from each sample that has another modality")
ABLATIONS.add("permute", "permute",
              "swap the modality's tokens between same-signature samples of a batch (no sample keeps its own)")


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
    device: str = "cpu"


class _RunStreamIndex(TokenIndex):
    """A `TokenIndex` numbered with the run's streams, so stream k means the model's encoder k."""

    def __init__(self, folders: list[Path], streams: list[Stream]):
        self._run_streams = streams
        super().__init__(folders, verify=False)

    def _merge_streams(self, folders, manifests) -> list[Stream]:
        known = {s.key: s for s in self._run_streams}
        for s in super()._merge_streams(folders, manifests):
            if s.key == SEPARATOR:
                continue
            if s.key not in known:
                raise MMToolError(f"--data: stream {s.key} is one the run never trained on (it knows "
                                  f"{', '.join(k for k in known if k != SEPARATOR)})")
            if known[s.key].config != s.config:
                raise MMToolError(f"--data: {s.key} is tokenized with other settings than in the run; "
                                  "preprocess it with the run's --tokenizer options")
        return [copy.copy(s) for s in self._run_streams]


# -- rebuilding batches ----------------------------------------------------------------------------
def rebuild(batch: Batch, orders: list[np.ndarray], keep: list[int], keep_positions: bool = False) -> Batch:
    """A new packed batch whose sample i is the slots `orders[i]` of `batch` (a packed host batch),
    in that order, carrying the folder, index and label of `batch`'s sample `keep[i]`.

    Slots may come from any sample (permutation) and may be left out (drop); each token keeps its
    stream, data and within-segment position. Positions in the sample (`slot_pos`, which the model
    embeds) are renumbered 0..n-1, or with `keep_positions` stay what they were, so that tokens
    left after a drop are where they were (the model reads `slot_pos`; attention and next-token
    order follow the row order, which is unchanged).
    """
    if batch.layout != "packed":
        raise MMToolError("rebuild needs a packed batch")
    keep = np.asarray(keep, np.int64)
    lens = np.array([len(o) for o in orders], np.int64)
    src = np.concatenate(orders).astype(np.int64) if len(orders) else np.zeros(0, np.int64)
    b, n = len(orders), int(lens.sum())
    starts = np.zeros(b, np.int64)
    if b > 1:
        np.cumsum(lens[:-1], out=starts[1:])
    slot_stream = batch.numpy("slot_stream")
    which = np.full(batch.num_slots, -1, np.int64)  # token number of each old slot in its stream
    for k in batch.streams:
        which[batch.numpy(f"s{k}.slot")] = np.arange(len(batch.numpy(f"s{k}.slot")))
    new_stream = slot_stream[src]  # [n]
    old_seg = batch.numpy("slot_segment")[src]  # [n]
    has = old_seg >= 0
    first = np.unique(old_seg[has], return_index=True)[1]  # first occurrence of each old segment
    seg_order = old_seg[has][np.sort(first)]  # old segments in order of appearance
    seg_new = np.full(max(int(batch.numpy("seg_stream").shape[0]), 1), -1, np.int64)
    seg_new[seg_order] = np.arange(len(seg_order))
    sample_of_new = np.repeat(np.arange(b), lens)  # [n]
    seg_sample = np.zeros(len(seg_order), np.int64)
    seg_sample[seg_new[old_seg[has]]] = sample_of_new[has]

    present = [k for k in batch.streams if (new_stream == k).any()]
    plan = BufferBuilder()
    for name, dtype, shape in (("slot_sample", np.int32, (n,)), ("slot_pos", np.int32, (n,)),
                               ("slot_stream", np.int32, (n,)), ("slot_segment", np.int32, (n,)),
                               ("cu_seqlens", np.int32, (b + 1,)), ("seqlens", np.int32, (b,)),
                               ("sample_folder", np.int32, (b,)), ("sample_index", np.int64, (b,)),
                               ("label", np.int64, (b,)), ("seg_sample", np.int32, (len(seg_order),)),
                               ("seg_stream", np.int32, (len(seg_order),))):
        plan.add(name, dtype, shape)
    rows = {}
    for k in present:
        rows[k] = np.flatnonzero(new_stream == k)  # new slots of stream k
        if f"s{k}.ids" in batch:
            plan.add(f"s{k}.ids", np.int32, (len(rows[k]),))
        elif f"s{k}.values" in batch:
            plan.add(f"s{k}.values", np.float32, (len(rows[k]), batch[f"s{k}.values"].shape[1]))
        plan.add(f"s{k}.slot", np.int32, (len(rows[k]),))
        plan.add(f"s{k}.pos", np.int32, (len(rows[k]),))
    buf, v = plan.allocate()
    v["slot_sample"][:] = sample_of_new
    v["slot_pos"][:] = batch.numpy("slot_pos")[src] if keep_positions else np.arange(n) - np.repeat(starts, lens)
    v["slot_stream"][:] = new_stream
    v["slot_segment"][:] = np.where(has, seg_new[np.maximum(old_seg, 0)], -1)
    v["cu_seqlens"][:-1], v["cu_seqlens"][-1] = starts, n
    v["seqlens"][:] = lens
    for name in ("sample_folder", "sample_index", "label"):
        v[name][:] = batch.numpy(name)[keep]
    v["seg_sample"][:] = seg_sample
    v["seg_stream"][:] = batch.numpy("seg_stream")[seg_order]
    for k in present:
        tok = which[src[rows[k]]]  # token numbers in the old stream arrays
        for part in ("ids", "values"):
            if f"s{k}.{part}" in batch:
                v[f"s{k}.{part}"][:] = batch.numpy(f"s{k}.{part}")[tok]
        v[f"s{k}.slot"][:] = rows[k]
        v[f"s{k}.pos"][:] = batch.numpy(f"s{k}.pos")[tok]
    return Batch.from_numpy(buf, plan.specs, "packed", tuple(present))


def sample_slots(batch: Batch) -> list[np.ndarray]:
    """The slots of each sample of a packed batch."""
    cu = batch.numpy("cu_seqlens")
    return [np.arange(cu[i], cu[i + 1]) for i in range(batch.batch_size)]


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (n ≥ 2): a random cycle."""
    order = rng.permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, -1)
    return out


def ablated_orders(batch: Batch, modality_of_slot: np.ndarray, m: int, mode: str,
                   signature: np.ndarray, rng: np.random.Generator
                   ) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """(affected samples, their intact slot orders, their ablated slot orders) for modality `m`.

    Affected: samples with modality `m` and at least one other non-separator modality (and, for
    permute, a same-signature partner in the batch). `modality_of_slot` is -1 for separators.
    """
    slots = sample_slots(batch)
    is_m = [modality_of_slot[s] == m for s in slots]
    other = [((modality_of_slot[s] != m) & (modality_of_slot[s] >= 0)).any() for s in slots]
    cand = [i for i in range(len(slots)) if is_m[i].any() and other[i]]
    if mode == "drop":
        return cand, [slots[i] for i in cand], [slots[i][~is_m[i]] for i in cand]
    if mode != "permute":
        raise MMToolError(f"unknown ablation mode {mode!r}")
    chosen, ablated = [], []
    sig = signature[cand] if cand else np.zeros(0, np.int64)
    donor: dict[int, int] = {}
    for s in np.unique(sig):
        group = [cand[j] for j in np.flatnonzero(sig == s)]
        if len(group) < 2:
            continue
        for a, d in zip(group, np.asarray(group)[derangement(len(group), rng)]):
            donor[a] = int(d)
    for i in cand:
        if i not in donor:
            continue
        mine, theirs = slots[i], slots[donor[i]][is_m[donor[i]]]
        if int(is_m[i].sum()) == len(theirs):  # same count: slot for slot (keeps interleaving)
            new = mine.copy()
            new[is_m[i]] = theirs
        else:  # a block of another length where this sample's first such token was
            p = int(np.argmax(is_m[i]))
            rest = mine[~is_m[i]]
            new = np.concatenate([rest[:p], theirs, rest[p:]])
        chosen.append(i)
        ablated.append(new)
    return chosen, [slots[i] for i in chosen], ablated


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


def bootstrap_ci(num: np.ndarray, den: np.ndarray | None, rng: np.random.Generator,
                 n: int) -> tuple[float, float, float]:
    """(estimate, low, high): Σnum/Σden (or the mean of num) and its 95% bootstrap interval over
    the rows (batches)."""
    num = np.asarray(num, np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, np.float64)
    if len(num) == 0 or den.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(num.sum() / den.sum())
    if len(num) < 2:
        return est, float("nan"), float("nan")
    pick = rng.integers(0, len(num), (n, len(num)))
    d = den[pick].sum(1)
    stats = num[pick].sum(1)[d > 0] / d[d > 0]
    return est, float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def _folder_map(index: TokenIndex, run_data: list[str]) -> np.ndarray:
    """For each evaluation folder, the run's folder number (its task embedding): same path, else
    same folder name, else same sources; 0 when nothing matches."""
    run = parse_data_specs(run_data)
    out = []
    for f in index.folders:
        mine = Path(f.path).resolve()
        hit = next((i for i, s in enumerate(run) if Path(s.path).resolve() == mine), None)
        if hit is None:
            hit = next((i for i, s in enumerate(run) if Path(s.path).name == mine.name), None)
        if hit is None:
            srcs = set(f.manifest.get("sources", {}))
            for i, s in enumerate(run):
                try:
                    other = json.loads((Path(s.path) / "manifest.json").read_text()).get("sources", {})
                except (OSError, ValueError):
                    continue
                if srcs and set(other) == srcs:
                    hit = i
                    break
        out.append(hit or 0)
    return np.asarray(out, np.int64)


def _split_mask(index: TokenIndex, split: str) -> np.ndarray:
    if split == "all":
        return np.ones(len(index), bool)
    if split not in ("train", "validation", "test"):
        raise MMToolError(f"--split {split}: expected all, train, validation or test")
    col = np.concatenate([np.asarray(s.table.column("split").to_pylist(), object) for s in index.shards])
    return col == split


def ablate(cfg: AblateConfig, model: Any = None, run_cfg: Any = None,
           on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Runs every (modality, mode) ablation on `cfg.batches` batches; returns the JSON-ready result.

    Args:
        cfg: the job. model, run_cfg: an already loaded run (tests); default: `load_run(cfg.run)`.
        on_progress: called with (batches done, batches) after each batch.

    Raises:
        MMToolError: bad flags, a run that does not load, data with streams the run never saw,
            or fewer than 2 samples to evaluate.
    """
    from mmtool.train import load_run

    for mode in cfg.modes:
        ABLATIONS.get(mode)
    if not cfg.modes:
        raise MMToolError("--modes: give at least one of drop, permute")
    if cfg.batches < 1 or cfg.batch_samples < 2:
        raise MMToolError("--batches must be ≥ 1 and --batch-samples ≥ 2")
    if model is None:
        model, run_cfg, _ = load_run(cfg.run, cfg.device)
    model.eval()
    device = next(model.parameters()).device
    data = list(cfg.data) or list(run_cfg.data)
    index = _RunStreamIndex([s.path for s in parse_data_specs(data)], model.streams)
    fmap = _folder_map(index, list(run_cfg.data))
    names = list(model.modalities)
    mod_of_stream = model.modality_of_stream.cpu().numpy()
    sep = names.index(SEPARATOR) if SEPARATOR in names else -1
    stream_modality = {s.key: s.modality for s in model.streams}

    rng = np.random.default_rng(cfg.seed)
    pool = np.flatnonzero(_split_mask(index, cfg.split))
    if len(pool) < 2:
        raise MMToolError(f"--data has {len(pool)} sample(s) in split {cfg.split!r}; need at least 2")
    order = rng.permutation(pool)[:cfg.batches * cfg.batch_samples]
    plans = [order[i:i + cfg.batch_samples] for i in range(0, len(order), cfg.batch_samples)]
    plans = [p for p in plans if len(p) >= 2]
    # Probe split: a fixed, seeded share of the samples is held out for scoring the probe.
    held = np.random.default_rng(cfg.seed + 1).random(len(index)) < cfg.test_share  # [N]

    want = cfg.modalities
    unknown = sorted(set(want or []) - set(names))
    if unknown:
        raise MMToolError(f"--modalities {','.join(unknown)}: the run has no such modality "
                          f"(it has {', '.join(n for n in names if n != SEPARATOR)})")
    records: dict[tuple[str, str], dict[str, list]] = {}
    feats_intact: dict[int, np.ndarray] = {}
    ablated_feats: dict[tuple[str, str], list[tuple[int, int, np.ndarray]]] = {}
    present_mods: set[str] = set()

    def forward(batch: Batch, seed: int) -> dict[str, float]:
        gen = torch.Generator().manual_seed(seed)
        return model(batch.to(device), generator=gen).by_stream

    answer = [i for i, n in enumerate(names) if n in NOT_INPUTS]

    def features(batch: Batch) -> np.ndarray:
        """[B, d] pooled features without label tokens (they would give the probe the answer)."""
        stream = batch.numpy("slot_stream")
        hide = np.isin(mod_of_stream[np.maximum(stream, 0)], answer) & (stream >= 0)
        if hide.any():
            slots = sample_slots(batch)
            batch = rebuild(batch, [s[~hide[s]] for s in slots], list(range(len(slots))))
        return model.pooled(batch.to(device)).float().cpu().numpy()

    with torch.no_grad():
        for bi, samples in enumerate(plans):
            batch = assemble(index, samples, "packed")
            batch["sample_folder"][:] = torch.from_numpy(fmap[batch.numpy("sample_folder")].astype(np.int32))
            pooled = features(batch)  # [B, d]
            for s, f in zip(samples.tolist(), pooled):
                feats_intact[s] = f
            slot_mod = np.where(batch.numpy("slot_stream") >= 0,
                                mod_of_stream[np.maximum(batch.numpy("slot_stream"), 0)], -1)
            slot_mod = np.where(slot_mod == sep, -1, slot_mod)
            sig = index.signature[samples]
            for m in sorted(set(slot_mod[slot_mod >= 0].tolist())):
                name = names[m]
                if (want and name not in want) or (not want and name in NOT_INPUTS):
                    continue
                present_mods.add(name)
                for mode in cfg.modes:
                    chosen, intact, abl = ablated_orders(batch, slot_mod, m, mode, sig, rng)
                    if not chosen:
                        continue
                    seed = cfg.seed * 1_000_003 + bi
                    a = rebuild(batch, intact, chosen)
                    z = rebuild(batch, abl, chosen, keep_positions=mode == "drop")
                    out_a, out_z = forward(a, seed), forward(z, seed)
                    keys = remaining_keys(out_a, stream_modality, name) & set(out_z)  # same groups
                    rec = records.setdefault((name, mode), {"intact": [], "ablated": [], "samples": []})
                    if not keys:  # nothing left to score the loss on (e.g. a modality with no objective)
                        rec.setdefault("no_loss", 0)
                        rec["no_loss"] += 1
                    rec["intact"].append(weighted_loss(out_a, model.weights, keys) if keys else np.nan)
                    rec["ablated"].append(weighted_loss(out_z, model.weights, keys) if keys else np.nan)
                    rec["samples"].append(len(chosen))
                    pz = features(z)
                    ids = samples[np.asarray(chosen)]
                    ablated_feats.setdefault((name, mode), []).extend(
                        (bi, int(s), f) for s, f in zip(ids.tolist(), pz))
            if on_progress:
                on_progress(bi + 1, len(plans))

    # The linear probe: fit once on intact features of the labelled, not held-out samples.
    labels = index.labels
    folder = index.sample_folder
    seen = np.array(sorted(feats_intact), np.int64)
    joint = np.where(labels[seen] >= 0, folder[seen] * 1_000_000 + labels[seen], -1)
    train = seen[(joint >= 0) & ~held[seen]]
    probe, acc_note = None, None
    if len(train) >= 10 and len(np.unique(joint[(joint >= 0) & ~held[seen]])) >= 2:
        code = dict(zip(seen.tolist(), joint.tolist()))
        probe = _probe(cfg.probe_c)
        probe.fit(np.stack([feats_intact[s] for s in train]), [code[s] for s in train])
    else:
        acc_note = "no accuracy: fewer than 10 labelled training samples or 2 classes"

    boot = np.random.default_rng(cfg.seed + 2)
    results: dict[str, dict[str, Any]] = {}
    for (name, mode), rec in sorted(records.items()):
        intact, abl = np.array(rec["intact"]), np.array(rec["ablated"])
        ok = np.isfinite(intact) & np.isfinite(abl)  # batches with remaining groups to score
        entry: dict[str, Any] = {"batches": len(intact), "samples": int(sum(rec["samples"])), "loss": None}
        if ok.any():
            d_est, d_lo, d_hi = bootstrap_ci(abl[ok] - intact[ok], None, boot, cfg.bootstrap)
            entry["loss"] = {"intact": float(intact[ok].mean()), "ablated": float(abl[ok].mean()),
                             "delta": d_est, "ci95": [d_lo, d_hi]}
        if probe is not None:
            rows = [(bi, s, f) for bi, s, f in ablated_feats.get((name, mode), [])
                    if held[s] and labels[s] >= 0]
            if rows:
                y = np.array([folder[s] * 1_000_000 + labels[s] for _, s, _ in rows])
                base = probe.predict(np.stack([feats_intact[s] for _, s, _ in rows])) == y
                hit = probe.predict(np.stack([f for *_, f in rows])) == y
                if mode == "drop":  # what the rest still tells: a probe refit without the modality
                    hit = _refit_drop(ablated_feats[(name, mode)], held, labels, folder, cfg.probe_c, rows, y)
                bis = np.array([bi for bi, *_ in rows])
                ub = np.unique(bis)
                n_b = np.array([(bis == u).sum() for u in ub], np.float64)
                c_base = np.array([base[bis == u].sum() for u in ub], np.float64)
                c_hit = np.array([hit[bis == u].sum() for u in ub], np.float64)
                a_est, a_lo, a_hi = bootstrap_ci(c_base - c_hit, n_b, boot, cfg.bootstrap)
                entry["accuracy"] = {"intact": float(base.mean()), "ablated": float(hit.mean()),
                                     "drop": a_est, "ci95": [a_lo, a_hi], "test_samples": len(rows)}
        results.setdefault(name, {})[mode] = entry

    # One metric for every modality, so that the ranking compares like with like: the accuracy
    # drop when every ablation could be scored by the probe, else the loss increase.
    entries = [e for modes in results.values() for e in modes.values()]
    metric = "accuracy drop" if entries and all("accuracy" in e for e in entries) else "loss increase"
    for e in entries:
        src = e.get("accuracy") if metric == "accuracy drop" else e.get("loss")
        value = (src["drop"] if metric == "accuracy drop" else src["delta"]) if src else float("nan")
        e["importance"] = {"metric": metric, "value": value,
                           "ci95": src["ci95"] if src else [float("nan")] * 2}

    first = cfg.modes[0]
    ranked = sorted((n for n in results if first in results[n]),
                    key=lambda n: -np.nan_to_num(results[n][first]["importance"]["value"], nan=-np.inf))
    return {"run": str(cfg.run), "data": data, "settings": json_ready(asdict(cfg)),
            "modalities": sorted(present_mods), "results": results, "ranking": ranked,
            "ranking_mode": first, "importance_metric": metric, "notes": [acc_note] if acc_note else [],
            "batches": len(plans), "samples": int(sum(len(p) for p in plans))}


def _probe(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def _refit_drop(feats: list[tuple[int, int, np.ndarray]], held: np.ndarray, labels: np.ndarray,
                folder: np.ndarray, c: float, rows: list, y: np.ndarray) -> np.ndarray:
    """Hits of a probe refit on the dropped features of the training samples, on `rows`."""
    train = [(s, f) for _, s, f in feats if not held[s] and labels[s] >= 0]
    ty = np.array([folder[s] * 1_000_000 + labels[s] for s, _ in train])
    if len(train) < 10 or len(np.unique(ty)) < 2:
        return np.zeros(len(rows), bool)  # too few samples keep another modality to learn from
    probe = _probe(c).fit(np.stack([f for _, f in train]), ty)
    return probe.predict(np.stack([f for *_, f in rows])) == y


def json_ready(doc: Any) -> Any:
    return json.loads(json.dumps(doc, default=str))
