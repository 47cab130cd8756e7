"""The report of a sweep: every metric per grid point over seeds, paired differences, plots.

Written to `OUT/sweep.json`, `OUT/sweep.md` and `OUT/plots/*.png` (through `mmtool.plotting.save_figure`):

* **per grid point**: each metric's mean over seeds with a 95% percentile bootstrap interval over
  the seeds (`stats.bootstrap_ci`; one seed: "n=1, no interval"). With 2–3 seeds a bootstrap has
  only n^n resamples and is narrow; `sweep.json` also holds the Student-t interval (`t_ci95`,
  `stats.mean_ci95`), which is wider and more honest at that n.
* **paired differences** against the baseline point (`sweep.baseline`, else the first): per metric,
  point − baseline on the seeds both have (a seed gives the same data order and initial weights to
  both), their mean and a bootstrap interval over seeds, with `stats.verdict`'s wording read in the
  metric's direction ("better" is a lower loss, a higher gain); metrics with no better direction
  (importance) say "higher" / "lower" / "within noise".
* **per run**: each run's value with the interval its own evaluation computed (transfer rows'
  `_ci95`, the loss tail's interval over steps, ablation importance), and the timings.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mmtool.io import atomic_write_json, atomic_write_text
from mmtool.stats import bootstrap_ci, mean_ci95, verdict

KIND = "mmtool-sweep"
NO_INTERVAL = "n=1, no interval"
_ORDER = {"loss": 0, "objective": 1, "training": 2}
"""Training metrics first (loss, per source, per objective, throughput), then the evaluations'."""
PANELS_PER_FIGURE = 12


def _rng(*parts: str) -> np.random.Generator:
    """A generator seeded by names, so that the same results give the same report."""
    return np.random.default_rng(zlib.crc32("/".join(parts).encode()))


def _finite(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)


def over_seeds(values: dict[int, float], direction: int, tag: str) -> dict[str, Any]:
    """Mean of per-seed values and its 95% interval over the seeds (bootstrap; t in `t_ci95`)."""
    seeds = sorted(values)
    v = np.array([values[s] for s in seeds], np.float64)
    entry: dict[str, Any] = {"n": len(v), "values": {str(s): values[s] for s in seeds},
                             "direction": direction, "mean": float(v.mean())}
    if len(v) < 2:
        entry.update(ci95=None, t_ci95=None, note=NO_INTERVAL)
        return entry
    _, ci = bootstrap_ci(v, _rng(tag))
    mean, half = mean_ci95(v)
    entry.update(ci95=ci, t_ci95=[mean - half, mean + half])
    return entry


def directed_verdict(ci: list[float] | None, direction: int) -> str:
    """`stats.verdict` read in the metric's direction (-1: lower is better); 0: higher/lower."""
    if ci is None:
        return NO_INTERVAL
    if direction == 0:
        return {"better": "higher", "worse": "lower"}.get(verdict(ci), "within noise")
    return verdict(ci if direction > 0 else [-ci[1], -ci[0]])


def paired_difference(a: dict[int, float], b: dict[int, float], direction: int, tag: str) -> dict[str, Any]:
    """a − b over the seeds both have: its mean, the bootstrap interval over those seeds (`ci95`),
    the Student-t one (`t_ci95`), and the verdict, read from the t interval.

    Why t for the verdict: a percentile bootstrap over n seeds spans about [min, max] of the
    per-seed differences when n ≤ 3, so it would call "better" whenever every seed agrees in sign —
    which pure noise does half the time with 2 seeds and a quarter of the time with 3. The paired t
    interval keeps the 5% rate at any n (assuming roughly normal seed-to-seed noise).
    """
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], np.float64)
    if not len(d):
        return {"n": 0, "seeds": [], "difference": None, "ci95": None, "t_ci95": None,
                "verdict": "no common seed"}
    out: dict[str, Any] = {"n": len(d), "seeds": seeds, "difference": float(d.mean())}
    if len(d) < 2:
        return {**out, "ci95": None, "t_ci95": None, "verdict": NO_INTERVAL}
    _, ci = bootstrap_ci(d, _rng(tag))
    mean, half = mean_ci95(d)
    t_ci = [mean - half, mean + half] if np.isfinite(half) else [mean, mean]
    return {**out, "ci95": ci, "t_ci95": t_ci, "verdict": directed_verdict(t_ci, direction),
            "verdict_bootstrap": directed_verdict(ci, direction)}


