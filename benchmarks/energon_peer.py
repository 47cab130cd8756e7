"""Megatron-Energon as a peer of `benchmarks/peers.py` (imported only when energon is installed).

Energon reads a *prepared* WebDataset: the tars plus `.nv-meta/` (a tar index, the split, and a
`dataset.yaml` naming the sample type), made by its own `energon prepare`. Heterogeneous samples
are read as `CrudeWebdataset` (raw dicts, decoded by Energon's decoder) and turned into a `Sample`
by a cooker; the task encoder's `batch` is the shared padding collate.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from megatron.energon import (Cooker, DefaultTaskEncoder, Sample, WorkerConfig, basic_sample_keys,
                              get_loader, get_val_dataset, stateless)


@dataclasses.dataclass
class Fields(Sample):
    """One mixture sample: `draw`, `label` and its streams' arrays."""

    fields: dict


@stateless  # Energon refuses a cooker not marked so (it restores samples by index)
def _cook(crude: dict) -> Fields:
    fields = {k.split(".")[0]: v for k, v in crude.items() if not k.startswith("__")}
    return Fields(**basic_sample_keys(crude), fields=fields)


class Encoder(DefaultTaskEncoder):
    """Cooks crude samples; batches them with the collate given to `loader`."""

    cookers = [Cooker(_cook)]

    def __init__(self, collate: Callable):
        super().__init__()
        self.collate = collate

    def batch(self, samples: list[Fields]) -> dict:
        return self.collate([s.fields for s in samples])


def prepare(root: Path) -> None:
    """`energon prepare` of the tars in `root`: every tar in the train split, crude samples."""
    energon = Path(sys.executable).with_name("energon")
    cmd = [str(energon), "prepare", str(root), "--non-interactive", "--split-ratio", "1,0,0",
           "--sample-type", "CrudeWebdataset", "--no-progress", "--num-workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"energon prepare failed ({proc.returncode}): {tail[0]}")


def loader(root: Path, batch: int, workers: int, collate: Callable):
    """Energon's loader over the train split, once through (its validation-style dataset)."""
    config = WorkerConfig(rank=0, world_size=1, num_workers=workers)
    ds = get_val_dataset(str(root), split_part="train", worker_config=config, batch_size=batch,
                         task_encoder=Encoder(collate))
    return get_loader(ds)
