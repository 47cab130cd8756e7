"""`mmtool sweep`: a base training run × a grid of settings × seeds, each run evaluated, one report.

A sweep file (YAML) has three blocks::

    train:                      # the base run: the keys `mmtool train --config` accepts
      data: [builtin:digits, builtin:spoken-digits=0.5]
      model: {size: tiny, fusion: late, objectives: {contrastive: 1}}
      batch_samples: 32
      max_steps: 60
      text_encoder: learned     # a sweep key (not a TrainConfig one): learned or frozen:NAME
    sweep:
      name: fusion              # optional (default: the file's stem)
      grid: {model.fusion: [early, mid, late]}   # dotted keys; the full product is run
      seeds: [0, 1, 2]
      labels: {data: [equal, digits-x4]}         # optional: a label per value of an axis
      baseline: {model.fusion: late}             # optional: the point differences are taken
                                                 # against (grid values, or a point label)
    evaluate:                   # per run, after training (`mmtool ls sweep-evaluations`)
      - eval-transfer: {task: digits, protocols: [kshot], ks: [1, 5], episodes: 50}
      - ablate: {batches: 10}

A grid value may be any YAML value: a list (a whole `data:` list per point) or a mapping
(`model: {fusion: mid, fusion_layer: 1}` sets both). Settings apply in the order: base `train:`,
`--set key=value`, the point's grid values, its seed; `--scale S` then multiplies `max_steps`,
`warmup` and `save_every` (the learning-rate schedule keeps its shape; batch, model, data and
evaluations are unchanged).

**Data.** A `data` entry `builtin:NAME[REST]` is the built-in source NAME preprocessed once into
`OUT/data/NAME` (shared by every run; locked, so parallel points do not race); REST (a weight
`=2`, per-folder options) is kept as written. `text_encoder: frozen:NAME` embeds the text of every
folder once into `OUT/embeddings` (`mmtool.embed.resolve_training_data`, the call behind
`mmtool train --text-encoder`) and trains on those folders.

**Runs.** Grid point × seed number I (point-major: I = point · len(seeds) + seed position) trains in
`OUT/runs/<label>-s<seed>/` with `mmtool.train.train`: an unfinished run is resumed, a finished one
(newest checkpoint at max_steps) is not retrained; each evaluation then writes its result in
`RUN/evals/<name>/`, and `RUN/sweep-result.json` (written last) holds the point's settings and
metrics. A run whose `sweep-result.json` matches its settings is skipped entirely, so a killed
sweep rerun finishes only what is missing, and `--point I` runs one point per process under any
launcher. The report (`mmtool.experiments.sweep_report`) is written when every point is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mmtool.config import _flatten, load_yaml_mapping, parse_value, set_value, to_dict
from mmtool.io import atomic_write_json, read_json_object
from mmtool import folders
from mmtool.errors import MMToolError

Say = Callable[[str], None]

SWEEP_KEYS = {"text_encoder": "learned"}
"""Run settings of a sweep that are not `TrainConfig` fields, with their defaults:
`text_encoder` (learned, or frozen:NAME as `mmtool train --text-encoder`)."""
MANAGED = ("out", "seed")
"""TrainConfig keys the sweep sets itself (the run folder, and `sweep.seeds`)."""
BUILTIN = "builtin:"
RESULT = "sweep-result.json"
"""Written last in a run folder: the point's settings and metrics; its presence means done."""


@dataclass
class Point:
    """One training run of the sweep: a grid point and a seed."""

    index: int
    """Position in the sweep's order (`--point I`)."""
    label: str
    """The grid point's readable label, e.g. `fusion-early` (`base` without a grid)."""
    values: dict[str, Any]
    """Grid key → value of this point."""
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.label}-s{self.seed}"


