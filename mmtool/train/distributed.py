"""Training on many processes: how the model is wrapped, when gradients synchronise, and how a
sharded model is checkpointed.

`torchrun` starts one process per GPU (or CPU rank) on each node; each rank reads its own share of
the mixture (the loader takes batches rank, rank+W, ...), and:

- **DDP** (default) keeps a full replica per rank and all-reduces gradients during backward. With
  `--grad-accum A`, `sync_unless_last` runs the first A−1 micro-batches under `no_sync()`: their
  gradients accumulate locally and the last backward all-reduces the sum once — one all-reduce
  (per gradient bucket) per optimizer step instead of A.
- **FSDP2** (`--shard-model`, `torch.distributed.fsdp.fully_shard`) shards every transformer block
  and the rest of the model (embeddings, heads) across the ranks: parameters, gradients and AdamW
  state each take 1/W of the memory, and a block's full weights exist only while it runs. The same
  A−1 micro-batches skip the reduce-scatter (`set_requires_gradient_sync(False)`).

Checkpoints stay one format whatever the wrapping (`full_state`, `load_full_state`): the full,
unsharded model and optimizer state, gathered onto rank 0 with the public
`torch.distributed.checkpoint.state_dict` helpers and written as safetensors + JSON, so a run
trained sharded resumes sharded or not, on any number of ranks' worth of memory.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mmtool.errors import MMToolError


def shard_support(device: torch.device) -> str | None:
    """Why `--shard-model` cannot run here (None: it can): FSDP2 needs an initialised process group
    of at least 2 ranks and the public `fully_shard` API (torch ≥ 2.6); on CPU it runs over gloo."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return (f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard "
                "(FSDP2 needs torch >= 2.6)")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return ("it shards the model across the ranks of a torchrun job, and this is a single process; "
                "launch with torchrun --nproc-per-node 2 (or more) or drop --shard-model")
    if device.type not in ("cpu", "cuda"):
        return f"FSDP2 runs on cpu (gloo) and cuda (nccl), not on {device.type}"
    return None


def _touch_unused(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of the sharded root: adds 0 · Σ p for its own (unsharded, plain-tensor) parameters.

    FSDP2 reduce-scatters only parameters that got a gradient; a rank whose batch lacks a modality
    leaves that encoder without one while another rank has it, and the ranks' collectives would
    disagree. The zero term gives every parameter a (zero) gradient on every rank; the loss and the
    other gradients are unchanged (adding 0.0 is exact)."""
    from torch.distributed.tensor import DTensor

    own = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if own:
        output.loss = output.loss + sum(p.sum() for p in own) * 0.0
    return output


def wrap(model: nn.Module, world: int, shard: bool, device: torch.device) -> nn.Module:
    """The module a training step calls: `model` itself (one process), DDP, or `model` sharded in
    place with FSDP2 (each `trunk.blocks[i]`, then the root).

    Raises:
        MMToolError: `shard` where FSDP2 cannot run (`shard_support`), naming why.
    """
    if shard:
        reason = shard_support(device)
        if reason:
            raise MMToolError(f"--shard-model: {reason}")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if device.type == "cuda":
            torch.cuda.set_device(device)  # FSDP2 allocates its all-gather buffers on the current device
        mesh = init_device_mesh(device.type, (world,))  # one dimension: every rank holds 1/W of each tensor
        model.register_forward_hook(_touch_unused)  # before fully_shard: runs while params are unsharded
        for block in model.trunk.blocks:  # a block's full weights exist only while it runs
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, objective heads, final norm
        return model
    if world == 1:
        return model
    # Streams absent from a batch leave their encoders unused: DDP must not wait for their grads.
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


@contextlib.contextmanager
def sync_unless_last(trained: nn.Module, micro: int, grad_accum: int) -> Iterator[None]:
    """Context of micro-batch `micro` (0-based) of `grad_accum`: gradients synchronise across ranks
    only in the last one's backward (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`)."""
    last = micro == grad_accum - 1
    if isinstance(trained, nn.parallel.DistributedDataParallel) and not last:
        with trained.no_sync():
            yield
    elif hasattr(trained, "set_requires_gradient_sync"):  # an FSDP2 module
        trained.set_requires_gradient_sync(last)
        yield
    else:
        yield


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model`."""
    return hasattr(model, "set_requires_gradient_sync")


def _fqn_order(model: nn.Module) -> list[str]:
    """Parameter names in `model.parameters()` order: the ids a plain optimizer state uses."""
    return [name for name, _ in model.named_parameters()]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state_dict, optimizer state_dict) in the unsharded form: for a sharded model, gathered
    onto rank 0 (collective: every rank calls it; the others get empty dicts) with its optimizer
    state re-keyed by parameter number, exactly as an unsharded AdamW's."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    opt_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not opt_state:  # ranks other than 0
        return model_state, opt_state
    ids = {name: i for i, name in enumerate(_fqn_order(model))}
    return model_state, {"state": {ids[n]: v for n, v in opt_state["state"].items()},
                         "param_groups": [{**g, "params": [ids[n] for n in g["params"]]}
                                          for g in opt_state["param_groups"]]}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    opt_state: dict[str, Any]) -> None:
    """Loads an unsharded (model, optimizer) state into `model` and `optimizer`, sharding it when
    `model` is sharded (every rank passes the full state it read from the checkpoint)."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = _fqn_order(model)
    by_name = {"state": {names[int(i)]: v for i, v in opt_state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in opt_state["param_groups"]]}
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
