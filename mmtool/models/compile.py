"""`--compile`: `torch.compile` on the per-token work of a packed step, with a bounded number of graphs.

A packed batch changes shape every step (its row count N is whatever the samples add up to), so
compiling `UnifiedModel.forward` as is would recompile every step, and most of the forward is
host-side bookkeeping (plans, dicts of metrics) that compiles to nothing anyway. What is compiled:

* on CUDA (`SETTINGS.blocks`; on CPU it did not pay, measured there), the two per-token halves of
  every trunk block, split at attention (`Block.before_attention`:
  ln1 → qkv; `Block.after_attention`: proj → residual → ln2 → MLP → residual). One graph serves
  every block of the model (their parameters are graph inputs) and every model of that size.
* the tied output heads' loss (`objectives.tied_head_loss`: rows @ tableᵀ → log-softmax → NLL),
  used by next-token and masked-token. With a 30k-word text vocabulary its `[n, V]` logits are the
  largest tensors of a step and eager log-softmax + NLL pass over them five times (the NLL
  backward alone zero-fills a second `[n, V]`); compiled, the passes fuse.

Attention stays eager: it is the one step that mixes rows, and its packed backends plan their work
on the host from the sample lengths (which vary every step); SDPA is one fused kernel already.
The encoders stay eager too: they are embedding-table gathers and one small linear per stream.

Bounded recompiles. Every compiled call gets its rows padded up to a bucket (`Buckets`: the row
count rounded up, keeping its leading `bits` bits, never below `granularity`), and, in the default
`dynamic` mode, that row dimension is marked dynamic (`torch._dynamo.mark_dynamic`), so one graph
serves all buckets: a run compiles each function once (again for `no_grad` evaluation; the heads
once more when a second vocabulary size turns that dimension dynamic too). With `dynamic=False` each bucket is a
static graph of its own: ⌈log2(max/min rows)⌉ · 2^(bits-1) graphs at most per function.
Padding rows are zeros (targets -100 in the heads), computed on but never read: blocks are
per-token, so a padding row cannot reach a real one, and the heads' loss is 0 on them. Compiled
and eager losses agree to float tolerance (tests/models/test_compile.py).

`compile_model(model)` installs the compiled functions on one model (in place; `copy.deepcopy`
keeps them); `stats()` counts the graphs compiled in this process. While forward hooks watch an
attention module (the `attention` training probe), its blocks run eagerly so the hooks still fire.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._functorch import config as functorch_config

from mmtool.models.fusion import Block, Grouping, attend
from mmtool.models.objectives import tied_head_loss


@dataclass(frozen=True)
class Buckets:
    """Row counts rounded up to a few sizes: n → the smallest bucket ≥ n.

    Attributes:
        bits: leading bits of n kept: 2^(bits-1) buckets per doubling, padding ≤ 1 / (2^(bits-1) + 1).
        granularity: the smallest bucket, and a multiple of every bucket.
    """

    bits: int = 3
    granularity: int = 64

    def size(self, n: int) -> int:
        """The bucket of `n` rows (≥ n; 0 stays 0)."""
        if n <= 0:
            return 0
        step = max(self.granularity, 1 << max((n - 1).bit_length() - self.bits, 0))
        return -(-n // step) * step


@dataclass
class CompileSettings:
    """How `compile_model` compiles (one per process: the compiled functions are shared)."""

    buckets: Buckets = Buckets()
    """Row buckets of every compiled call."""
    dynamic: bool = True
    """Mark the (bucketed) row dimension dynamic: one graph for all buckets. False: one static
    graph per bucket."""
    blocks: bool | None = None
    """Compile the trunk blocks too. None: on CUDA only. On the 2-core dev CPU (1 thread, `small`,
    4096-token mixed batches; `benchmarks/compile.py --blocks on --parts`) the compiled trunk took
    1.07× the eager trunk's CPU time (1.04 s vs 0.97 s forward + backward), while the compiled text
    head took 0.86× (1.09 s vs 1.27 s; its bare matmuls 1.05 s): on a CPU the blocks are
    matmul-bound and the generated LayerNorm/GELU kernels gain nothing. On a GPU the same fusion
    saves kernel launches and memory passes (not measured here)."""
    backend: str = field(default_factory=lambda: os.environ.get("MMTOOL_COMPILE_BACKEND", "inductor"))
    """"inductor" (generated kernels), or "aot_eager": dynamo and AOTAutograd capture the same
    graphs (same guards, recompiles, buckets, forward/backward split) and run them with eager
    kernels, in seconds — a testing aid, also settable for CLI subprocesses through the environment
    variable MMTOOL_COMPILE_BACKEND."""


SETTINGS = CompileSettings()


@dataclass
class CompileStats:
    """Graphs compiled in this process: `graphs` (dynamo frames handed to inductor, recompiles
    included) and `seconds` spent in the backend's forward compile (backward graphs compile
    lazily, on the first backward: part of the first step's time, not of `seconds`)."""

    graphs: int = 0
    seconds: float = 0.0


_STATS = CompileStats()


