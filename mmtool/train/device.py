"""Where a run executes: its device (`--device`), its precision (`--precision`) and its place in a
torchrun job (`Dist`). Used by `mmtool.train.loop`; one-line errors for what this machine lacks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmtool.errors import MMToolError


PRECISIONS = ("auto", "fp32", "bf16")
"""Values of `--precision`."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """`--precision` on `device`: bf16 or fp32 (auto: bf16 on CUDA only)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of `--precision` on `device` (bf16: matrix products in bfloat16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == "bf16")


@dataclass
class Dist:
    """This process's place in the job: rank, world size, local rank (1 process: 0, 1, 0)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Joins the torchrun job (NCCL on CUDA, gloo otherwise) when `WORLD_SIZE` > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The torch device of `--device` (auto: cuda when available); a one-line error otherwise."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name if name != "cuda" else f"cuda:{local_rank}")
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise MMToolError(f"--device {name!r}: not a device mmtool trains on ({', '.join(DEVICES)})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MMToolError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MMToolError(f"--device {name}: MPS is not available on this machine")
    return device
