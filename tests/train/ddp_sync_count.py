"""`python -m torch.distributed.run ... tests/train/ddp_sync_count.py OUT.json mmtool-train-args...`

Runs `mmtool train` (the real CLI, in this process) with every DDP gradient all-reduce counted: each
DistributedDataParallel gets a communication hook that records the bucket it reduces and then runs
torch's own all-reduce hook. Writes {"rank": r, "buckets": [index of each all-reduce, in order]}
to OUT.json.RANK on exit. Only torch is wrapped, never mmtool.
"""

import atexit
import json
import os
import sys

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

calls: list[int] = []
_init = torch.nn.parallel.DistributedDataParallel.__init__


def counting_allreduce(state, bucket):
    calls.append(bucket.index())
    return default_hooks.allreduce_hook(state, bucket)


def counted_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.register_comm_hook(None, counting_allreduce)


def write() -> None:
    rank = os.environ.get("RANK", "0")
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": int(rank), "buckets": calls}, f)


if __name__ == "__main__":
    out, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    torch.nn.parallel.DistributedDataParallel.__init__ = counted_init
    atexit.register(write)
    from mmtool.cli import main

    main()