@dataclass
class SweepSpec:
    """A sweep: the base run, the grid, the seeds and the evaluations (see the module docstring)."""

    train: dict[str, Any] = field(default_factory=dict)
    """Flat dotted settings of the base run (`train:`, then `--set`)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted key → the values it takes (in order)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    labels: dict[str, list[str]] = field(default_factory=dict)
    """Grid key → a label per value (default: the value itself when short)."""
    name: str = "sweep"
    baseline: dict[str, Any] | None = None
    """Grid values of the point differences are taken against (default: the first point)."""
    evaluate: list[dict[str, Any]] = field(default_factory=list)
    """Evaluations per run: {"kind", "name", "settings"}."""
    scale: float = 1.0
    """Multiplies max_steps, warmup and save_every."""
    origin: str = "sweep"
    """Where the spec came from, for error messages."""


# -- the spec ------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    doc = load_yaml_mapping(path, str(path), "a mapping with train:, sweep: and evaluate:")
    unknown = set(doc) - {"train", "sweep", "evaluate"}
    if unknown:
        raise MMToolError(f"{path}: unknown block(s) {', '.join(sorted(unknown))} (blocks: train, sweep, evaluate)")
    return doc


def _split_flag(item: str, flag: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise MMToolError(f"{flag} {item!r}: expected key=value (e.g. {flag} model.fusion=early,late)")
    return key.strip(), value.strip()


def _parse_evaluations(items: Any, origin: str) -> list[dict[str, Any]]:
    """`evaluate:` entries, `{KIND: {settings}}` or `{kind: KIND, name: N, ...settings}`, checked
    against the evaluation registry (unknown kinds and settings are errors)."""
    from mmtool.experiments.sweep_evals import EVALUATIONS, check_settings

    if items is None:
        return []
    if not isinstance(items, list):
        raise MMToolError(f"{origin} evaluate: expected a list of evaluations")
    out, names = [], set()
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"kind": item}
        if isinstance(item, dict) and "kind" not in item and len(item) == 1:
            (kind, settings), = item.items()
            if not isinstance(settings or {}, dict):
                raise MMToolError(f"{origin} evaluate[{i}] {kind}: expected a mapping of settings, got {settings!r}")
            item = {"kind": kind, **(settings or {})}
        if not isinstance(item, dict) or "kind" not in item:
            raise MMToolError(f"{origin} evaluate[{i}]: expected {{KIND: {{settings}}}} "
                              f"(kinds: {', '.join(EVALUATIONS.names())})")
        settings = {k: v for k, v in item.items() if k not in ("kind", "name")}
        kind = str(item["kind"])
        EVALUATIONS.get(kind)  # unknown kind: lists the known ones
        check_settings(kind, settings, f"{origin} evaluate[{i}] {kind}")
        name = str(item.get("name") or kind)
        base, n = name, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        out.append({"kind": kind, "name": name, "settings": settings})
    return out


def load_spec(path: str | Path | None = None, grid: list[str] | None = None,
              seeds: list[int] | None = None, sets: list[str] | None = None,
              scale: float = 1.0, name: str | None = None) -> SweepSpec:
    """A `SweepSpec` from a sweep YAML (optional) and the CLI's flags, checked before anything runs.

    Args:
        path: the sweep file (`train:`, `sweep:`, `evaluate:`).
        grid: `KEY=V1,V2` axes (`--grid`): replace the file's axis of the same key or add one.
        seeds: replace `sweep.seeds`.
        sets: `KEY=VALUE` overrides of the base run (`--set`).
        scale: multiplies max_steps, warmup and save_every.
        name: the sweep's name (default: `sweep.name`, else the file's stem).

    Raises:
        MMToolError: unreadable file, unknown blocks, keys or evaluations, labels that do not fit.
    """
    doc = _read_yaml(Path(path)) if path else {}
    origin = str(path) if path else "sweep"
    block = doc.get("sweep") or {}
    if not isinstance(block, dict):
        raise MMToolError(f"{origin} sweep: expected a mapping (grid, seeds, labels, name, baseline)")
    unknown = set(block) - {"grid", "seeds", "labels", "name", "baseline"}
    if unknown:
        raise MMToolError(f"{origin} sweep: unknown key(s) {', '.join(sorted(unknown))} "
                          "(keys: grid, seeds, labels, name, baseline)")
    train_doc = doc.get("train") or {}
    if not isinstance(train_doc, dict):
        raise MMToolError(f"{origin} train: expected a mapping of `mmtool train --config` settings")
    base = dict(_flatten(train_doc))
    for item in sets or []:
        key, value = _split_flag(item, "--set")
        base[key] = value
    axes = {str(k): (v if isinstance(v, list) else [v]) for k, v in (block.get("grid") or {}).items()}
    for item in grid or []:
        key, value = _split_flag(item, "--grid")
        axes[key] = [parse_value(v.strip()) for v in value.split(",") if v.strip()]
    for key, values in axes.items():
        if not values:
            raise MMToolError(f"{origin} grid {key}: give at least one value")
    seed_list = [int(s) for s in (seeds if seeds is not None else block.get("seeds", [0]))]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise MMToolError(f"{origin} seeds: give distinct seeds, got {seed_list}")
    if not scale > 0:
        raise MMToolError(f"--scale must be > 0, got {scale}")
    labels = {}
    for key, value in (block.get("labels") or {}).items():
        if key not in axes or not isinstance(value, list) or len(value) != len(axes[key]):
            raise MMToolError(f"{origin} labels {key}: give a list with one label per value of grid "
                              f"axis {key} (axes: {', '.join(axes) or 'none'})")
        labels[key] = [str(v) for v in value]
    spec = SweepSpec(train=base, grid=axes, seeds=seed_list, labels=labels,
                     name=str(name or block.get("name") or (Path(path).stem if path else "sweep")),
                     baseline=block.get("baseline"), scale=float(scale), origin=origin,
                     evaluate=_parse_evaluations(doc.get("evaluate"), origin))
    pts = points(spec)
    for p in pts[::len(spec.seeds)]:  # every key of every point checked before anything runs
        if not train_config(spec, p, Path(".")).data:
            raise MMToolError(f"{origin}: point {p.label} has no training data: give train: data: "
                              "[builtin:NAME or DIR[=WEIGHT], ...] or --set data=DIR")
    baseline_point(spec, pts)
    return spec


# -- points --------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _value_label(spec: SweepSpec, key: str, i: int) -> str:
    if key in spec.labels:
        return _slug(spec.labels[key][i])
    value = spec.grid[key][i]
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return _slug(text) if len(text) <= 24 and not isinstance(value, (list, dict)) else f"v{i}"


def points(spec: SweepSpec) -> list[Point]:
    """Every grid point × seed, point-major (`--point I` numbers them in this order)."""
    keys = list(spec.grid)
    out: list[Point] = []
    for combo in itertools.product(*(range(len(spec.grid[k])) for k in keys)):
        label = "_".join(f"{_slug(k.rsplit('.', 1)[-1])}-{_value_label(spec, k, i)}"
                         for k, i in zip(keys, combo)) or "base"
        values = {k: spec.grid[k][i] for k, i in zip(keys, combo)}
        for seed in spec.seeds:
            out.append(Point(len(out), label, values, seed))
    seen: dict[str, dict] = {}
    for p in out:
        if seen.setdefault(p.label, p.values) != p.values:
            raise MMToolError(f"{spec.origin}: grid points {seen[p.label]} and {p.values} get the same "
                              f"label {p.label!r}; give sweep.labels for the axis")
    return out


def baseline_point(spec: SweepSpec, pts: list[Point]) -> str:
    """The label of the baseline point: `sweep.baseline`'s grid values, else the first point."""
    if not spec.baseline:
        return pts[0].label
    if isinstance(spec.baseline, str):
        if spec.baseline not in {p.label for p in pts}:
            raise MMToolError(f"{spec.origin} baseline {spec.baseline!r}: no grid point has this label "
                              f"(labels: {', '.join(dict.fromkeys(p.label for p in pts))})")
        return spec.baseline
    if not isinstance(spec.baseline, dict):
        raise MMToolError(f"{spec.origin} baseline: expected a mapping of grid values, e.g. {{model.fusion: late}}")
    for p in pts:
        if all(p.values.get(k) == v for k, v in spec.baseline.items()) and set(spec.baseline) <= set(p.values):
            return p.label
    raise MMToolError(f"{spec.origin} baseline {spec.baseline}: no grid point has these values "
                      f"(grid: {json.dumps(spec.grid, default=str)})")