def build_report(spec: Any, pts: list[Any], results: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The sweep report (JSON-ready) from each run's sweep-result.json (None: not done yet)."""
    from mmtool.experiments.sweep import baseline_point

    names: list[str] = []
    direction: dict[str, int] = {}
    for res in results.values():
        for m, entry in ((res or {}).get("metrics") or {}).items():
            if m not in direction:
                names.append(m)
                direction[m] = int(entry.get("direction", 0))
    seen = {m: i for i, m in enumerate(names)}
    names.sort(key=lambda m: (_ORDER.get(_family(m), len(_ORDER)), m != "loss",
                              m if _family(m) in _ORDER else "", seen[m]))
    labels = list(dict.fromkeys(p.label for p in pts))
    per_point: dict[str, dict[str, dict[int, float]]] = {lb: {} for lb in labels}
    points, runs = [], []
    for p in pts:
        res = results.get(p.run_name)
        if res is None:
            continue
        for m, entry in res["metrics"].items():
            if _finite([entry.get("value")]):
                per_point[p.label].setdefault(m, {})[p.seed] = float(entry["value"])
        runs.append({"run": p.run_name, "label": p.label, "seed": p.seed,
                     "metrics": res["metrics"], "timings": res.get("timings", {})})
    for lb in labels:
        mine = [p for p in pts if p.label == lb]
        done = [p.seed for p in mine if results.get(p.run_name) is not None]
        points.append({"label": lb, "values": mine[0].values, "seeds": done,
                       "missing": [p.run_name for p in mine if p.seed not in done],
                       "metrics": {m: over_seeds(per_point[lb][m], direction[m], f"{lb}/{m}")
                                   for m in names if per_point[lb].get(m)}})
    base = baseline_point(spec, pts)
    differences = [{"label": lb, "against": base,
                    "metrics": {m: paired_difference(per_point[lb][m], per_point[base].get(m, {}),
                                                     direction[m], f"{lb}-{base}/{m}")
                                for m in names if per_point[lb].get(m) and per_point[base].get(m)}}
                   for lb in labels if lb != base]
    return {"kind": KIND, "name": spec.name, "grid": spec.grid, "seeds": spec.seeds, "scale": spec.scale,
            "base": spec.train, "evaluate": spec.evaluate, "baseline": base, "metrics": names,
            "directions": direction, "points": points, "differences": differences, "runs": runs,
            "interval": "mean over seeds; ci95: 95% percentile bootstrap over seeds (1000 resamples); "
                        "t_ci95: Student-t over seeds; differences paired by seed"}


# -- text ----------------------------------------------------------------------------------------
def fmt(v: float | None, signed: bool = False) -> str:
    """A number as the tables print it (thousands for large values, 3 decimals otherwise)."""
    if v is None or not np.isfinite(v):
        return "—"
    sign = "+" if signed and v >= 0 else ""
    return f"{sign}{v:,.0f}" if abs(v) >= 1000 else f"{sign}{v:.3f}"


def _cell(value: float | None, ci: list[float] | None, signed: bool = False, note: str = "") -> str:
    if value is None:
        return "—"
    text = fmt(value, signed)
    if ci and _finite(list(ci)):
        text += f" [{fmt(ci[0], signed)}, {fmt(ci[1], signed)}]"
    return text + (f" ({note})" if note else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(report: dict[str, Any]) -> str:
    """sweep.md: the grid, the per-point table, the differences, the per-run table, the timings."""
    labels = [p["label"] for p in report["points"]]
    lines = [f"# Sweep `{report['name']}`", "",
             f"Grid: {', '.join(f'`{k}` ∈ {v}' for k, v in report['grid'].items()) or 'none (one point)'}; "
             f"seeds {report['seeds']}; scale {report['scale']}; baseline `{report['baseline']}`.", "",
             "Each cell: mean over seeds [95% percentile bootstrap interval over the seeds] "
             f"(\"{NO_INTERVAL}\" with one seed). With 2–3 seeds the bootstrap interval is narrow; "
             "`sweep.json` also has the wider Student-t one (`t_ci95`). Losses are the mean of the last "
             "20% of steps (`mmtool report`'s rule); tokens/s the median over steps.", ""]
    missing = [r for p in report["points"] for r in p["missing"]]
    if missing:
        lines += [f"**Not finished** ({len(missing)}): {', '.join(missing)} — the table covers the finished runs.", ""]
    by = {p["label"]: p for p in report["points"]}
    rows = []
    for m in report["metrics"]:
        cells = []
        for lb in labels:
            e = by[lb]["metrics"].get(m)
            if e is None:
                cells.append("—")
            else:
                n_note = e.get("note", "") if e["n"] < 2 else ("" if e["n"] == len(report["seeds"]) else f"n={e['n']}")
                cells.append(_cell(e["mean"], e["ci95"], note=n_note))
        rows.append([f"`{m}`", *cells])
    lines += ["## Per grid point", "", *_table(["metric", *labels], rows), ""]
    if report["differences"]:
        heads = [f"{d['label']} − {d['against']}" for d in report["differences"]]
        rows = []
        for m in report["metrics"]:
            cells = []
            for d in report["differences"]:
                e = d["metrics"].get(m)
                if e is None or e["difference"] is None:
                    cells.append("—")
                elif e["t_ci95"] is None:
                    cells.append(f"{fmt(e['difference'], True)} ({e['verdict']})")
                else:
                    t = e["t_ci95"]
                    cells.append(f"{_cell(e['difference'], e['ci95'], signed=True)}; t [{fmt(t[0], True)}, "
                                 f"{fmt(t[1], True)}] **{e['verdict']}**")
            rows.append([f"`{m}`", *cells])
        lines += [f"## Paired differences against `{report['baseline']}` (same seeds)", "",
                  "Each cell: mean of the per-seed differences [bootstrap interval over seeds]; "
                  "t [paired Student-t interval] **verdict**. The verdict reads the t interval: with 2–3 "
                  "seeds the bootstrap spans about [min, max] of the per-seed differences and would call "
                  "pure noise a difference half (2 seeds) or a quarter (3) of the time. better / worse: "
                  "the interval excludes 0 in the metric's direction (lower loss and time, higher "
                  "throughput, accuracy and gain); higher / lower for metrics without one (importance); "
                  "within noise: no detectable difference.", "",
                  *_table(["metric", *heads], rows), ""]
    runs = report["runs"]
    rows = []
    for m in report["metrics"]:
        cells = []
        for r in runs:
            e = r["metrics"].get(m)
            cells.append("—" if e is None else _cell(e.get("value"), e.get("ci95"), note=e.get("status") or ""))
        rows.append([f"`{m}`", *cells])
    lines += ["## Per run", "", "Each value with the interval its own measurement has: loss tails over "
              "their steps, transfer rows over test examples (and episodes), importance over batches.", "",
              *_table(["metric", *[r["run"] for r in runs]], rows), ""]
    keys = sorted({k for r in runs for k in r["timings"]})
    if keys:
        rows = [[r["run"], *(f"{r['timings'][k]:.1f}" if k in r["timings"] else "—" for k in keys)] for r in runs]
        lines += ["## Timings (seconds, this machine; — : reused from an earlier invocation)", "",
                  *_table(["run", *keys], rows), ""]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------
def _family(metric: str) -> str:
    head = metric.split("/")[0]
    return {"tokens_per_s": "training", "grad_norm": "training", "grad_norm_cv": "training",
            "train_seconds": "training"}.get(head, head)


def plot_report(report: dict[str, Any], folder: Path) -> list[str]:
    """One PNG per metric family (loss, objective, training, each evaluation): a panel per metric,
    the mean per grid point with its interval over seeds, and each seed's value as a dot."""
    from mmtool.plotting import subplots

    from mmtool.plotting import save_figure

    families: dict[str, list[str]] = {}
    for m in report["metrics"]:
        families.setdefault(_family(m), []).append(m)
    labels = [p["label"] for p in report["points"]]
    by = {p["label"]: p for p in report["points"]}
    written = []
    for fam, metrics in families.items():
        for part in range(0, len(metrics), PANELS_PER_FIGURE):
            chunk = metrics[part:part + PANELS_PER_FIGURE]
            cols = min(3, len(chunk))
            rows = -(-len(chunk) // cols)
            fig, axes = subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
            for ax, m in zip(axes.flat, chunk):
                for x, lb in enumerate(labels):
                    e = by[lb]["metrics"].get(m)
                    if e is None:
                        continue
                    seeds = [float(v) for v in e["values"].values()]
                    ax.scatter([x] * len(seeds), seeds, s=10, color="0.6", zorder=2)
                    err = None if not e["ci95"] else [[e["mean"] - e["ci95"][0]], [e["ci95"][1] - e["mean"]]]
                    ax.errorbar([x], [e["mean"]], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
                ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
                ax.set_xlim(-0.5, len(labels) - 0.5)
                ax.set_title(m, fontsize=8)
            for ax in list(axes.flat)[len(chunk):]:
                ax.axis("off")
            fig.suptitle(f"{report['name']}: mean over seeds, 95% bootstrap interval; dots: seeds", fontsize=9)
            fig.tight_layout()
            name = fam.replace("/", "_") + (f"-{part // PANELS_PER_FIGURE + 1}" if part else "") + ".png"
            save_figure(fig, folder / name)
            written.append(str(folder / name))
    return written


def write_report(spec: Any, pts: list[Any], results: dict[str, dict[str, Any] | None],
                 out: str | Path) -> dict[str, Any]:
    """Builds the report and writes sweep.json, sweep.md and plots/*.png in `out` (atomically)."""
    out = Path(out)
    report = build_report(spec, pts, results)
    report["plots"] = plot_report(report, out / "plots")
    atomic_write_json(out / "sweep.json", report)
    atomic_write_text(out / "sweep.md", render_markdown(report))
    return report
