"""Preprocessing real formats at `--num-proc 1` and `2`: a WebDataset of image-text samples and a
long-document corpus.

Usage: python benchmarks/real_formats.py [--samples 3000] [--side 64] [--shards 4] [--repeat 1]
       [--tokenizer image=patches:patch_size=8] [--documents 400]

1. Writes `--shards` uncompressed tar shards of `--samples` samples (a `--side`² JPEG photo-like
   image, a `.txt` caption and a `.json` with an id) and preprocesses them with the `webdataset`
   source.
2. Writes the docstrings of this Python's standard library, one `.txt` file per module (real
   English prose, the longest modules tens of thousands of characters), `--documents` files, and
   preprocesses them with the `documents` source, long files chunked at 512 tokens.

For each it prints records/s, rows written (chunks count as rows), shard bytes per input byte, and
whether the outputs of both settings are byte-identical. Worker start-up (spawn + importing torch)
is included, as a user would see it.
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


def make_documents(folder: Path, count: int) -> list[Path]:
    """The stdlib's docstrings, one text file per module (the `count` longest modules)."""
    from mmtool.data.sources.pydocs import load_index

    by_module: dict[str, list[str]] = {}
    for entry in load_index():
        by_module.setdefault(entry.module, []).append(entry.text)
    longest = sorted(by_module, key=lambda m: -sum(map(len, by_module[m])))[:count]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for module in sorted(longest):
        path = folder / f"{module}.txt"
        path.write_text("\n\n".join(by_module[module]) + "\n")
        paths.append(path)
    return paths


def measure(source: str, options: list[str], tokenizers: list[str], num_proc: int, repeat: int,
            root: Path):
    best, manifest, out = float("inf"), None, None
    for r in range(repeat):
        out = root / f"{source}-{num_proc}-{r}"
        start = time.perf_counter()
        manifest = preprocess(PreprocessConfig(source=source, out=out, options=options,
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
    parser.add_argument("--documents", type=int, default=400, help="stdlib modules, one file each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tars = make_webdataset(Path(tmp) / "wds", args.samples, args.side, args.shards)
        options = [f"urls={Path(tmp) / 'wds'}/train-{{000..{args.shards - 1:03d}}}.tar"]
        preprocess(PreprocessConfig(source="webdataset", out=Path(tmp) / "warm", options=options,
                                    tokenizers=args.tokenizer, max_samples=32))  # warm caches
        report(f"webdataset: {args.samples} samples ({args.side}x{args.side} JPEG + caption + json) "
               f"in {args.shards} tars; tokenizers {args.tokenizer or 'default'}",
               "webdataset", options, args.tokenizer, tars, args.repeat, Path(tmp))
        docs = make_documents(Path(tmp) / "docs", args.documents)
        chars = sum(len(p.read_text()) for p in docs)
        report(f"documents: {len(docs)} stdlib modules' docstrings as .txt files, "
               f"{chars / len(docs):,.0f} characters each on average (longest "
               f"{max(len(p.read_text()) for p in docs):,}); wordpiece, chunks of 512 tokens",
               "documents", [f"path={Path(tmp) / 'docs'}", "max_tokens=512", "overlap=0"], [],
               docs, args.repeat, Path(tmp))


def report(title: str, source: str, options: list[str], tokenizers: list[str], inputs: list[Path],
           repeat: int, root: Path) -> None:
    """Preprocesses at --num-proc 1 and 2 and prints one table."""
    in_bytes = sum(p.stat().st_size for p in inputs)
    one, bytes1, m1 = measure(source, options, tokenizers, 1, repeat, root)
    two, bytes2, m2 = measure(source, options, tokenizers, 2, repeat, root)
    same = [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    print(f"{title}; {in_bytes / 2**20:.1f} MiB in")
    print(f"{'num-proc':>8} {'records':>8} {'rows':>8} {'records/s':>10} {'shard MiB':>10} "
          f"{'shard B/input B':>16}")
    for n, rate, nbytes, m in ((1, one, bytes1, m1), (2, two, bytes2, m2)):
        print(f"{n:>8} {m['records']:>8,} {m['rows']:>8,} {rate:>10,.0f} {nbytes / 2**20:>10.1f} "
              f"{nbytes / in_bytes:>16.2f}")
    print(f"ratio 2/1: {two / one:.2f}x; outputs identical: {same}\n")


if __name__ == "__main__":
    main()
