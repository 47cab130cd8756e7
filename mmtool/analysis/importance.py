"""Importance from ablation measurements: per-(modality, mode) intervals, trained − twin, ranking.

The second half of `mmtool ablate` (see `mmtool.analysis.ablate` for what is measured): the
linear probes on pooled features, each (modality, mode)'s loss and accuracy effects with their
95% intervals, importance as trained − untrained twin (paired over the same batches and held-out
samples), and the ranking with statuses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmtool.analysis.ablated_batches import ABLATIONS
from mmtool.stats import hierarchical_ci, ratio_bootstrap_ci
from mmtool.transfer.protocols import probe as linear_probe


def rank(importance: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """(ranking, tie groups, status per modality) from {modality: {"value", "ci95", "structural_zero"}}.

    Only modalities whose interval lies above 0 are ranked, by value; one whose interval overlaps
    the interval of its group's first (highest) member is tied with it. The others get a status:
    "structural zero" (cannot change the measured quantity by construction), "not measured",
    "no interval (one batch)", "negative" (interval below 0: the ablation helps),
    "indistinguishable from 0".
    """
    status: dict[str, str] = {}
    cand = []
    for name, imp in importance.items():
        v, (lo, hi) = imp["value"], imp["ci95"]
        if imp.get("structural_zero"):
            status[name] = "structural zero"
        elif v is None or v != v:
            status[name] = "not measured"
        elif lo != lo or hi != hi:
            status[name] = "no interval (one batch)"
        elif lo == lo and lo > 0:
            cand.append(name)
        elif hi == hi and hi < 0:
            status[name] = "negative"
        else:
            status[name] = "indistinguishable from 0"
    cand.sort(key=lambda n: -importance[n]["value"])
    groups: list[list[str]] = []
    for name in cand:
        if groups and importance[name]["ci95"][1] >= importance[groups[-1][0]]["ci95"][0]:
            groups[-1].append(name)
        else:
            groups.append([name])
    for g, members in enumerate(groups, 1):
        for name in members:
            status[name] = f"rank {g}" + (" (tied)" if len(members) > 1 else "")
    return cand, groups, status


def summarise(records: dict[tuple[str, str], dict[str, Any]], models: list[str], probes: dict[str, Any],
              feats_intact: dict[str, dict[int, np.ndarray]],
              ablated_feats: dict[str, dict[tuple[str, str], list[tuple[int, int, np.ndarray]]]],
              held: np.ndarray, labels: np.ndarray, folder: np.ndarray, probe_c: float, bootstrap: int,
              boot: np.random.Generator) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], dict]]:
    """Per (modality, mode): the loss and accuracy effects of each model with 95% intervals.

    Returns:
        (results {modality: {mode: entry}}, per-unit differences {(modality, mode): {model: {metric:
        (values, groups)}}} for the paired trained − twin intervals).
    """
    results: dict[str, dict[str, Any]] = {}
    diffs: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # per-unit values, groups
    for (name, mode), rec in sorted(records.items()):
        entry: dict[str, Any] = {"batches": len(rec["samples"]), "samples": int(sum(rec["samples"])),
                                 "structural_zero_loss": bool(rec["structural"]), "loss": None}
        units: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for which in models:
            intact, abl = np.array(rec[which]["intact"]), np.array(rec[which]["ablated"])
            ok = np.isfinite(intact) & np.isfinite(abl)  # batches with remaining groups to score
            part: dict[str, Any] = {"loss": None}
            if ok.any():
                d_est, d_lo, d_hi = ratio_bootstrap_ci(abl[ok] - intact[ok], None, boot, bootstrap)
                part["loss"] = {"intact": float(intact[ok].mean()), "ablated": float(abl[ok].mean()),
                                "delta": d_est, "ci95": [d_lo, d_hi]}
                units.setdefault(which, {})["loss"] = (np.where(ok, abl - intact, np.nan), np.arange(len(ok)))
            rows = accuracy_rows(probes[which], feats_intact[which], ablated_feats[which].get((name, mode), []),
                                 mode, held, labels, folder, probe_c)
            if rows is not None:
                bis, base, hit = rows
                a_est, a_lo, a_hi = hierarchical_ci(base - hit, bis, boot, bootstrap)
                part["accuracy"] = {"intact": float(base.mean()), "ablated": float(hit.mean()),
                                    "drop": a_est, "ci95": [a_lo, a_hi], "test_samples": len(bis)}
                units.setdefault(which, {})["accuracy"] = (base - hit, bis)
            if which == "trained":
                entry.update(part)
            else:
                entry["twin"] = part
        diffs[(name, mode)] = units
        results.setdefault(name, {})[mode] = entry
    return results, diffs


def add_importance(results: dict[str, dict[str, Any]], diffs: dict[tuple[str, str], dict], models: list[str],
                   metric: str, twin: bool, bootstrap: int, boot: np.random.Generator) -> str:
    """Adds `importance` to every entry of `results` (trained − twin when `twin`); returns the metric's
    label. `metric` auto: the accuracy drop when every ablation could be scored by the probe, else
    the loss increase."""
    # One metric for every modality, so that the ranking compares like with like: the accuracy
    # drop when every ablation could be scored by the probe, else the loss increase.
    entries = [(k, e) for k, e in ((k, results[k[0]][k[1]]) for k in diffs)]
    if metric == "auto":
        metric = "accuracy" if entries and all("accuracy" in e for _, e in entries) else "loss"
    label = {"accuracy": "accuracy drop", "loss": "loss increase"}[metric]
    for key, e in entries:
        units = diffs[key]
        raw = {w: (e if w == "trained" else e.get("twin", {})).get(metric) for w in models}
        value_of = lambda r: (r["drop"] if metric == "accuracy" else r["delta"]) if r else float("nan")  # noqa: E731
        imp: dict[str, Any] = {"metric": label, "baseline": "untrained twin" if twin else "none",
                               "trained": value_of(raw["trained"]),
                               "trained_ci95": raw["trained"]["ci95"] if raw["trained"] else [float("nan")] * 2,
                               "structural_zero": metric == "loss" and e["structural_zero_loss"]}
        if twin:
            imp["twin"] = value_of(raw["twin"])
            imp["twin_ci95"] = raw["twin"]["ci95"] if raw["twin"] else [float("nan")] * 2
        if raw["trained"] is None or (twin and raw["twin"] is None):
            imp["value"], imp["ci95"] = float("nan"), [float("nan")] * 2
        elif not twin:
            imp["value"], imp["ci95"] = imp["trained"], imp["trained_ci95"]
        else:  # paired: the same batches (and held-out samples) for both models
            (vt, g), (vw, _) = units["trained"][metric], units["twin"][metric]
            d = vt - vw
            fin = np.isfinite(d)
            est, lo, hi = (ratio_bootstrap_ci(d[fin], None, boot, bootstrap) if metric == "loss"
                           else hierarchical_ci(d, g, boot, bootstrap))
            imp["value"], imp["ci95"] = est, [lo, hi]
        e["importance"] = imp

    return label


def fit_probe(feats: dict[int, np.ndarray], held: np.ndarray, labels: np.ndarray, folder: np.ndarray,
               c: float) -> Any:
    """The linear probe on the intact features of the labelled, not held-out samples (None: too few)."""
    seen = np.array(sorted(feats), np.int64)
    joint = np.where(labels[seen] >= 0, folder[seen] * 1_000_000 + labels[seen], -1)
    train = seen[(joint >= 0) & ~held[seen]]
    if len(train) < 10 or len(np.unique(joint[(joint >= 0) & ~held[seen]])) < 2:
        return None
    code = dict(zip(seen.tolist(), joint.tolist()))
    return linear_probe(c).fit(np.stack([feats[s] for s in train]), [code[s] for s in train])


def accuracy_rows(probe: Any, feats_intact: dict[int, np.ndarray], ablated: list[tuple[int, int, np.ndarray]],
                   mode: str, held: np.ndarray, labels: np.ndarray, folder: np.ndarray, c: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(batch of each held-out row, intact hit, ablated hit) of one (modality, mode); None: no probe."""
    if probe is None:
        return None
    rows = [(bi, s, f) for bi, s, f in ablated if held[s] and labels[s] >= 0]
    if not rows:
        return None
    y = np.array([folder[s] * 1_000_000 + labels[s] for _, s, _ in rows])
    base = probe.predict(np.stack([feats_intact[s] for _, s, _ in rows])) == y
    if ABLATIONS.get(mode).refit_probe:  # what the rest still tells: a probe refit without the modality
        hit = _refit_drop(ablated, held, labels, folder, c, rows, y)
    else:
        hit = probe.predict(np.stack([f for *_, f in rows])) == y
    return np.array([bi for bi, *_ in rows]), base.astype(np.float64), hit.astype(np.float64)


def _refit_drop(feats: list[tuple[int, int, np.ndarray]], held: np.ndarray, labels: np.ndarray,
                folder: np.ndarray, c: float, rows: list, y: np.ndarray) -> np.ndarray:
    """Hits of a probe refit on the dropped features of the training samples, on `rows`."""
    train = [(s, f) for _, s, f in feats if not held[s] and labels[s] >= 0]
    ty = np.array([folder[s] * 1_000_000 + labels[s] for s, _ in train])
    if len(train) < 10 or len(np.unique(ty)) < 2:
        return np.zeros(len(rows), bool)  # too few samples keep another modality to learn from
    probe = linear_probe(c).fit(np.stack([f for _, f in train]), ty)
    return probe.predict(np.stack([f for *_, f in rows])) == y