def point_settings(spec: SweepSpec, point: Point) -> dict[str, Any]:
    """The point's flat settings: base, then grid values, then seed and scale."""
    settings = {**SWEEP_KEYS, **spec.train}
    for key, value in point.values.items():
        settings.update(_flatten(value, f"{key}.") if isinstance(value, dict) and key != "model.objectives"
                        else [(key, value)])
    for key in MANAGED:
        if key in settings:
            raise MMToolError(f"{spec.origin}: {key!r} is set by the sweep (run folders and sweep.seeds); "
                              "remove it from train:, --set and the grid")
    settings["seed"] = point.seed
    settings["scale"] = spec.scale
    return settings


def train_config(spec: SweepSpec, point: Point, out: Path) -> Any:
    """The point's `TrainConfig` (data entries not yet resolved) with out = OUT/runs/<run>."""
    from mmtool.train import TrainConfig

    settings = point_settings(spec, point)
    cfg = TrainConfig()
    for key, value in settings.items():
        if key in SWEEP_KEYS or key == "scale":
            continue
        try:
            set_value(cfg, key, value, f"{spec.origin} ({point.label})")
        except MMToolError as exc:
            if "unknown setting" in str(exc) and "." not in key:
                raise MMToolError(f"{exc}; sweep settings: {', '.join(SWEEP_KEYS)}") from None
            raise
    if spec.scale != 1.0:
        for key in ("max_steps", "warmup", "save_every"):
            setattr(cfg, key, max(1 if key != "warmup" else 0, int(round(getattr(cfg, key) * spec.scale))))
    cfg.out = Path(out) / "runs" / point.run_name
    return cfg


