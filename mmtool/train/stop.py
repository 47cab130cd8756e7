"""Ctrl-C and preemption as a request to stop cleanly: SIGINT/SIGTERM set a flag the training loop
reads between steps, so the step in flight finishes, a checkpoint is written and the run exits with
"interrupted at step N; rerun the same command with --resume" (status 130). A second signal while
stopping restores the default behaviour (Ctrl-C twice abandons the step at once).

Preemptible clusters (Slurm, Kubernetes, spot instances) send SIGTERM and wait a grace period before
SIGKILL; one step plus one checkpoint must fit in it. Under `torchrun` every rank receives the
signal (torchrun forwards it), and the ranks agree on the stop with one all-reduce per step so that
all of them save at the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM only set `received` (main thread only;
    elsewhere it does nothing and `requested` reads False)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum
        for sig, old in self._previous.items():  # a second signal: default behaviour
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous = {}

    def requested(self, world: int = 1) -> bool:
        """Whether any rank received a stop signal (one all-reduce when `world` > 1: every rank must
        call this at the same point of the loop)."""
        flag = self.received is not None
        if world > 1:
            t = torch.tensor([int(flag)], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    @property
    def name(self) -> str:
        """The signal received, e.g. "SIGTERM" ("a stop request" when another rank got it)."""
        return signal.Signals(self.received).name if self.received else "a stop request"
