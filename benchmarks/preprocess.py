"""Preprocessing throughput: `--num-proc 1` versus `--num-proc 2` on the same job, one run.

Usage: python benchmarks/preprocess.py [--source cartpole --opt episodes=600 ...] [--repeat 2]

Prints records/s for each setting and the ratio (2 workers / 1 worker), and checks the two outputs
are byte-identical. Worker start-up (spawn + importing torch) is included, as a user would see it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from mmtool.data.preprocess import PreprocessConfig, preprocess

DEFAULT_JOBS = [
    ("cartpole", ["episodes=2000"]),
    ("pydocs", []),
    ("digits", []),
]


def measure(source: str, options: list[str], num_proc: int, repeat: int, root: Path):
    best, manifest = float("inf"), None
    for r in range(repeat):
        out = root / f"{source}-{num_proc}-{r}"
        start = time.perf_counter()
        manifest = preprocess(PreprocessConfig(source=source, out=out, options=options,
                                               num_proc=num_proc, shard_size="4MB"))
        best = min(best, time.perf_counter() - start)
        if r < repeat - 1:
            shutil.rmtree(out)
    return manifest["records"] / best, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="one source instead of the default jobs")
    parser.add_argument("--opt", action="append", default=[], help="source option key=value")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per setting")
    args = parser.parse_args()
    jobs = [(args.source, args.opt)] if args.source else DEFAULT_JOBS
    print(f"{'source':<10} {'records':>8} {'num-proc 1':>14} {'num-proc 2':>14} {'ratio':>7}  identical")
    with tempfile.TemporaryDirectory() as tmp:
        for source, options in jobs:
            # warm-up: caches (pydocs index, sklearn data, vocabularies) as a second run sees them
            preprocess(PreprocessConfig(source=source, out=Path(tmp) / "warm", options=options,
                                        max_samples=32, overwrite=True))
            one, m1 = measure(source, options, 1, args.repeat, Path(tmp))
            two, m2 = measure(source, options, 2, args.repeat, Path(tmp))
            same = [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
            print(f"{source:<10} {m1['records']:>8,} {one:>10,.0f} r/s {two:>10,.0f} r/s "
                  f"{two / one:>6.2f}x  {same}")


if __name__ == "__main__":
    main()