def identity(spec: SweepSpec, point: Point) -> dict[str, Any]:
    """What makes a run this point's run: its resolved TrainConfig (but the folder), text encoder
    and scale, JSON-ready — so `max_steps: 5` in YAML and `--set max_steps=5` are the same run."""
    cfg = to_dict(train_config(spec, point, Path(".")))
    cfg.pop("out", None)
    settings = point_settings(spec, point)
    return {**cfg, "text_encoder": str(settings.get("text_encoder")), "scale": spec.scale}


# -- data ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (parallel points share the data and embeddings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_data(data: list[str], text_encoder: str, out: Path, say: Say) -> list[str]:
    """`builtin:NAME[REST]` entries → `OUT/data/NAME[REST]` (preprocessed once), then the text
    encoder applied (`learned`: unchanged; `frozen:NAME`: text embedded once into OUT/embeddings)."""
    from mmtool.data.preprocess import PreprocessConfig, preprocess
    from mmtool.data.sources import SOURCES

    out = Path(out).resolve()
    resolved = []
    with _locked(out / ".data.lock"):
        for entry in data:
            if not entry.startswith(BUILTIN):
                resolved.append(entry)
                continue
            m = re.match(r"([A-Za-z0-9_-]+)(.*)$", entry[len(BUILTIN):])
            if not m or m.group(1) not in SOURCES:
                raise MMToolError(f"data {entry!r}: expected builtin:NAME[=WEIGHT...] with NAME a source "
                                  f"(`mmtool ls sources`: {', '.join(SOURCES.names())})")
            folder = out / "data" / m.group(1)
            if not (folder / "manifest.json").is_file():
                say(f"preprocessing {m.group(1)} into {folder}")
            preprocess(PreprocessConfig(m.group(1), folder, num_proc=1))
            resolved.append(f"{folder}{m.group(2)}")
        if text_encoder and text_encoder != "learned":
            from mmtool.embed import resolve_training_data

            resolved = resolve_training_data(resolved, None, text_encoder, out / "embeddings", notify=say)
    return resolved


# -- one point -----------------------------------------------------------------------------------
def _finished(cfg: Any) -> bool:
    """The run's newest checkpoint is at max_steps: training it again would do nothing."""
    from mmtool.train import checkpoint

    ckpts = checkpoint.list_checkpoints(Path(cfg.out)) if Path(cfg.out).is_dir() else []
    return bool(ckpts) and int(ckpts[-1].name.split("-")[1]) >= cfg.max_steps


def run_point(spec: SweepSpec, point: Point, out: Path, say: Say | None = None) -> dict[str, Any]:
    """Trains (or resumes, or skips) one point, runs its evaluations, writes RUN/sweep-result.json.

    Returns:
        The result: {"point", "settings", "metrics", "evaluations", "timings", "status"}, status
        "skipped" when a matching result was already there, else "done".

    Raises:
        MMToolError: the run folder holds a run with other settings, or training/evaluation fails.
    """
    say = say or (lambda _m: None)
    out = Path(out)
    cfg = train_config(spec, point, out)
    run = Path(cfg.out)
    ident = identity(spec, point)
    prev = read_json_object(run / RESULT)
    if prev is not None and prev.get("settings") == ident and prev.get("evaluate") == spec.evaluate:
        say(f"[{point.index}] {point.run_name}: done already, skipped")
        return {**prev, "status": "skipped"}
    marker = read_json_object(run / "sweep-point.json")
    if marker is not None and marker.get("settings") != ident:
        diff = sorted(k for k in set(marker["settings"]) | set(ident)
                      if marker["settings"].get(k) != ident.get(k))
        raise MMToolError(f"{run}: holds a run of other settings ({', '.join(diff)} differ); "
                          "use another --out or remove that folder")
    with folders.writer(run, "run", flag="run folder"):  # train() re-enters this lock
        return _run_point(spec, point, out, cfg, ident, say)


