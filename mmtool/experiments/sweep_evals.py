"""The evaluations `mmtool sweep` runs on each trained run, and the metrics it reads from a run.

Evaluations are a registry (`mmtool ls sweep-evaluations`); each takes its settings from an
`evaluate:` entry of the sweep file, writes its result in `RUN/evals/<name>/` with an
`evaluation.json` of the settings it ran with (a rerun with the same settings reuses it), and has
a metric reader. Built in:

* `eval-transfer`: `mmtool eval-transfer` (`mmtool.transfer.evaluate.evaluate_transfer`) with the
  run's seed; settings `task`/`tasks`, `protocols`, `ks`, `episodes`, `fractions`, `steps`,
  `bootstrap`, `modalities`, `held_out`. Metrics per row: `NAME/TASK/PROTOCOL SETTING/pretrained`,
  `.../scratch`, `.../gain`, each with the row's own 95% interval.
* `ablate`: `mmtool ablate` (`mmtool.analysis.ablate.ablate`) with the run's seed; settings `modes`,
  `batches`, `batch_samples`, `split`, `metric`, `twin`, `modalities`, `bootstrap`. Metrics:
  `NAME/MODALITY/MODE/importance` with its interval and status.

Always collected, from metrics.jsonl through `mmtool.analysis.report.summarize` (the same tail rule as
`mmtool report`: the mean over the last 20% of steps, with an interval over those steps):
`loss`, `loss/SOURCE` per source folder (an embedding folder under the name of the folder it was
embedded from), `objective/NAME` per objective, `tokens_per_s` (median over steps), `grad_norm`
and `grad_norm_cv` (mean and std / mean after warm-up), `train_seconds` (sum of step times).

Each metric carries a direction for the sweep's verdicts: -1 lower is better (losses, seconds),
+1 higher is better (throughput, transfer accuracy and gain), 0 neither (importance, grad-norm CV).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from mmtool.config import set_value
from mmtool.io import atomic_write_json, read_json_object
from mmtool.errors import MMToolError
from mmtool.registry import Registry

Metric = dict[str, Any]
"""{"value": float | None, "ci95": [low, high] | None, "direction": -1 | 0 | 1, "status"?: str}."""


class Evaluation:
    """One kind of evaluation: its settings (`aliases` → config keys), how it runs, what it yields."""

    aliases: dict[str, str] = {}
    result_file = "result.json"

    def config(self, run: Path, out: Path, seed: int, settings: dict[str, Any], origin: str) -> Any:
        raise NotImplementedError

    def run(self, cfg: Any, out: Path) -> None:
        raise NotImplementedError

    def metrics(self, name: str, doc: dict[str, Any]) -> dict[str, Metric]:
        raise NotImplementedError

    def _apply(self, cfg: Any, settings: dict[str, Any], origin: str) -> Any:
        for key, value in settings.items():
            set_value(cfg, self.aliases.get(key, key), value, origin)
        return cfg


EVALUATIONS: Registry[type[Evaluation]] = Registry(
    "sweep-evaluations", "what `mmtool sweep` evaluates on each run (`evaluate:` in a sweep file)")


def _ci(row: dict[str, Any], key: str) -> list[float] | None:
    ci = row.get(f"{key}_ci95")
    return [float(c) if c is not None else float("nan") for c in ci] if ci else None


@EVALUATIONS.register("eval-transfer")
class TransferEvaluation(Evaluation):
    """`mmtool eval-transfer` on the run (pretrained vs scratch, per task, protocol and setting)."""

    aliases = {"task": "tasks", "protocol": "protocols", "ks": "protocol.ks", "k": "protocol.ks",
               "episodes": "protocol.episodes", "fractions": "protocol.fractions",
               "steps": "protocol.steps", "bootstrap": "protocol.bootstrap",
               "batch_size": "protocol.batch_size"}
    result_file = "report.json"

    def config(self, run, out, seed, settings, origin):
        from mmtool.transfer.evaluate import TransferConfig

        cfg = self._apply(TransferConfig(run=run, out=out), settings, origin)
        cfg.run, cfg.out, cfg.protocol.seed = run, out, seed
        if isinstance(cfg.tasks, str):
            cfg.tasks = [cfg.tasks]
        return cfg

    def run(self, cfg, out):
        from mmtool.transfer.evaluate import evaluate_transfer

        evaluate_transfer(cfg)

    def metrics(self, name, doc):
        out: dict[str, Metric] = {}
        for task, entry in (doc.get("tasks") or {}).items():
            for proto, res in ((entry or {}).get("results") or {}).items():
                for row in (res or {}).get("rows") or []:
                    base = f"{name}/{task}/{proto}" + (f" {row['setting']}" if row.get("setting") else "")
                    for key, direction in (("pretrained", 1), ("scratch", 0), ("gain", 1)):
                        if isinstance(row.get(key), (int, float)):
                            out[f"{base}/{key}"] = {"value": float(row[key]), "ci95": _ci(row, key),
                                                    "direction": direction}
                    if f"{base}/gain" in out and row.get("verdict"):
                        out[f"{base}/gain"]["status"] = row["verdict"]
        return out


@EVALUATIONS.register("ablate")
class AblateEvaluation(Evaluation):
    """`mmtool ablate` on the run: each modality dropped/permuted, importance over the untrained twin."""

    result_file = "ablation.json"

    def config(self, run, out, seed, settings, origin):
        from mmtool.analysis.ablate import AblateConfig

        cfg = self._apply(AblateConfig(run=run), settings, origin)
        cfg.run, cfg.seed = run, seed
        return cfg

    def run(self, cfg, out):
        from mmtool.analysis.ablate import ablate
        from mmtool.analysis.report import plot_ablation

        result = ablate(cfg)
        atomic_write_json(out / "ablation.json", result)
        plot_ablation(result, out / "ablation.png")

    def metrics(self, name, doc):
        out: dict[str, Metric] = {}
        for mod, modes in (doc.get("results") or {}).items():
            for mode, entry in modes.items():
                imp = entry.get("importance") or {}
                if isinstance(imp.get("value"), (int, float)):
                    out[f"{name}/{mod}/{mode}/importance"] = {
                        "value": float(imp["value"]), "ci95": imp.get("ci95"), "direction": 0,
                        "status": imp.get("status")}
        return out


def check_settings(kind: str, settings: dict[str, Any], origin: str) -> None:
    """Raises MMToolError naming the key when `settings` has one the evaluation does not know."""
    ev = EVALUATIONS.get(kind)()
    probe = ev.config(Path("RUN"), Path("OUT"), 0, {}, origin)
    valid = sorted(set(ev.aliases) | ({f.name for f in fields(probe)} - {"run", "out", "seed"}))
    for key in settings:
        if key not in valid and key.split(".")[0] not in valid:
            raise MMToolError(f"{origin}: unknown setting {key!r} (settings: {', '.join(valid)})")
    ev.config(Path("RUN"), Path("OUT"), 0, settings, origin)  # values coerce, or name the key


def run_evaluation(ev: dict[str, Any], run: Path, seed: int) -> Path:
    """Runs one `evaluate:` entry on `run` (reusing a result of the same settings); its result file."""
    impl = EVALUATIONS.get(ev["kind"])()
    out = Path(run) / "evals" / ev["name"]
    record = {"kind": ev["kind"], "settings": ev["settings"], "seed": seed}
    result = out / impl.result_file
    same = read_json_object(out / "evaluation.json") == record and result.is_file()
    if not same:
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").unlink(missing_ok=True)
        impl.run(impl.config(Path(run), out, seed, ev["settings"], f"evaluate {ev['name']}"), out)
        atomic_write_json(out / "evaluation.json", record)
    return result


def _metric(entry: dict[str, Any] | None, direction: int) -> Metric | None:
    if not entry or entry.get("mean") is None:
        return None
    ci = entry.get("ci95")
    return {"value": float(entry["mean"]), "direction": direction,
            "ci95": None if not ci or ci[0] is None else [float(c) for c in ci]}


def source_names(run: Path) -> dict[str, str]:
    """Folder name → the name its loss is reported under: an embedding folder (`mmtool embed`,
    `text_encoder: frozen:NAME`) by the folder it was embedded from, so that `loss/digits` of a
    frozen-text run pairs with `loss/digits` of a learned one; other folders by their own name."""
    from mmtool.data.mixture import parse_data_specs

    try:
        data = json.loads((Path(run) / "config.json").read_text()).get("data") or []
        specs = parse_data_specs([str(d) for d in data])
    except (OSError, ValueError, MMToolError):
        return {}
    names = {}
    for spec in specs:
        manifest = read_json_object(Path(spec.path) / "manifest.json")
        if manifest is None:
            continue
        source = ((manifest.get("embedding") or {}).get("source") or {}).get("path")
        if source:
            names[Path(spec.path).name] = Path(source).name
    return names


def training_metrics(run: Path) -> dict[str, Metric]:
    """The always-collected metrics of a run folder (see the module docstring)."""
    from mmtool.analysis.report import summarize

    final = summarize(Path(run)).get("final") or {}
    out: dict[str, Metric] = {}
    if (m := _metric(final.get("loss_tail"), -1)) is not None:
        out["loss"] = m
    renamed = source_names(run)
    for src, entry in (final.get("by_source") or {}).items():
        if (m := _metric(entry, -1)) is not None:
            out[f"loss/{renamed.get(src, src)}"] = {**m, "folder": src} if src in renamed else m
    for obj, value in (final.get("losses_tail") or {}).items():
        out[f"objective/{obj}"] = {"value": float(value), "ci95": None, "direction": -1}
    if final.get("tokens_per_s") is not None:
        out["tokens_per_s"] = {"value": float(final["tokens_per_s"]), "ci95": None, "direction": 1}
    if final.get("grad_norm"):
        out["grad_norm"] = {"value": float(final["grad_norm"]["mean"]), "ci95": None, "direction": 0}
        out["grad_norm_cv"] = {"value": float(final["grad_norm"]["cv"]), "ci95": None, "direction": 0}
    if final.get("seconds") is not None:
        out["train_seconds"] = {"value": float(final["seconds"]), "ci95": None, "direction": -1}
    return out


def collect_metrics(run: Path, evaluations: list[dict[str, Any]]) -> dict[str, Metric]:
    """Training metrics, then each evaluation's, read from the files in the run folder."""
    out = training_metrics(run)
    for ev in evaluations:
        impl = EVALUATIONS.get(ev["kind"])()
        path = Path(run) / "evals" / ev["name"] / impl.result_file
        doc = read_json_object(path)
        if doc is None:
            raise MMToolError(f"{path}: the {ev['name']} result is missing or unreadable; rerun the sweep")
        out.update(impl.metrics(ev["name"], doc))
    return out

