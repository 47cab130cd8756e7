"""Does each batch hold the mixture that was asked for? Token shares, one-folder batches, padding.

For one epoch's plan of the `packed` strategy over preprocessed folders (default: the quickstart
mixture digits, spoken-digits, cartpole, pydocs with equal weights, all splits), over `--seeds`
mixture seeds, prints per setting the mean and 95% interval (t over seeds) of:

* each folder's share of the epoch's tokens;
* the share of batches that hold samples of one folder only; cartpole-only batches among the first 40;
* the mean total-variation distance between a batch's token shares and the epoch's;
* padding: the share of the token budget left empty, over all batches of the epoch.

    python benchmarks/mixture.py --root mmtool-quickstart/data [--budget 4096] [--mix-by tokens]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import stats

from mmtool.data.loader import Loader, LoaderConfig


def epoch_stats(data: list[str], budget: int, mix_by: str, seed: int) -> dict:
    loader = Loader(LoaderConfig(data, batch_tokens=budget, mix_by=mix_by, seed=seed, verify=False,
                                 splits=["train", "validation", "test"]))
    index, plan = loader.index, loader.plan(0)
    n = len(index.folders)
    rows = np.array([np.bincount(index.sample_folder[b], index.lengths[b], n) for b in plan])  # [B, F]
    share = rows.sum(0) / rows.sum()
    per_batch = rows / rows.sum(1, keepdims=True)
    single = (rows > 0).sum(1) == 1
    long = int(np.argmax([index.lengths[index.sample_folder == f].mean() for f in range(n)]))
    return {**{f"share {f.name}": float(s) for f, s in zip(index.folders, share)},
            "one-folder batches": float(single.mean()),
            f"{index.folders[long].name}-only of first 40": float((single[:40] & (rows[:40, long] > 0)).sum()),
            "batch TV to epoch mix": float(0.5 * np.abs(per_batch - share).sum(1).mean()),
            "padding": float(1 - rows.sum() / (len(plan) * budget)), "batches": float(len(plan))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="mmtool-quickstart/data")
    parser.add_argument("--folders", default="digits,spoken-digits,cartpole,pydocs")
    parser.add_argument("--weights", default="equal", choices=["equal", "none"])
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--mix-by", default="tokens", choices=["tokens", "samples"])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    data = [f"{args.root}/{f}" + ("=1" if args.weights == "equal" else "") for f in args.folders.split(",")]
    runs = [epoch_stats(data, args.budget, args.mix_by, s) for s in range(args.seeds)]
    out = {}
    for key in runs[0]:
        x = np.array([r[key] for r in runs])
        half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
        out[key] = (float(x.mean()), half)
        print(f"{key:<32} {x.mean():9.4f} ± {half:.4f}")
    print(json.dumps({"args": vars(args), "stats": out}))


if __name__ == "__main__":
    main()
