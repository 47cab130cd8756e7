"""Experiment trackers: where each training step's metrics and the final eval numbers go.

`TrainConfig.loggers` (override `loggers=jsonl,tensorboard,wandb`) names entries of `LOGGERS`
(`mmtool ls loggers`). `jsonl` (RUN/metrics.jsonl) is the source of truth and is always on; the
others are optional packages, imported only when chosen (missing → `MMToolError` with the pip
command). Every logger receives each step's metrics line flattened (`losses/next-token`,
`probes/grad-norm/...`; numbers only), the run config once per session, and — from
`mmtool eval-transfer` and `mmtool ablate` — headline numbers via `log_eval`.

Run folder additions::

    RUN/metrics.csv       csv: one row per step; the header grows when a new key appears
                          (the file is then rewritten atomically with the wider header)
    RUN/evals.csv         csv: eval numbers, long format (step, key, value)
    RUN/tensorboard/      tensorboard: event files (SummaryWriter)
    RUN/wandb/            wandb: offline runs unless WANDB_MODE says otherwise
    RUN/mlflow.db         mlflow: local SQLite store (+ RUN/mlartifacts) unless MLFLOW_TRACKING_URI
    RUN/trackers.json     ids that let a resumed run or a later eval continue the same tracker run

Resume (`mmtool train --resume`): metrics.jsonl and metrics.csv drop the lines past the checkpoint
and the resumed run writes them again; TensorBoard purges them (`purge_step`); wandb continues the
same run id (`resume="allow"`: online, W&B ignores a re-logged step lower than the run's last;
offline, the new session's file holds them again); mlflow continues the same run id and, having no way to
delete metric points, keeps both copies of the re-done steps (equal values: resume is exact).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Iterable

from mmtool.errors import MMToolError
from mmtool.registry import Registry
from mmtool.io import atomic_write_text, read_json_object

LOGGERS: Registry[type["Logger"]] = Registry(
    "loggers", "experiment trackers for training metrics and eval numbers (`loggers=jsonl,tensorboard`)")

STATE_FILE = "trackers.json"


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics → `{"a/b/c": number}`; lists are indexed (`a/0`), non-numbers and bools skipped."""
    out: dict[str, float] = {}
    items: Iterable[tuple[Any, Any]] = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def require(package: str, logger: str) -> Any:
    """Imports `package` for `logger`, or raises `MMToolError` naming the pip command."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MMToolError(f"logger {logger!r} needs the {package!r} package: pip install {package} "
                          "(or pip install 'mmtool[trackers]')") from None


class Logger:
    """One tracker of one run.

    Args:
        run: the run folder.
        start_step: the last step already logged and kept (0: a fresh run); lines past it are
            dropped where the backend allows. None: reopened for `log_summary` only.
        state: this logger's entry of RUN/trackers.json (ids), saved when the set closes.
    """

    package: str | None = None
    """The optional package this logger needs: checked (with the pip command) before it opens."""

    def __init__(self, run: Path, start_step: int | None, state: dict[str, Any]):
        if self.package:
            require(self.package, getattr(type(self), "registry_name", self.package))
        self.run, self.start_step, self.state = Path(run), start_step, state
        self.notes: list[str] = []  # what opening found and repaired, for the user to read

    def log_config(self, config: dict[str, Any]) -> None:
        """Records the run config (once per session)."""

    def log_step(self, step: int, line: dict[str, Any], flat: dict[str, float]) -> None:
        """Records one step: the raw metrics line and its flattened numbers."""

    def log_summary(self, step: int, numbers: dict[str, float]) -> None:
        """Records headline numbers (flat keys) of an evaluation of the checkpoint at `step`."""

    def close(self, failed: bool = False) -> None:
        """Flushes and closes; `failed`: the session ended with an error."""


def read_metrics(run: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(the step lines of RUN/metrics.jsonl, how many lines were unreadable): a line cut by a crash
    (the torn tail of a killed run) or otherwise not a JSON object with an integer `step` is
    skipped and counted, never a traceback. A missing file reads as no lines."""
    pairs, bad = _metric_lines(Path(run) / "metrics.jsonl")
    return [line for _, line in pairs], bad


