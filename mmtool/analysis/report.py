"""`mmtool report`: several runs side by side — final metrics, probe summaries, ablations, transfer.

Inputs are run folders (`mmtool train --out`), evaluation folders (holding an `ablation.json` from
`mmtool ablate` or a `report.json` from `mmtool eval-transfer`), or folders that contain run folders
(expanded, sorted by name). Results are found by file name, not by importing the code that wrote
them, so a report reads any folder that has them:

    RUN/config.json, RUN/metrics.jsonl     the run (required for a run entry)
    RUN/**/ablation.json                   `mmtool ablate` results (default RUN/ablation.json)
    RUN/**/report.json                     `mmtool eval-transfer` results (default RUN/transfer/)

Per entry: the run's settings (fusion, size, objectives, data and weights, batching), the final
loss — per source, the mean over the last 20% of steps that held the source, with a 95% interval
over those steps (never one batch's loss: a batch holds whatever sources it drew) — throughput, the gradient
norm's mean and coefficient of variation after warm-up (how steady the updates are), the probe summary of
the last quarter of probe steps (one batch need not hold every modality) (attention each modality sends to *other* modalities averaged over layers, gradient per
token at each modality's encoder, loss per modality), modality importance (over the untrained twin when `ablate`
measured it) with 95% intervals, statuses (rank, tied, structural zero) and the ranking, and the transfer gains over scratch (95% interval, verdict) per task, protocol and setting.

`write_report` writes `report.json` (tagged `"kind": "mmtool-report"`, so that a later report
does not mistake it for an eval-transfer one), `loss_curves.png` (one smoothed curve per run and source) and
`importance.png` (grouped bars with error bars), all atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmtool import folders
from mmtool.io import atomic_write_json, read_json_object
from mmtool.errors import MMToolError
from mmtool.plotting import save_figure
from mmtool.stats import bootstrap_ci

KIND = "mmtool-report"
MAX_CURVE_POINTS = 500


def _is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.jsonl").is_file()


def _find(path: Path, name: str, depth: int = 2) -> list[Path]:
    """Files called `name` in `path` and its subfolders up to `depth` levels, sorted."""
    out = []
    for d in range(depth + 1):
        out += sorted(path.glob("/".join(["*"] * d + [name])))
    return out


def _is_eval(path: Path) -> bool:
    """Holds an ablation.json, or an eval-transfer report.json (not one of our own reports)."""
    if (path / "ablation.json").is_file():
        return True
    doc = read_json_object(path / "report.json") if (path / "report.json").is_file() else None
    return doc is not None and doc.get("kind") != KIND and "tasks" in doc


def discover(paths: list[str | Path]) -> list[Path]:
    """Expands the inputs into entry folders (runs or evaluation folders), keeping their order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise MMToolError(f"{p}: no such folder (give run folders or folders of runs)")
        if _is_run(p) or _is_eval(p):
            out.append(p)
            continue
        runs = sorted(c for c in p.iterdir() if c.is_dir() and _is_run(c))
        if not runs:
            raise MMToolError(f"{p}: neither a run (config.json + metrics.jsonl), an evaluation folder "
                              "(ablation.json, report.json) nor a folder of runs")
        out += runs
    return out


# -- summaries ---------------------------------------------------------------------------------
TAIL_SHARE = 0.2
"""The "final" loss is a mean over the last 20% of steps (at least one), never one batch's loss."""
SMOOTH_HALF_LIFE = 0.05
"""The loss curves' EMA half-life, as a share of the run's steps (at least one step)."""


