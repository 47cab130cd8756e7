"""What binds a run folder to its data and settings, checked on every `--resume`.

- **Data.** Every checkpoint records each `--data` folder's content sha256
  (`data.shards.content_sha256`: its manifest — every shard's sha256, tokenizers, counts, plan —
  without the raw inputs' mtimes; shards are verified against it when the loader opens them).
  `--resume` recomputes it and refuses, naming the folder, when one differs: a rebuilt or edited
  folder would silently change what the rest of the run reads. A merely touched raw input (new mtime, same content) is not a change.
- **Settings that shape the run** (`SHAPING`: the model, the data and how it is drawn and batched,
  the seed, gradient accumulation) cannot change on resume: the losses logged so far would not
  belong to the run config.json describes. `--resume` with another value is refused by name.
- **Settings of the schedule and bookkeeping** (everything else: `max_steps`, `lr`, `warmup`,
  clipping, checkpoint cadence, device, workers, probes, loggers) may change: continuing a run for
  more steps or at another learning rate is ordinary practice. The change is applied and recorded
  as a dated amendment in config.json, `amendments: [{"step", "date", "changes": {KEY: {"from",
  "to"}}}]`, so config.json always holds the settings in force and the history of how they got
  there; the CLI prints each amendment.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

from mmtool.data.shards import content_sha256
from mmtool.errors import MMToolError

SHAPING = ("model", "data", "strategy", "batch_tokens", "batch_samples", "temperature",
           "samples_per_epoch", "mix_by", "splits", "seed", "grad_accum")
"""TrainConfig fields a resumed run must keep (refused when they differ)."""

AMENDMENTS = "amendments"


def data_digests(folders: list[Any]) -> list[dict[str, str]]:
    """[{"path", "content_sha256"}] of a loader's folders (`TokenIndex.folders`), in order."""
    return [{"path": str(f.path), "content_sha256": content_sha256(f.manifest)} for f in folders]


def check_data(saved: Any, current: list[dict[str, str]], ckpt: Path) -> None:
    """Refuses a resume whose data folders differ from those the checkpoint was trained on.

    Args:
        saved: the checkpoint's `data` entry (state.json).
        current: `data_digests` of the folders this command opened.
        ckpt: the checkpoint (for the message).

    Raises:
        MMToolError: no record of the data (a checkpoint written before mmtool bound runs to their
            data), or a folder whose manifest sha256 changed.
    """
    if not isinstance(saved, list) or not all(isinstance(s, dict) for s in saved):
        raise MMToolError(f"--resume: checkpoint {ckpt} does not record its data folders' sha256 "
                          "(written by an older mmtool); start a new --out")
    if len(saved) != len(current):
        raise MMToolError(f"--resume: checkpoint {ckpt} was trained on {len(saved)} data folder(s), "
                          f"this command gives {len(current)}")
    for old, new in zip(saved, current):
        if old.get("content_sha256") != new["content_sha256"]:
            raise MMToolError(
                f"--resume: data folder {new['path']} changed since checkpoint {ckpt.name} (its "
                "shards differ: rebuilt or edited); resume with the data the run was trained on, "
                "or start a new --out")


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{key: {"from", "to"}} of the settings that differ between two `to_dict(TrainConfig)`s.

    Raises:
        MMToolError: a `SHAPING` setting differs (all of them named).
    """
    refused = [d for k in SHAPING for d in _differences(k, old.get(k), new.get(k))]
    if refused:
        detail = "; ".join(f"{k}={a!r} then, {b!r} now" for k, a, b in refused)
        raise MMToolError(f"--resume: the run was trained with other settings that shape it ({detail}); "
                          "use the same settings or a new --out")
    return {k: {"from": old.get(k), "to": v} for k, v in new.items()
            if k != AMENDMENTS and old.get(k) != v}


def _differences(key: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """[(dotted key, a, b)] where two settings differ, descending into nested settings."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(f"{key}.{k}", a.get(k), b.get(k))]
    return [] if a == b else [(key, a, b)]


def amend(doc: dict[str, Any], new: dict[str, Any], changes: dict[str, dict[str, Any]],
          step: int) -> dict[str, Any]:
    """config.json's document with `new` settings in force and the amendment appended."""
    history = list(doc.get(AMENDMENTS) or [])
    history.append({"step": step, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "changes": changes})
    return {**new, AMENDMENTS: history}


def describe(changes: dict[str, dict[str, Any]]) -> str:
    """One line: `lr 0.001 → 0.0005, max_steps 20 → 40`."""
    return ", ".join(f"{k} {c['from']!r} → {c['to']!r}" for k, c in changes.items())


def amendable_fields(cfg_type: type) -> tuple[str, ...]:
    """The fields of `cfg_type` (TrainConfig) that may be amended on resume, for docs and tests."""
    return tuple(f.name for f in dataclasses.fields(cfg_type) if f.name not in SHAPING + ("out",))