def _metric_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """([(raw line, parsed)], unreadable count) of a metrics.jsonl file (see `read_metrics`)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return [], 0
    pairs, bad = [], 0
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if isinstance(line, dict) and isinstance(line.get("step"), int) and not isinstance(line["step"], bool):
            pairs.append((raw, line))
        elif raw.strip():
            bad += 1
    return pairs, bad


@LOGGERS.register("jsonl")
class JsonlLogger(Logger):
    """RUN/metrics.jsonl, one JSON line per step: the source of truth, always on."""

    def __init__(self, run: Path, start_step: int | None, state: dict[str, Any]):
        super().__init__(run, start_step, state)
        self.path = self.run / "metrics.jsonl"
        self.file = None
        if start_step is None:
            return
        keep = []
        if start_step > 0:  # drop lines past the checkpoint, and torn ones (a killed run's tail)
            pairs, torn = _metric_lines(self.path)
            keep = [raw for raw, line in pairs if line["step"] <= start_step]
            if torn:
                self.notes.append(f"{self.path}: dropped {torn} torn or unreadable line(s) "
                                  "(an interrupted write); the steps they held are trained again")
        atomic_write_text(self.path, "".join(raw + "\n" for raw in keep))
        self.file = open(self.path, "a")

    def log_step(self, step: int, line: dict[str, Any], flat: dict[str, float]) -> None:
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self, failed: bool = False) -> None:
        if self.file is not None:
            self.file.close()


@LOGGERS.register("csv")
class CsvLogger(Logger):
    """RUN/metrics.csv, a row per step (flattened keys; the header grows), and RUN/evals.csv."""

    def __init__(self, run: Path, start_step: int | None, state: dict[str, Any]):
        super().__init__(run, start_step, state)
        self.path = self.run / "metrics.csv"
        self.columns: list[str] = ["step"]
        if start_step is None:
            return
        rows = []
        if self.path.exists() and start_step > 0:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                rows = [r for r in reader if int(float(r["step"])) <= start_step]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def log_step(self, step: int, line: dict[str, Any], flat: dict[str, float]) -> None:
        row = {"step": step, **{k: repr(v) for k, v in flat.items()}}  # repr: exact float round trip
        new = [k for k in row if k not in self.columns]
        if new:  # a key never seen: rewrite the file with the wider header
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows + [row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)

    def log_summary(self, step: int, numbers: dict[str, float]) -> None:
        path = self.run / "evals.csv"
        fresh = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if fresh:
                writer.writerow(["step", "key", "value"])
            writer.writerows([step, k, repr(v)] for k, v in numbers.items())


@LOGGERS.register("tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard event files in RUN/tensorboard (needs the `tensorboard` package)."""

    package = "tensorboard"

    def __init__(self, run: Path, start_step: int | None, state: dict[str, Any]):
        super().__init__(run, start_step, state)
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run / "tensorboard"
        # Resuming: events at or past start_step + 1 are purged (hidden) from what TensorBoard reads.
        purge = start_step + 1 if start_step is not None and folder.exists() else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge, flush_secs=10)

    def log_config(self, config: dict[str, Any]) -> None:
        text = "```\n" + json.dumps(config, indent=2) + "\n```"
        self.writer.add_text("config", text, self.start_step or 0)

    def log_step(self, step: int, line: dict[str, Any], flat: dict[str, float]) -> None:
        for key, value in flat.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, step: int, numbers: dict[str, float]) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbLogger(Logger):
    """Weights & Biases, offline in RUN/wandb unless WANDB_MODE is set (needs `wandb`)."""

    package = "wandb"

    def __init__(self, run: Path, start_step: int | None, state: dict[str, Any]):
        super().__init__(run, start_step, state)
        import wandb

        state.setdefault("id", secrets.token_hex(6))  # W&B ids: [a-z0-9]
        self.wb = wandb.init(project=os.environ.get("WANDB_PROJECT") or "mmtool", name=self.run.name,
                             id=state["id"], resume="allow", dir=str(self.run),
                             mode=os.environ.get("WANDB_MODE") or "offline",
                             settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log_config(self, config: dict[str, Any]) -> None:
        self.wb.config.update(config, allow_val_change=True)

    def log_step(self, step: int, line: dict[str, Any], flat: dict[str, float]) -> None:
        self.wb.log(flat, step=step)

    def log_summary(self, step: int, numbers: dict[str, float]) -> None:
        self.wb.summary.update({**numbers, "eval_step": step})

    def close(self, failed: bool = False) -> None:
        self.wb.finish(exit_code=1 if failed else 0)


_MLFLOW_KEY = re.compile(r"[^\w./\- ]")  # characters MLflow accepts in metric and param names


@LOGGERS.register("mlflow")
class MlflowLogger(Logger):
    """MLflow: a local SQLite store RUN/mlflow.db unless MLFLOW_TRACKING_URI is set (needs `mlflow`)."""

    package = "mlflow"

    def __init__(self, run: Path, start_step: int | None, state: dict[str, Any]):
        super().__init__(run, start_step, state)
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self.metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.run.resolve()}/mlflow.db"
        for name in ("alembic", "mlflow.store.db.utils"):  # its first-use table creation logs INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        self.fresh = not self._reuse(state.get("run_id"))
        if self.fresh:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mmtool"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI")
                else (self.run.resolve() / "mlartifacts").as_uri())
            state["run_id"] = self.client.create_run(exp_id, run_name=self.run.name).info.run_id
        state["tracking_uri"] = uri
        self.run_id = state["run_id"]

    def _reuse(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - not in this store (another MLFLOW_TRACKING_URI): new run
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _send(self, step: int, numbers: dict[str, float]) -> None:
        ms = int(time.time() * 1000)
        metrics = [self.metric(_safe_key(k), v, ms, step) for k, v in numbers.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_config(self, config: dict[str, Any]) -> None:
        if not self.fresh:  # MLflow params cannot change; a resumed run keeps its first config
            return
        from mlflow.entities import Param

        params = [Param(_safe_key(k), str(v)[:6000]) for k, v in _leaves(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_step(self, step: int, line: dict[str, Any], flat: dict[str, float]) -> None:
        self._send(step, flat)

    def log_summary(self, step: int, numbers: dict[str, float]) -> None:
        self._send(step, numbers)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _safe_key(key: str) -> str:
    """`key` with the characters MLflow refuses in names replaced by `_`, so every tracker shows
    the same name."""
    return _MLFLOW_KEY.sub("_", key)


def _leaves(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested config as `{"a/b": value}` (lists and strings kept whole)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve(names: Iterable[str] | None) -> list[str]:
    """Logger names, checked, deduplicated, `jsonl` first (added when missing).

    Raises:
        MMToolError: an unknown name, or a logger whose package is not installed (named, with pip).
    """
    out = ["jsonl"]
    for name in names or []:
        name = name.strip()
        if name and name not in out:
            out.append(name)
    for name in out:
        package = LOGGERS.get(name).package
        if package and importlib.util.find_spec(package) is None:
            require(package, name)  # raises with the pip command
    return out


class Trackers:
    """The open loggers of one run, used as a context manager: closes them all on exit (also on
    error, marking the tracker runs failed) and saves RUN/trackers.json."""

    def __init__(self, run: Path, loggers: dict[str, Logger], state: dict[str, Any]):
        self.run, self.loggers, self.state = Path(run), loggers, state

    @property
    def notes(self) -> list[str]:
        """What the loggers found and repaired when they opened (e.g. a torn metrics line)."""
        return [n for logger in self.loggers.values() for n in logger.notes]

    def log_config(self, config: dict[str, Any]) -> None:
        for logger in self.loggers.values():
            logger.log_config(config)

    def log_step(self, line: dict[str, Any]) -> None:
        """Sends one step's metrics line (with its `step`) to every logger."""
        flat = {k: v for k, v in flatten(line).items() if k != "step"}
        for logger in self.loggers.values():
            logger.log_step(int(line["step"]), line, flat)

    def log_summary(self, step: int, numbers: dict[str, float]) -> None:
        for logger in self.loggers.values():
            logger.log_summary(step, numbers)

    def close(self, failed: bool = False) -> None:
        errors = []
        for logger in self.loggers.values():
            try:
                logger.close(failed)
            except Exception as exc:  # noqa: BLE001 - close the others, then report
                errors.append(exc)
        self.loggers = {}
        _save_state(self.run, self.state)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(failed=True)
        except Exception:  # noqa: BLE001 - the error that stopped the run is the one to report
            pass


def _save_state(run: Path, state: dict[str, Any]) -> None:
    state = {k: v for k, v in state.items() if v}  # loggers with no ids to keep leave no entry
    if not state:
        return
    tmp = run / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, run / STATE_FILE)


def open_trackers(run: str | Path, names: Iterable[str], start_step: int | None,
                  enabled: bool = True) -> Trackers:
    """Opens the named loggers of `run` (see `Logger` for `start_step`).

    Args:
        run: the run folder (created when missing).
        names: logger names (`resolve` adds jsonl).
        start_step: the last step kept (0: fresh run); None: reopen for eval numbers only.
        enabled: False (ranks other than 0): an empty set that logs nothing.
    """
    run = Path(run)
    if not enabled:
        return Trackers(run, {}, {})
    run.mkdir(parents=True, exist_ok=True)
    path = run / STATE_FILE
    try:
        state = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        raise MMToolError(f"{path}: not valid JSON; delete it to start new tracker runs") from None
    opened = Trackers(run, {}, state)
    try:
        for name in resolve(names):
            opened.loggers[name] = LOGGERS.get(name)(run, start_step, state.setdefault(name, {}))
    except BaseException:
        opened.close(failed=True)
        raise
    _save_state(run, state)  # a crash later still leaves the ids to continue from
    return opened


def run_loggers(run: str | Path) -> list[str]:
    """The loggers a run was trained with (RUN/config.json `loggers`; ["jsonl"] when absent)."""
    names = (read_json_object(Path(run) / "config.json") or {}).get("loggers")
    return [str(n) for n in names] if isinstance(names, list) else ["jsonl"]


def log_eval(run: str | Path, step: int | None, numbers: dict[str, float]) -> list[str]:
    """Sends eval headline numbers (flat keys) to the trackers `run` was trained with, continuing
    their runs, at the evaluated checkpoint's `step` (None: the newest checkpoint's); returns the
    logger names (jsonl ignores eval numbers: the eval's own JSON report is their record)."""
    names = run_loggers(run)
    if names == ["jsonl"] or not numbers:
        return names
    if step is None:
        from mmtool.train.checkpoint import list_checkpoints

        ckpts = list_checkpoints(Path(run))
        step = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
    with open_trackers(run, names, None) as trackers:
        trackers.log_summary(step, numbers)
    return names


def transfer_numbers(report: dict[str, Any]) -> dict[str, float]:
    """eval-transfer's headline numbers: per task/protocol/setting the gain (pretrained − scratch)
    with its 95% interval ends, and both scores: `transfer/TASK/PROTOCOL[/SETTING]/gain`, ...
    (characters some trackers refuse become `_`: setting `k=1` → `k_1`)."""
    out: dict[str, float] = {}
    for task, entry in report.get("tasks", {}).items():
        for proto, res in entry.get("results", {}).items():
            for row in res.get("rows") or []:
                key = _safe_key("/".join(p for p in ("transfer", task, proto, row.get("setting") or "") if p))
                lo, hi = row.get("gain_ci95") or (None, None)
                for name, value in (("gain", row.get("gain")), ("gain_ci95_low", lo), ("gain_ci95_high", hi),
                                    ("pretrained", row.get("pretrained")), ("scratch", row.get("scratch"))):
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        out[f"{key}/{name}"] = float(value)
    return out


def ablation_numbers(result: dict[str, Any]) -> dict[str, float]:
    """ablate's headline numbers: each modality's importance (over the twin when used) with its 95%
    interval ends, per mode: `ablation/MODALITY/MODE/importance`, `..._ci95_low`, `..._ci95_high`."""
    out: dict[str, float] = {}
    for modality, modes in result.get("results", {}).items():
        for mode, entry in modes.items():
            imp = entry.get("importance") or {}
            lo, hi = imp.get("ci95") or (None, None)
            for name, value in (("importance", imp.get("value")), ("importance_ci95_low", lo),
                                ("importance_ci95_high", hi)):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    out[_safe_key(f"ablation/{modality}/{mode}/{name}")] = float(value)
    return out
