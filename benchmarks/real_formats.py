"""Preprocessing real formats: a WebDataset of synthetic image-text samples, `--num-proc 1` and `2`.

Usage: python benchmarks/real_formats.py [--samples 3000] [--side 64] [--shards 4] [--repeat 1]
       [--tokenizer image=patches:patch_size=8]

Writes `--shards` uncompressed tar shards of `--samples` samples (a `--side`² JPEG photo-like
image, a `.txt` caption and a `.json` with an id), preprocesses them with the `webdataset` source at
each setting, and prints records/s, shard bytes per input (tar) byte, and whether the two outputs
are byte-identical. Worker start-up (spawn + importing torch) is included, as a user would see it.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from mmtool.data import shards as store
from mmtool.data.preprocess import PreprocessConfig, preprocess

WORDS = "a the red green blue small large dog cat bird tree house car road sky river on in near".split()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_webdataset(folder: Path, samples: int, side: int, shards: int, seed: int = 0) -> list[Path]:
    """Tar shards of photo-like JPEGs (smooth gradients plus noise) with captions; returns them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side] / side  # [side, side]
    paths = [folder / f"train-{s:03d}.tar" for s in range(shards)]
    tars = [tarfile.open(p, "w") for p in paths]
    for i in range(samples):
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx, b * yy, c * (1 - xx * yy)], -1) + rng.normal(0, 12, (side, side, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        caption = " ".join(rng.choice(WORDS, rng.integers(5, 16)))
        key, tar = f"{i:07d}", tars[i % shards]
        _add(tar, f"{key}.jpg", buf.getvalue())
        _add(tar, f"{key}.txt", caption.encode())
        _add(tar, f"{key}.json", json.dumps({"uid": f"s{i}", "width": side}).encode())
    for tar in tars:
        tar.close()
    return paths


def measure(options: list[str], tokenizers: list[str], num_proc: int, repeat: int, root: Path):
    best, manifest, out = float("inf"), None, None
    for r in range(repeat):
        out = root / f"wds-{num_proc}-{r}"
        start = time.perf_counter()
        manifest = preprocess(PreprocessConfig(source="webdataset", out=out, options=options,
                                               tokenizers=tokenizers, num_proc=num_proc,
                                               shard_size="16MB"))
        best = min(best, time.perf_counter() - start)
        if r < repeat - 1:
            shutil.rmtree(out)
    shard_bytes = sum(store.shard_path(out, s).stat().st_size for s in manifest["shards"])
    return manifest["records"] / best, shard_bytes, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shards", type=int, default=4, help="tar shards to write")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per setting")
    parser.add_argument("--tokenizer", action="append", default=[], help="MODALITY=NAME[:k=v,...]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tars = make_webdataset(Path(tmp) / "wds", args.samples, args.side, args.shards)
        in_bytes = sum(p.stat().st_size for p in tars)
        options = [f"urls={Path(tmp) / 'wds'}/train-{{000..{args.shards - 1:03d}}}.tar"]
        preprocess(PreprocessConfig(source="webdataset", out=Path(tmp) / "warm", options=options,
                                    tokenizers=args.tokenizer, max_samples=32))  # warm caches
        one, bytes1, m1 = measure(options, args.tokenizer, 1, args.repeat, Path(tmp))
        two, bytes2, m2 = measure(options, args.tokenizer, 2, args.repeat, Path(tmp))
        same = [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
        print(f"webdataset: {args.samples} samples ({args.side}x{args.side} JPEG + caption + json) "
              f"in {args.shards} tars, {in_bytes / 2**20:.1f} MiB; tokenizers "
              f"{args.tokenizer or 'default'}")
        print(f"{'num-proc':>8} {'records':>8} {'records/s':>10} {'shard MiB':>10} {'shard B/input B':>16}")
        for n, rate, nbytes, m in ((1, one, bytes1, m1), (2, two, bytes2, m2)):
            print(f"{n:>8} {m['records']:>8,} {rate:>10,.0f} {nbytes / 2**20:>10.1f} "
                  f"{nbytes / in_bytes:>16.2f}")
        print(f"ratio 2/1: {two / one:.2f}x; outputs identical: {same}")


if __name__ == "__main__":
    main()
