"""What the training probes cost: steps/s without probes and with every probe on, measured in one
run on the same batches, printed as a ratio.

Usage: python benchmarks/probes.py [--size tiny] [--reps 15] [--batch-tokens 4096] [--workdir DIR]

A training step (forward, backward, AdamW) of the `--size` model (early fusion, next-token +
masked-patch) on packed batches of a built-in mixture (digits, cartpole, pydocs). Off and on
(`attention,grad-norm,loss`: hooks attached, probed, removed — what `train` does on a probe step)
alternate step by step on the same batches, so both see the same machine load; each reports the
median step time. Off is exactly what `train` runs when `--probes` is not given (no probe object
is built). With `--probe-every N` a run pays the "on" cost once every N steps: its overhead is
(ratio - 1) / N.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmtool.data.batching import STRATEGIES, BatchSize, assemble
from mmtool.data.index import TokenIndex
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.models.model import ModelConfig, build_model
from mmtool.train.probes import ProbeSet, hook_count

PROBES = ["attention", "grad-norm", "loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmtool-probes-bench-"))
    folders = []
    for name, opts, n in (("digits", [], 300), ("cartpole", ["episodes=20"], None), ("pydocs", [], 200)):
        path = work / "data" / name
        if not (path / "manifest.json").exists():
            preprocess(PreprocessConfig(name, path, options=opts, max_samples=n))
        folders.append(path)
    index = TokenIndex(folders)
    order = np.random.default_rng(0).permutation(len(index))
    plans = STRATEGIES.get("packed").plan(index, order, BatchSize(tokens=args.batch_tokens))[:4]
    batches = [assemble(index, p, "packed") for p in plans]
    torch.manual_seed(0)
    model = build_model(ModelConfig(size=args.size), index.streams)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    names = [f.name for f in index.folders]
    settings = {"off": None, **{p: ProbeSet([p], 1, model, names) for p in PROBES},
                ",".join(PROBES): ProbeSet(PROBES, 1, model, names)}

    def step(batch, probes: ProbeSet | None) -> float:
        t0 = time.perf_counter()
        if probes:
            probes.start()
        out = model(batch, generator=torch.Generator().manual_seed(0))
        if probes:
            probes.after_forward(batch, out)
        out.loss.backward()
        if probes:
            probes.after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if probes:
            probes.finish()
        return time.perf_counter() - t0

    for b in batches:  # warm-up
        for probes in settings.values():
            step(b, probes)
    times: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(args.reps):
        for b in batches:
            names_r = list(settings) if r % 2 == 0 else list(settings)[::-1]
            for name in names_r:
                times[name].append(step(b, settings[name]))
    assert hook_count(model) == 0
    med = {k: statistics.median(v) for k, v in times.items()}
    off = med["off"]
    tokens = int(np.mean([b.real_tokens for b in batches]))
    print(f"model {args.size} ({model.num_parameters():,} parameters), packed batches of ~{tokens:,} real tokens, "
          f"{len(times['off'])} steps per setting, interleaved; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, t in med.items():
        print(f"  probes {name:28s} {1 / t:6.3f} steps/s ({1000 * t:7.1f} ms/step)  ratio to off {off / t:.3f}")
    every = med[",".join(PROBES)] / off - 1
    print(f"all probes: +{100 * every:.1f}% step time on a probe step = +{100 * every / 10:.1f}% of a run "
          f"at --probe-every 10; probes off run no probe code at all")


if __name__ == "__main__":
    main()