def stats() -> CompileStats:
    """A copy of this process's compile counters."""
    return CompileStats(_STATS.graphs, _STATS.seconds)


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """The `SETTINGS.backend` compiler, counting each graph it is handed (compiles and recompiles)."""
    from torch._inductor.compile_fx import compile_fx

    _STATS.graphs += 1
    if SETTINGS.backend == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    start = time.perf_counter()
    try:
        return compile_fx(gm, example_inputs)
    finally:
        _STATS.seconds += time.perf_counter() - start


def _compiled(fn: Callable) -> Callable:
    """`torch.compile(fn)` with the counting backend, made once per process, function and mode."""
    return _compiled_for(fn, SETTINGS.dynamic, SETTINGS.backend)


@functools.lru_cache(maxsize=None)
def _compiled_for(fn: Callable, dynamic: bool, backend: str) -> Callable:
    # dynamic=None: the marked row dimension is dynamic, every other one static. (dynamic=False
    # keeps every shape static; dynamo's default would turn rows dynamic after a second shape.)
    return torch.compile(fn, backend=_counting_backend, dynamic=None if dynamic else False)


def pad_rows(x: Tensor, rows: int, value: float = 0.0) -> Tensor:
    """`x [n, ...]` with `rows - n` rows of `value` appended: `[rows, ...]` (x itself when equal)."""
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, extra), value=value)  # [rows, ...]


def _bucketed(x: Tensor) -> Tensor:
    """`x` padded to its row bucket, the row dimension marked dynamic in the dynamic mode."""
    x = pad_rows(x, SETTINGS.buckets.size(x.shape[0]))
    if SETTINGS.dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    return x


def compiled_blocks(blocks: Any, h: Tensor, seq: Grouping, backend: Any, causal: bool) -> Tensor:
    """`Trunk.run_blocks` compiled: `h [N, d]` through `blocks`, rows padded to their bucket for the
    per-token halves, attention eager on the N real rows. Blocks watched by forward hooks (probes)
    run eagerly."""
    if any(b.attn._forward_hooks or b.attn._forward_pre_hooks for b in blocks):
        for block in blocks:
            h = block(h, seq, backend, causal)  # [N, d]
        return h
    n = h.shape[0]
    x = _bucketed(h)  # [R, d] R = bucket(N)
    before, after = _compiled(Block.before_attention), _compiled(Block.after_attention)
    for block in blocks:
        q, k, v = before(block, x)  # 3 × [R, H, Dh]
        o = attend(q[:n], k[:n], v[:n], seq, backend, causal)  # [N, H, Dh] real rows only
        o = _bucketed(o)  # [R, H, Dh] padding rows zero
        x = after(block, x, o)  # [R, d]
    return x[:n]  # [N, d]


def compiled_head_loss(rows: Tensor, head: Tensor, target: Tensor) -> Tensor:
    """`objectives.tied_head_loss` compiled: rows padded to their bucket (targets -100: loss 0)."""
    n = rows.shape[0]
    if n == 0:
        return tied_head_loss(rows, head, target)  # [0]
    padded_target = pad_rows(target, SETTINGS.buckets.size(n), value=-100)  # [R]
    if SETTINGS.dynamic:
        torch._dynamo.mark_dynamic(padded_target, 0)
    return _compiled(tied_head_loss)(_bucketed(rows), head, padded_target)[:n]  # [n]


def compiles_blocks(device: torch.device | str) -> bool:
    """Whether `compile_model` compiles the trunk blocks of a model on `device` (`SETTINGS.blocks`)."""
    if SETTINGS.blocks is not None:
        return SETTINGS.blocks
    return torch.device(device).type == "cuda"


def compile_model(model: Any) -> Any:
    """Compiles `model`'s tied-head losses, and its trunk blocks where that pays (`compiles_blocks`
    for the device of its parameters), in place (see the module docstring); returns the model.
    Graphs are built on first use, not here."""
    # No donated buffers (process-wide: dynamo reads this config outside any patch of ours):
    # training's gradient-share probes run backward with retain_graph, which a compiled backward
    # that frees ("donates") its saved tensors refuses.
    functorch_config.donated_buffer = False
    if compiles_blocks(next(model.parameters()).device):
        model.trunk.run_blocks = compiled_blocks
    for objective in model.objectives.values():
        objective.head_loss = compiled_head_loss
    model.compiled = True
    return model


def compile_note(device: torch.device | str) -> str:
    """One line saying what `compile_model` compiles on `device` and how shapes are bounded."""
    b = SETTINGS.buckets
    rows = "marked dynamic" if SETTINGS.dynamic else "one static graph per bucket"
    what = "the trunk blocks' per-token halves and the tied heads' loss" if compiles_blocks(device) else \
        "the tied heads' loss (trunk blocks eager: no gain on CPU, SETTINGS.blocks)"
    return (f"torch.compile on {what}; rows padded to buckets (leading {b.bits} bits, multiples of "
            f"{b.granularity}), {rows}; attention eager; graphs compile in the first step")


def is_compiled(model: Any) -> bool:
    """Whether `compile_model` was applied to `model`."""
    return bool(getattr(model, "compiled", False))
