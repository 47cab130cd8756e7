"""Checkpoints: safetensors for tensors, JSON for everything else, one folder per step, atomic.

    RUN/checkpoints/step-00000200/
        model.safetensors       the model's state_dict
        optimizer.safetensors   every tensor of the optimizer state, keyed "state.<param>.<name>"
        state.json              step, optimizer param groups and scalars, loader positions per
                                rank, the run's config, its data folders' manifest sha256
                                (`mmtool.train.resume`), sha256 of both tensor files, and `digest`:
                                the sha256 of the rest of state.json itself

A checkpoint is written into a temporary folder and renamed into place, so a folder named
`step-*` is always complete; the oldest are deleted beyond `keep_last`. Nothing is ever unpickled:
tensors load through safetensors, the rest is JSON.

Integrity is not optional: a checkpoint is read only when state.json has its `digest` and the sha256
of both tensor files, every one of them matches, and its `step` is the one its folder is named
after. An edited step or loader position, a removed hash or a flipped tensor byte are refused by
name instead of resuming into a run that diverges.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmtool.io import atomic_write_json, sha256_file
from mmtool.errors import MMToolError

STEP_DIR = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


def state_digest(doc: dict[str, Any]) -> str:
    """The sha256 of a state.json document without its own `digest` (canonical JSON)."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits `optimizer.state_dict()` into tensors (safetensors) and JSON scalars."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in doc["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": doc["param_groups"]}


def save(run_dir: Path, step: int, model: torch.nn.Module | dict[str, Any],
         optimizer: torch.optim.Optimizer | dict[str, Any], extra: dict[str, Any], keep_last: int = 3) -> Path:
    """Writes checkpoint `step` atomically and prunes old ones; returns its folder. `model` and
    `optimizer` are the modules or their (unsharded) state_dicts (`mmtool.train.distributed.full_state`)."""
    model_state = model if isinstance(model, dict) else model.state_dict()
    opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
        save_file(state, str(tmp / "model.safetensors"))
        opt_tensors, opt_doc = _optimizer_split(opt_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        doc = {"step": step, "optimizer": opt_doc, **extra,
               "sha256": {name: sha256_file(tmp / name) for name in TENSOR_FILES}}
        doc["digest"] = state_digest(doc)
        atomic_write_json(tmp / "state.json", doc)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def step_of(path: Path) -> int:
    """The step a checkpoint folder is named after (`step-00000200` → 200)."""
    return int(Path(path).name.split("-")[1])


def _shape_error(doc: Any) -> str | None:
    """What is wrong with the shape of a state.json document (None: nothing)."""
    if not isinstance(doc, dict):
        return f"holds {type(doc).__name__}, not an object"
    expected = {"step": int, "optimizer": dict, "sha256": dict, "digest": str}
    for key, kind in expected.items():
        if key not in doc:
            return f"has no {key!r}" + (" (integrity is mandatory: checkpoints without it are refused)"
                                        if key in ("sha256", "digest") else "")
        if not isinstance(doc[key], kind) or isinstance(doc[key], bool):
            return f"{key!r} is {type(doc[key]).__name__}, expected {kind.__name__}"
    opt = doc["optimizer"]
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars"), dict):
        return "'optimizer' lacks its param_groups list or scalars object"
    missing = [name for name in TENSOR_FILES if not isinstance(doc["sha256"].get(name), str)]
    if missing:
        return f"has no sha256 of {', '.join(missing)} (integrity is mandatory)"
    if "loader" in doc and not (isinstance(doc["loader"], list)
                                and all(isinstance(s, dict) for s in doc["loader"])):
        return "'loader' must be a list of objects (one loader state per rank)"
    return None


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, after checking its shape, digest and step.

    Raises:
        MMToolError: missing or unparsable, of the wrong shape, without or with a wrong `digest`
            (edited), or a `step` other than the folder's.
    """
    path = Path(path)
    try:
        doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MMToolError(f"checkpoint {path}: state.json is missing or corrupt ({exc})") from None
    problem = _shape_error(doc)
    if problem:
        raise MMToolError(f"checkpoint {path}: state.json {problem}")
    if doc["digest"] != state_digest(doc):
        raise MMToolError(f"checkpoint {path}: state.json was modified after it was written (its digest "
                          "does not match); use an earlier checkpoint or start a new run")
    if STEP_DIR.match(path.name) and doc["step"] != step_of(path):
        raise MMToolError(f"checkpoint {path}: state.json says step {doc['step']}, its folder step "
                          f"{step_of(path)}")
    return doc


def check_file(path: Path, doc: dict[str, Any], name: str) -> Path:
    """`path/name` after checking it against the sha256 in state.json; returns its path.

    Raises:
        MMToolError: the file is missing or its sha256 differs.
    """
    file = Path(path) / name
    if not file.is_file() or sha256_file(file) != doc["sha256"][name]:
        raise MMToolError(f"checkpoint {path}: {name} is missing or corrupt (sha256 mismatch)")
    return file


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint folder: (model state, optimizer state_dict, state.json).

    Raises:
        MMToolError: missing files, a sha256 or digest mismatch, a state.json of the wrong shape or
            step, or files safetensors cannot read.
    """
    path = Path(path)
    doc = read_state(path)
    for name in TENSOR_FILES:
        check_file(path, doc, name)
    try:
        model_state = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer = _optimizer_join(opt_tensors, doc["optimizer"])
    except (SafetensorError, OSError) as exc:
        raise MMToolError(f"checkpoint {path}: cannot read tensors ({exc})") from None
    except (ValueError, KeyError, AttributeError) as exc:
        raise MMToolError(f"checkpoint {path}: optimizer state does not parse ({exc!r})") from None
    return model_state, optimizer, doc