def _tail(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return lines[-max(1, int(round(len(lines) * TAIL_SHARE))):]


def mean_ci(values: list[float], seed: int = 0, n: int = 1000) -> dict[str, Any]:
    """{"mean", "ci95", "steps"}: the mean of per-step values and its 95% bootstrap interval over
    the steps (resampled independently: neighbouring steps are correlated, so it is optimistic)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else None, "ci95": [None, None], "steps": len(v)}
    mean, ci = bootstrap_ci(v, np.random.default_rng(seed), n)
    return {"mean": mean, "ci95": ci, "steps": len(v)}


def _tail_mean(lines: list[dict[str, Any]], get) -> float | None:
    vals = [v for v in (get(x) for x in _tail(lines)) if v is not None]
    return float(np.mean(vals)) if vals else None


def _dict_tail(lines: list[dict[str, Any]], key: str) -> dict[str, float]:
    tail = _tail(lines)
    names = sorted({k for x in tail for k in x.get(key, {})})
    return {n: float(np.mean([x[key][n] for x in tail if n in x.get(key, {})])) for n in names}


def final_by_source(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per source (`by_source` in metrics.jsonl): its mean loss over the last 20% of steps that
    held it, with a 95% interval over those steps (`mean_ci`; mean None when no tail step held it),
    and the last step that held it."""
    tail = _tail(lines)
    out = {}
    for n in sorted({k for x in lines for k in x.get("by_source", {})}):
        out[n] = mean_ci([x["by_source"][n] for x in tail if n in x.get("by_source", {})])
        out[n]["last_step"] = max(x["step"] for x in lines if n in x.get("by_source", {}))
    return out


def source_curves(lines: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per source: the steps that held it and an EMA of its loss over them (absent steps skipped;
    half-life `SMOOTH_HALF_LIFE` of the run's steps), thinned to `MAX_CURVE_POINTS`."""
    half = max(1.0, SMOOTH_HALF_LIFE * len(lines))
    alpha = 1 - 0.5 ** (1 / half)
    out: dict[str, dict[str, list[float]]] = {}
    for n in sorted({k for x in lines for k in x.get("by_source", {})}):
        steps = [x["step"] for x in lines if n in x.get("by_source", {})]
        raw = [x["by_source"][n] for x in lines if n in x.get("by_source", {})]
        ema, smooth = raw[0], []
        for v in raw:
            ema = alpha * v + (1 - alpha) * ema
            smooth.append(float(ema))
        stride = max(1, len(steps) // MAX_CURVE_POINTS)
        out[n] = {"step": steps[::stride], "loss": [float(v) for v in raw[::stride]], "smooth": smooth[::stride]}
    return out


def grad_norm_summary(lines: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean and coefficient of variation (std / mean) of the gradient norm after the first 10% of
    steps (warm-up): how steady the updates are, e.g. mixed vs single-modality batches."""
    norms = np.array([x["grad_norm"] for x in lines[len(lines) // 10:] if "grad_norm" in x], float)
    if len(norms) < 2 or norms.mean() <= 0:
        return None
    return {"mean": float(norms.mean()), "cv": float(norms.std() / norms.mean())}


def probe_summary(lines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first probe step and the last quarter of them, condensed (None: no probes logged)."""
    probed = [x for x in lines if "probes" in x]
    if not probed:
        return None

    def condense(p: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        att = p.get("attention")
        if att and att.get("layers"):
            cross: dict[str, list[float]] = {}
            for layer in att["layers"]:
                for frm, row in layer.items():
                    cross.setdefault(frm, []).append(max(0.0, 1.0 - row.get(frm, 0.0)))
            out["attention_to_others"] = {k: float(np.mean(v)) for k, v in cross.items()}
            received: dict[str, list[float]] = {}
            for layer in att["layers"]:
                for frm, row in layer.items():
                    for to, share in row.items():
                        if to != frm:
                            received.setdefault(to, []).append(share)
            out["attention_received_from_others"] = {k: float(np.mean(v)) for k, v in received.items()}
            out["attention_last_layer"] = att["layers"][-1]
        if p.get("grad-norm"):
            out["grad_per_token"] = p["grad-norm"].get("per_token", {})
            out["grad_params"] = p["grad-norm"].get("params", {})
        if p.get("loss"):
            out["loss_by_modality"] = p["loss"].get("by_modality", {})
        return out

    # One probe step sees one batch, which need not hold every modality of a mixture: the "last"
    # summary averages the last quarter of the probe steps, each modality over the steps that had it.
    tail = probed[-max(1, len(probed) // 4):]
    return {"steps": [x["step"] for x in probed], "first": {"step": probed[0]["step"], **condense(probed[0]["probes"])},
            "last": {"steps": [x["step"] for x in tail], **_average([condense(x["probes"]) for x in tail])}}


def _average(docs: list[Any]) -> Any:
    """Element-wise mean of nested dicts of numbers; a key is averaged over the docs that have it."""
    if all(isinstance(d, (int, float)) for d in docs):
        return float(np.mean(docs))
    if all(isinstance(d, dict) for d in docs):
        keys = sorted({k for d in docs for k in d})
        return {k: _average([d[k] for d in docs if k in d]) for k in keys}
    return docs[-1]


def task_shares(lines: list[dict[str, Any]], resamples: int = 2000) -> dict[str, Any] | None:
    """`modality_shares` for the run's (folder, objective) tasks (`task_loss_share`, `task_grad_share`):
    {"steps", "grad_steps", "tasks": {"FOLDER/OBJECTIVE": {...}}}; None: one task or none logged."""
    out = modality_shares(lines, resamples, ("task_loss_share", "task_grad_share"))
    return None if out is None else {"steps": out["steps"], "grad_steps": out["grad_steps"],
                                     "tasks": out["modalities"]}


def modality_shares(lines: list[dict[str, Any]], resamples: int = 2000,
                    keys: tuple[str, str] = ("loss_share", "grad_share")) -> dict[str, Any] | None:
    """Each modality's mean share of the loss and of the trunk gradient late in a run, with 95% intervals.

    `loss_share` (every step) over the last quarter of steps, and `grad_share` (step 1 and every
    `--probe-every` steps) over the last quarter of the steps that logged it. A modality absent
    from a step's batch counts as share 0 there: the mean is its share of the training signal.
    Intervals: percentile bootstrap over those steps (seeded). None: the run logged no shares.

    Returns:
        {"steps": n, "grad_steps": n, "modalities": {name: {"loss": mean, "loss_ci95": [lo, hi],
        "grad": mean | None, "grad_ci95": [lo, hi] | None}}}.
    """
    loss_key, grad_key = keys
    loss_lines = [x for x in lines if x.get(loss_key)]
    if not loss_lines:
        return None
    grad_lines = [x for x in lines if x.get(grad_key)]
    tails = {"loss": loss_lines[-max(1, len(loss_lines) // 4):],
             "grad": grad_lines[-max(1, len(grad_lines) // 4):] if grad_lines else []}
    names = sorted({m for x in tails["loss"] + tails["grad"] for m in x.get(loss_key, {}) | x.get(grad_key, {})})
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, Any]] = {}
    for m in names:
        out[m] = {}
        for kind, tail in tails.items():
            v = np.array([x[loss_key if kind == "loss" else grad_key].get(m, 0.0) for x in tail], float)  # [steps]
            if not len(v):
                out[m].update({kind: None, f"{kind}_ci95": None})
                continue
            mean, ci = bootstrap_ci(v, rng, resamples) if len(v) > 1 else (float(v[0]), [float(v[0])] * 2)
            out[m].update({kind: mean, f"{kind}_ci95": ci})
    return {"steps": len(tails["loss"]), "grad_steps": len(tails["grad"]), "modalities": out}


def ablation_summary(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """Per modality and mode: importance (trained − twin when measured) with its interval, the raw
    trained and twin values, and the status (rank, tied, structural zero, indistinguishable)."""
    imp = {}
    for mod, modes in doc.get("results", {}).items():
        imp[mod] = {mode: {k: e["importance"].get(k) for k in ("metric", "value", "ci95", "trained",
                                                                "trained_ci95", "twin", "twin_ci95",
                                                                "baseline", "status", "structural_zero")}
                    | {"loss_delta": (e.get("loss") or {}).get("delta"),
                       "accuracy_drop": (e.get("accuracy") or {}).get("drop")}
                    for mode, e in modes.items()}
    return {"path": str(path), "ranking": doc.get("ranking", []), "ranking_groups": doc.get("ranking_groups"),
            "ranking_mode": doc.get("ranking_mode"), "baseline": doc.get("baseline", "none"), "importance": imp}


def transfer_summary(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """Each eval-transfer row's gain over scratch with its interval and verdict (`gains`), and the mean
    pretrained / scratch ratio per task and protocol (`ratios`, also for reports written before gains)."""
    ratios: dict[str, float] = {}
    gains: dict[str, dict[str, Any]] = {}
    for task, entry in (doc.get("tasks") or {}).items():
        for proto, res in ((entry or {}).get("results") or {}).items():
            rows = [r for r in (res or {}).get("rows") or [] if isinstance(r, dict)]
            vals = [r.get("ratio") for r in rows if isinstance(r.get("ratio"), (int, float))]
            if vals:
                ratios[f"{task}/{proto}"] = float(np.mean(vals))
            for r in rows:
                if r.get("gain_ci95"):
                    name = f"{task}/{proto}" + (f" {r['setting']}" if r.get("setting") else "")
                    gains[name] = {k: r.get(k) for k in ("gain", "gain_ci95", "verdict", "pretrained", "scratch")}
    return {"path": str(path), "ratios": ratios, "gains": gains,
            "pretraining_saw": {t: e.get("pretraining_saw") for t, e in (doc.get("tasks") or {}).items()}}


def summarize(folder: Path) -> dict[str, Any]:
    """One entry of the report (see the module docstring)."""
    entry: dict[str, Any] = {"name": folder.name, "path": str(folder), "kind": "run" if _is_run(folder) else "eval"}
    if _is_run(folder):
        from mmtool.train.rundir import read_config_doc

        cfg = read_config_doc(folder)
        from mmtool.train.loggers import read_metrics

        lines, _ = read_metrics(folder)  # a line cut by a crash is skipped
        model = cfg.get("model", {})
        entry["config"] = {"fusion": model.get("fusion"), "fusion_layer": model.get("fusion_layer"),
                           "size": model.get("size"), "objectives": model.get("objectives"),
                           "data": cfg.get("data"), "max_steps": cfg.get("max_steps"), "lr": cfg.get("lr"),
                           "seed": cfg.get("seed"), "strategy": cfg.get("strategy"),
                           "batch_samples": cfg.get("batch_samples"),
                           "batch_tokens": None if cfg.get("batch_samples") else cfg.get("batch_tokens")}
        if lines:
            stride = max(1, len(lines) // MAX_CURVE_POINTS)
            tail = _tail(lines)
            entry["final"] = {
                "step": lines[-1]["step"], "tail_steps": [tail[0]["step"], tail[-1]["step"]],
                "loss_tail": mean_ci([x["loss"] for x in tail if "loss" in x]),
                "by_source": final_by_source(lines),
                "losses_tail": _dict_tail(lines, "losses"),
                "tokens_per_s": float(np.median([x["tokens_per_s"] for x in lines])),
                "grad_norm": grad_norm_summary(lines),
                "seconds": float(sum(x.get("seconds", 0.0) for x in lines))}
            entry["curve"] = {"step": [x["step"] for x in lines[::stride]],
                              "loss": [x["loss"] for x in lines[::stride]],
                              "by_source": source_curves(lines)}
            entry["probes"] = probe_summary(lines)
            entry["shares"] = modality_shares(lines)
            entry["task_shares"] = task_shares(lines)
    for path in _find(folder, "ablation.json"):
        doc = read_json_object(path)
        if doc and "results" in doc:
            entry.setdefault("ablation", ablation_summary(doc, path))
    for path in _find(folder, "report.json"):
        doc = read_json_object(path)
        if doc and doc.get("kind") != KIND and "tasks" in doc:
            entry.setdefault("transfer", transfer_summary(doc, path))
    return entry


def build_report(paths: list[str | Path]) -> dict[str, Any]:
    """The report of every entry found under `paths` (JSON-ready)."""
    folders = discover(paths)
    if not folders:
        raise MMToolError("nothing to report: give run folders (mmtool train --out)")
    entries = [summarize(f) for f in folders]
    names = [e["name"] for e in entries]
    for e in entries:  # same folder names (runs/a/run, runs/b/run): name them by their parents
        if names.count(e["name"]) > 1:
            e["name"] = str(Path(e["path"]).parent.name) + "/" + e["name"]
    return {"kind": KIND, "entries": entries}


# -- plots ---------------------------------------------------------------------------------------
def plot_loss_curves(report: dict[str, Any], path: str | Path) -> bool:
    """One smoothed loss curve per (run, source), from `by_source` (EMA over the steps that held the
    source, raw points faint); runs without `by_source` draw their total. False: no curves."""
    from mmtool.plotting import subplots

    runs = [e for e in report["entries"] if e.get("curve")]
    if not runs:
        return False
    fig, ax = subplots(figsize=(7.2, 4.2))
    styles = ["-", "--", ":", "-."]
    sources = sorted({src for e in runs for src in (e["curve"].get("by_source") or {})})
    for i, e in enumerate(runs):
        curves = e["curve"].get("by_source") or {"total": {"step": e["curve"]["step"], "loss": e["curve"]["loss"],
                                                           "smooth": e["curve"]["loss"]}}
        for src, c in curves.items():
            color = f"C{sources.index(src) % 10}" if src in sources else f"C{i % 10}"
            ls = styles[i % len(styles)]
            ax.plot(c["step"], c["loss"], color=color, alpha=0.15, lw=0.6, ls=ls)
            ax.plot(c["step"], c["smooth"], color=color, lw=1.6, ls=ls,
                    label=f"{e['name']}: {src}" if len(runs) > 1 else src)
    lows = [min(c["smooth"]) for e in runs for c in (e["curve"].get("by_source") or {}).values() if c["smooth"]]
    highs = [max(c["smooth"]) for e in runs for c in (e["curve"].get("by_source") or {}).values() if c["smooth"]]
    if lows and min(lows) > 0 and max(highs) / min(lows) > 20:  # sources on very different scales
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss per source (EMA)")
    ax.set_title("loss curves, one per source (steps without the source skipped)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_importance(report: dict[str, Any], path: str | Path) -> bool:
    """Grouped bars: each modality's importance (ranking mode) per run, 95% error bars."""
    from mmtool.plotting import subplots

    runs = [e for e in report["entries"] if e.get("ablation")]
    if not runs:
        return False
    mods = sorted({m for e in runs for m in e["ablation"]["importance"]})
    fig, ax = subplots(figsize=(2 + 1.4 * len(mods), 3.8))
    width = 0.8 / len(runs)
    metrics = set()
    for j, e in enumerate(runs):
        mode = e["ablation"]["ranking_mode"]
        xs, ys, lo, hi = [], [], [], []
        for i, m in enumerate(mods):
            v = e["ablation"]["importance"].get(m, {}).get(mode)
            if v is None or v["value"] is None or np.isnan(v["value"]):
                continue
            metrics.add(f"{mode}: {v['metric']}")
            a, b = v["ci95"]
            xs.append(i + (j - (len(runs) - 1) / 2) * width)
            ys.append(v["value"])
            lo.append(0 if a is None or np.isnan(a) else max(v["value"] - a, 0))
            hi.append(0 if b is None or np.isnan(b) else max(b - v["value"], 0))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=e["name"], color=f"C{j % 10}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(mods)))
    ax.set_xticklabels(mods)
    ax.set_ylabel("importance")
    base = {e["ablation"].get("baseline", "none") for e in runs}
    ax.set_title("modality importance (" + "; ".join(sorted(metrics)) + ")"
                 + (", trained − untrained twin" if base == {"untrained twin"} else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_ablation(result: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    """Bar chart of each modality's importance per mode with 95% interval error bars (atomic)."""
    from mmtool.plotting import subplots

    res = result["results"]
    mods = sorted(res, key=lambda n: result["ranking"].index(n) if n in result["ranking"] else 99)
    modes = [m for m in result["settings"]["modes"] if any(m in res[n] for n in mods)]
    fig, ax = subplots(figsize=(1.6 + 1.3 * max(len(mods), 1) * max(len(modes), 1) / 2, 3.6))
    width = 0.8 / max(len(modes), 1)
    metric = ""
    for j, mode in enumerate(modes):
        xs, ys, lo, hi = [], [], [], []
        for i, n in enumerate(mods):
            if mode not in res[n]:
                continue
            imp = res[n][mode]["importance"]
            metric = imp["metric"]
            v, (a, b) = imp["value"], imp["ci95"]
            xs.append(i + (j - (len(modes) - 1) / 2) * width)
            ys.append(v)
            lo.append(0 if np.isnan(a) else max(v - a, 0))
            hi.append(0 if np.isnan(b) else max(b - v, 0))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=mode)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(mods)))
    ax.set_xticklabels(mods)
    ax.set_ylabel(f"importance ({metric})")
    ax.set_title(title or f"modality importance: {Path(result['run']).name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Builds the report and writes report.json, loss_curves.png, importance.png into `out`."""
    folders.inspect(out, "report")  # refuse a foreign --out before reading every run
    report = build_report(paths)
    out = Path(out)
    with folders.writer(out, "report"):
        return _write(report, out)


def _write(report: dict[str, Any], out: Path) -> dict[str, Any]:
    files = {}
    if plot_loss_curves(report, out / "loss_curves.png"):
        files["loss_curves"] = str(out / "loss_curves.png")
    if plot_importance(report, out / "importance.png"):
        files["importance"] = str(out / "importance.png")
    report["files"] = {"report": str(out / "report.json"), **files}
    atomic_write_json(out / "report.json", report)
    return report
