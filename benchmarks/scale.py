"""A billion samples on paper: does planning, resuming and the loader state stay O(shards)?

Writes synthetic manifests (metadata only: `rows`, `bytes`, `sha256` per shard, no shard file) for
`--folders` folders of `--shards` shards in all, `--rows-per-shard` rows each on average (10^5
shards × 10^4 rows = 10^9 samples), and measures, in one process:

* **plan**: reading the manifests (`shards.load_manifest`, which checks every entry) and building the
  shard plan of a weighted mixture (`mmtool.data.shardplan`) plus its first block: seconds, peak
  traced memory (tracemalloc: numpy and Python allocations), and the bytes the plan keeps;
* **resume**: from a mid-epoch position (epoch, block, batch) to the sample numbers of the next
  batch (`--batch-samples` per batch, the `padded` planner): manifests → plan → one block → batch;
* **per-sample plan** at sizes it can handle (`--per-sample`): the same mixture's `Mixture.epoch`
  plus the batch cut (what a resume of the per-sample plan rebuilds), against the shard plan at the
  same number of rows: seconds and peak memory, and their ratio;
* **state**: a real `Loader` over pydocs cut into 16-row shards, both plans: `state_dict()` JSON bytes
  after 10 batches, a resume from it checked byte-identical, and the state with the 10^9 run's
  position numbers written into it (its size grows with their digits, not with the rows).

    python benchmarks/scale.py [--shards 1000,10000,100000] [--rows-per-shard 10000]
                               [--per-sample 1000000,10000000]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from mmtool.data import shards as store
from mmtool.data.batching import STRATEGIES, BatchSize
from mmtool.data.mixture import Mixture
from mmtool.data.shardplan import ShardPlan, shard_rows

WEIGHTS = [1.0, 1.0, 2.0, 4.0]  # per folder (cycled): a weighted mixture, laps cross epochs


def write_manifests(root: Path, shards: int, rows_per_shard: int, folders: int, seed: int) -> list[Path]:
    """`folders` folders of `shards` shard entries in all; rows vary ±50% and sum to shards × rows."""
    rng = np.random.default_rng(seed)
    target = shards * rows_per_shard
    rows = rng.integers(rows_per_shard // 2, rows_per_shard * 3 // 2 + 1, shards)
    rows = rows * target // rows.sum()
    rows[:target - rows.sum()] += 1  # the rounding remainder, < shards
    out = []
    for f, part in enumerate(np.array_split(rows, folders)):
        folder = root / f"s{shards}-f{f}"
        folder.mkdir(parents=True)
        entries = [{"path": f"shard-{i:06d}.arrow", "rows": int(n), "bytes": int(n) * 600,
                    "sha256": hashlib.sha256(f"{f}/{i}".encode()).hexdigest()} for i, n in enumerate(part)]
        doc = {"schema_version": 1, "rows": int(part.sum()), "shards": entries}
        (folder / store.MANIFEST).write_text(json.dumps(doc))
        out.append(folder)
    return out


def measure(fn):
    """(seconds, peak traced bytes, result) of fn(): timed once bare, then once under tracemalloc."""
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    del result
    gc.collect()
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, result


def build_plan(folders: list[Path], window: int, seed: int) -> ShardPlan:
    sizes, folder = shard_rows([store.load_manifest(f) for f in folders])
    per_folder = np.bincount(folder, sizes).astype(np.int64).tolist()
    weights = list(itertools.islice(itertools.cycle(WEIGHTS), len(folders)))
    return ShardPlan(sizes, folder, Mixture(per_folder, weights, seed=seed, mix_by="samples"), window)


def plan_and_first_block(folders, window, seed):
    plan = build_plan(folders, window, seed)
    return plan, plan.block(0, 0)


def resume(folders, window, seed, batch_samples, position):
    """Sample numbers of the batch at `position` = (epoch, block, batch within the block)."""
    epoch, block, batch = position
    plan = build_plan(folders, window, seed)
    batches = STRATEGIES.get("padded").plan(None, plan.block(epoch, block), BatchSize(samples=batch_samples))
    return batches[batch]


def per_sample_epoch(rows: int, folders: int, batch_samples: int, seed: int):
    """The per-sample plan of the same mixture at `rows` rows: the epoch's order and batch cut."""
    sizes = [len(p) for p in np.array_split(np.arange(rows), folders)]
    weights = list(itertools.islice(itertools.cycle(WEIGHTS), folders))
    order = Mixture(sizes, weights, seed=seed, mix_by="samples").epoch(0)
    return STRATEGIES.get("padded").plan(None, order, BatchSize(samples=batch_samples))


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def real_state(root: Path, seed: int) -> dict:
    """A real Loader over pydocs in 16-row shards: state bytes and an exact resume, both plans."""
    from mmtool.data.loader import Loader, LoaderConfig
    from mmtool.data.preprocess import PreprocessConfig, preprocess

    folder = root / "pydocs"
    preprocess(PreprocessConfig(out=folder, source="pydocs", max_samples=300, shard_size="16KB"))
    out = {}
    for plan in ("samples", "shards"):
        def make():
            return Loader(LoaderConfig([str(folder)], batch_samples=4, seed=seed, plan=plan,
                                       shard_window=2, splits=["train", "validation", "test"]))
        first, reference = make(), make()
        want = [b.buffer.numpy().tobytes() for b in itertools.islice(reference.forever(), 20)]
        list(itertools.islice(first.forever(), 10))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        t0 = time.perf_counter()
        resumed.load_state_dict(state)
        got = [b.buffer.numpy().tobytes() for b in itertools.islice(resumed.forever(), 10)]
        seconds = time.perf_counter() - t0
        assert got == want[10:], f"{plan}: resumed batches differ"
        out[plan] = {"state": state, "bytes": len(json.dumps(state).encode()), "resume_s": seconds,
                     "rows": len(first.members), "shards": len(first.index.shards)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="1000,10000,100000")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--folders", type=int, default=4)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--batch-samples", type=int, default=32)
    parser.add_argument("--per-sample", default="1000000,10000000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report: dict = {"args": vars(args), "plan": [], "per_sample": []}
    with tempfile.TemporaryDirectory(prefix="mmtool-scale-") as tmp:
        root = Path(tmp)
        print(f"{'shards':>8} {'samples':>15} {'plan s':>8} {'peak':>10} {'kept':>10} "
              f"{'peak/shard':>11} {'resume s':>9} {'blocks':>8}")
        biggest = None
        for shards in [int(s) for s in args.shards.split(",")]:
            folders = write_manifests(root, shards, args.rows_per_shard, args.folders, args.seed)
            seconds, peak, (plan, _) = measure(lambda: plan_and_first_block(folders, args.window, args.seed))
            position = (1, plan.blocks // 2, 5)  # mid-way through the second epoch
            r_seconds, r_peak, batch = measure(lambda: resume(folders, args.window, args.seed,
                                                                args.batch_samples, position))
            row = {"shards": shards, "samples": len(plan), "plan_s": seconds, "plan_peak": peak,
                   "plan_kept": plan.nbytes(), "resume_s": r_seconds, "resume_peak": r_peak,
                   "blocks": plan.blocks, "position": position, "first_of_batch": int(batch[0])}
            report["plan"].append(row)
            biggest = (plan, position, folders)
            print(f"{shards:>8,} {len(plan):>15,} {seconds:>8.2f} {mb(peak):>10} {plan.nbytes() / 1e3:>7,.0f} KB "
                  f"{peak / shards:>9,.0f} B {r_seconds:>9.2f} {plan.blocks:>8,}")
        print(f"\nper-sample plan vs shard plan, same mixture and rows ({args.batch_samples}-sample batches)")
        print(f"{'samples':>12} {'per-sample s':>13} {'peak':>10} {'shard s':>9} {'peak':>10} "
              f"{'time ×':>8} {'memory ×':>9}")
        for rows in [int(r) for r in args.per_sample.split(",")]:
            s_sec, s_peak, _ = measure(lambda: per_sample_epoch(rows, args.folders, args.batch_samples, args.seed))
            shards = max(rows // args.rows_per_shard, args.folders)
            folders = write_manifests(root / f"ps{rows}", shards, rows // shards, args.folders, args.seed)
            h_sec, h_peak, _ = measure(lambda: resume(folders, args.window, args.seed, args.batch_samples,
                                                      (0, 0, 0)))
            report["per_sample"].append({"samples": rows, "per_sample_s": s_sec, "per_sample_peak": s_peak,
                                         "shard_s": h_sec, "shard_peak": h_peak})
            print(f"{rows:>12,} {s_sec:>13.2f} {mb(s_peak):>10} {h_sec:>9.3f} {mb(h_peak):>10} "
                  f"{s_sec / h_sec:>7.0f}× {s_peak / h_peak:>8.0f}×")
        real = real_state(root, args.seed)
        report["state"] = {k: {kk: vv for kk, vv in v.items() if kk != "state"} for k, v in real.items()}
        print("\nloader state_dict (real Loader, pydocs in 16-row shards, 10 batches in; resume checked "
              "byte-identical)")
        for plan_name, r in real.items():
            print(f"  --plan {plan_name:<8} {r['rows']:>4} rows {r['shards']:>3} shards: "
                  f"{r['bytes']:>4} bytes, resume {r['resume_s']:.3f} s")
        plan, (epoch, block, batch), _ = biggest
        state = dict(real["shards"]["state"], epoch=epoch, block=block, block_batch=batch,
                     batch=block * plan.block_draws // args.batch_samples + batch,
                     drawn_samples=[10**9] * args.folders, drawn_tokens=[10**12] * args.folders)
        report["state"]["at_scale_bytes"] = len(json.dumps(state).encode())
        print(f"  same keys, {len(plan):,}-sample position ({args.folders} folders, counters at 10^9 "
              f"samples and 10^12 tokens each): {report['state']['at_scale_bytes']} bytes")
    print(json.dumps(report, default=int))


if __name__ == "__main__":
    main()
