"""Shard bytes per input byte for a folder of real-sized JPEG photos, with and without the image
token cap (`patches:max_tokens`, default 256), through the real `mmtool preprocess` CLI.

Usage: python benchmarks/photo_shards.py [--photos 50] [--out /tmp/mmtool-photo-bench]

The photos are crops, flips and rescales of scikit-learn's two bundled photographs (china.jpg,
flower.jpg, 640×427) saved as JPEG (quality 90) at camera-ish sizes 640×480 to 1024×768, with a
caption each, listed in a JSONL. Each setting is one `mmtool preprocess jsonl` run (`--num-proc 1`);
it prints input bytes, shard bytes, their ratio, image tokens per photo and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(640, 480), (800, 600), (1024, 768), (768, 1024), (960, 540)]
SETTINGS = {  # name → --tokenizer flag (none: the default)
    "before (max_tokens=none, native size)": "image=patches:max_tokens=none",
    "after (default, max_tokens=256)": None,
    "short_side=224, patch_size=16, max_tokens=none": "image=patches:patch_size=16,short_side=224,max_tokens=none",
}


def make_photos(root: Path, n: int) -> int:
    """Writes `n` JPEGs and `photos.jsonl` under `root`; returns the JPEGs' total bytes."""
    from sklearn.datasets import load_sample_image

    base = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    total, lines = 0, []
    for i in range(n):
        im = base[i % 2]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((left, top, left + cw, top + ch)).resize(SIZES[i % len(SIZES)], Image.BICUBIC)
        if i % 3 == 0:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        path = root / "img" / f"photo{i:03d}.jpg"
        im.save(path, "JPEG", quality=90)
        total += path.stat().st_size
        lines.append(json.dumps({"id": f"photo{i:03d}", "image": f"img/{path.name}",
                                 "text": f"photo number {i}"}))
    (root / "photos.jsonl").write_text("\n".join(lines) + "\n")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mmtool-photo-bench"))
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    raw = args.out / "raw"
    in_bytes = make_photos(raw, args.photos)
    print(f"{args.photos} JPEGs, {in_bytes / 1e6:.2f} MB")
    print(f"{'setting':50s} {'shard MB':>9s} {'bytes/in':>9s} {'tokens/photo':>13s} {'s':>6s}")
    for i, (name, flag) in enumerate(SETTINGS.items()):
        out = args.out / f"data{i}"
        cmd = [sys.executable, "-m", "mmtool", "preprocess", "jsonl", "--opt", f"path={raw / 'photos.jsonl'}",
               "--out", str(out), "--num-proc", "1", "--tokenizer", "text=bytes"]
        if flag:
            cmd += ["--tokenizer", flag]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        secs = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
        shard_bytes = sum((out / s["path"]).stat().st_size for s in manifest["shards"])
        tokens = manifest["modalities"]["image"]["tokens"]
        per = f"{tokens / args.photos:.0f}"
        print(f"{name:50s} {shard_bytes / 1e6:9.2f} {shard_bytes / in_bytes:9.2f} {per:>13s} {secs:6.1f}")


if __name__ == "__main__":
    main()
