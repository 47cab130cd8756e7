"""Checkpoints: safetensors for tensors, JSON for everything else, one folder per step, atomic.

    RUN/checkpoints/step-00000200/
        model.safetensors       the model's state_dict
        optimizer.safetensors   every tensor of the optimizer state, keyed "state.<param>.<name>"
        state.json              step, optimizer param groups and scalars, scheduler, loader
                                positions per rank, the model config, sha256 of both tensor files

A checkpoint is written into a temporary folder and renamed into place, so a folder named
`step-*` is always complete; the oldest are deleted beyond `keep_last`. Nothing is ever unpickled:
tensors load through safetensors, the rest is JSON.
"""

from __future__ import annotations

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


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], keep_last: int = 3) -> Path:
    """Writes checkpoint `step` atomically and prunes old ones; returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        opt_tensors, opt_doc = _optimizer_split(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        doc = {"step": step, "optimizer": opt_doc, **extra,
               "sha256": {name: sha256_file(tmp / name)
                          for name in ("model.safetensors", "optimizer.safetensors")}}
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


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint folder: (model state, optimizer state_dict, state.json).

    Raises:
        MMToolError: missing files, a sha256 mismatch, or files safetensors cannot read.
    """
    path = Path(path)
    try:
        doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MMToolError(f"checkpoint {path}: state.json is missing or corrupt ({exc})") from None
    for name, digest in doc.get("sha256", {}).items():
        file = path / name
        if not file.is_file() or sha256_file(file) != digest:
            raise MMToolError(f"checkpoint {path}: {name} is missing or corrupt (sha256 mismatch)")
    try:
        model_state = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise MMToolError(f"checkpoint {path}: cannot read tensors ({exc})") from None
    return model_state, _optimizer_join(opt_tensors, doc["optimizer"]), doc