def _run_point(spec: SweepSpec, point: Point, out: Path, cfg: Any, ident: dict[str, Any],
               say: Say) -> dict[str, Any]:
    """`run_point` inside the claimed, locked run folder: data, training, evaluations, result."""
    from mmtool.experiments.sweep_evals import collect_metrics, run_evaluation
    from mmtool.train import train

    run = Path(cfg.out)
    settings = point_settings(spec, point)
    atomic_write_json(run / "sweep-point.json", {"label": point.label, "values": point.values,
                                                 "seed": point.seed, "settings": ident})
    t0 = time.perf_counter()
    cfg.data = resolve_data(list(cfg.data), settings.get("text_encoder", "learned"), out, say)
    timings: dict[str, float] = {"data_s": time.perf_counter() - t0}  # preprocess/embed: the first run pays
    if _finished(cfg):
        say(f"[{point.index}] {point.run_name}: trained already (step {cfg.max_steps}), not retrained")
    else:
        resume = (run / "config.json").is_file()
        say(f"[{point.index}] {point.run_name}: {'resuming' if resume else 'training'} ({cfg.max_steps} steps)")
        t0 = time.perf_counter()
        train(cfg, resume=resume)
        timings["train_s"] = time.perf_counter() - t0
    evals = {}
    for ev in spec.evaluate:
        t0 = time.perf_counter()
        say(f"[{point.index}] {point.run_name}: {ev['name']}")
        evals[ev["name"]] = str(run_evaluation(ev, run, point.seed))
        timings[f"{ev['name']}_s"] = time.perf_counter() - t0
    result = {"point": {"index": point.index, "label": point.label, "values": point.values,
                        "seed": point.seed, "run": point.run_name},
              "settings": ident, "evaluate": spec.evaluate, "config": to_dict(cfg),
              "metrics": collect_metrics(run, spec.evaluate), "evaluations": evals, "timings": timings}
    atomic_write_json(run / RESULT, result)
    return {**result, "status": "done"}


# -- the sweep -----------------------------------------------------------------------------------
def load_results(spec: SweepSpec, out: Path) -> dict[str, dict[str, Any] | None]:
    """run name → its sweep-result.json when present and of this spec's settings, else None."""
    res: dict[str, dict[str, Any] | None] = {}
    for p in points(spec):
        doc = read_json_object(Path(out) / "runs" / p.run_name / RESULT)
        res[p.run_name] = doc if doc and doc.get("settings") == identity(spec, p) else None
    return res


def run_sweep(spec: SweepSpec, out: str | Path, point: int | None = None, report_only: bool = False,
              say: Say | None = None) -> dict[str, Any]:
    """Runs the sweep (every point, or only `point`), then writes the report when all are done.

    Returns:
        {"points": [...], "ran": [run names trained or evaluated now], "skipped": [...],
         "missing": [...], "report": the report dict or None}.
    """
    from mmtool.experiments.sweep_report import write_report

    say = say or (lambda _m: None)
    out = Path(out)
    pts = points(spec)
    if point is not None and not 0 <= point < len(pts):
        raise MMToolError(f"--point {point}: this sweep has points 0..{len(pts) - 1} "
                          f"({len(pts) // len(spec.seeds)} grid points × {len(spec.seeds)} seeds)")
    ran, skipped = [], []
    if not report_only:
        folders.claim_shared(out, "sweep")  # parallel --point processes share the sweep folder
        for p in pts if point is None else [pts[point]]:
            res = run_point(spec, p, out, say)
            (skipped if res["status"] == "skipped" else ran).append(p.run_name)
    results = load_results(spec, out)
    missing = [name for name, r in results.items() if r is None]
    report = None
    if not missing or report_only:
        if all(r is None for r in results.values()):
            raise MMToolError(f"{out}: no finished run of this sweep to report on")
        report = write_report(spec, pts, results, out)
    return {"points": [p.run_name for p in pts], "ran": ran, "skipped": skipped,
            "missing": missing, "report": report}
