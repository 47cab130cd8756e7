"""Training throughput by batching method: forward+backward real tokens/s, measured in one run.

Usage: python benchmarks/train_throughput.py [--size small] [--steps 6] [--batch-samples 24]

Three ways to feed the same model (`--size`, early fusion, next-token + masked-patch):

1. mixed `packed`  — the built-in mixture (digits, spoken-digits, cartpole, pydocs, equal draws),
   `--batch-samples` samples back to back;
2. mixed `padded`  — the very same samples, padded to the longest, computed on every slot with
   masks (classic padded training), and with the padding gathered out by the model first
   (`UnifiedModel.keep_padding = False`, mmtool's default for padded batches);
3. unimodal text   — pydocs text cut into fixed-length rows of `--text-len` tokens, as many rows
   as give the mixed batches' mean real tokens (a plain language-model batch; next-token only).

4. unimodal text at the mixed batches' own sample lengths — attention costs O(L²) per sample, and
   the mixture holds 1,400-token episodes, so this is the comparison that isolates what mixing
   modalities costs from what long samples cost.

Also measures the trunk alone (no output heads) for mixed packed vs both unimodal batches, since a
text-only batch sends every token through the 30k-word output head. Prints real tokens/s for each and the ratios packed/padded (target ≥ 1.8) and packed/unimodal
(target ≥ 0.9: mixed-modality training as fast per real token as unimodal training).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmtool.data import shards as store
from mmtool.data.batching import assemble
from mmtool.data.index import TokenIndex
from mmtool.data.loader import Loader, LoaderConfig
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import SCHEMA_VERSION, Sample, Segment, samples_to_batch
from mmtool.models.model import ModelConfig, build_model

MIXTURE = [("digits", [], None), ("spoken-digits", [], None), ("cartpole", ["episodes=200"], None),
           ("pydocs", [], 2000)]


def build(root: Path) -> list[Path]:
    folders = []
    for name, opts, cap in MIXTURE:
        out = root / name
        preprocess(PreprocessConfig(name, out, options=opts, max_samples=cap, num_proc=2))
        folders.append(out)
    return folders


def mixture_batches(root: Path, batch_tokens: int, count: int) -> tuple[list, object]:
    """(the first `count` packed batches of the built-in mixture at equal weights, its loader's
    index): the fixed inputs of `compile.py` and `precision.py`. The folders are built in `root`
    unless they are there already."""
    from mmtool.data.batching import assemble
    from mmtool.data.loader import Loader, LoaderConfig

    folders = [root / name for name, _, _ in MIXTURE]
    if not all((f / "manifest.json").exists() for f in folders):
        folders = build(root)
    loader = Loader(LoaderConfig([f"{f}=1" for f in folders], strategy="packed",
                                 batch_tokens=batch_tokens, samples_per_epoch=8000))
    batches = [assemble(loader.index, p, "packed") for p in loader.plan(0)[:count]]
    if len(batches) < count:
        raise SystemExit(f"the mixture gives {len(batches)} batches; lower --steps")
    return batches, loader.index


def text_rows(pydocs: Path, out: Path, lengths: list[int]) -> Path:
    """A text-only folder whose sample i is `lengths[i]` consecutive wordpiece ids of pydocs."""
    index = TokenIndex([pydocs], verify=False)
    ids = np.concatenate([s.ids for s in index.shards])  # every text token of the corpus
    if sum(lengths) > len(ids):
        raise SystemExit(f"pydocs has {len(ids):,} tokens; {sum(lengths):,} are needed")
    cuts = np.cumsum([0, *lengths])
    samples = [Sample(f"row-{i}", "pydocs-rows", "text", "train",
                      [Segment("text", "document", "wordpiece", (n,), ids=ids[cuts[i]:cuts[i + 1]])])
               for i, n in enumerate(lengths)]
    out.mkdir(parents=True, exist_ok=True)
    info = store.write_shard(out / "shard-00000.arrow", [samples_to_batch(samples)])
    manifest = store.load_manifest(pydocs)
    store.atomic_write_json(out / "manifest.json", {
        "schema_version": SCHEMA_VERSION, "rows": len(samples), "rejected": 0,
        "records": len(samples), "tokenizers": manifest["tokenizers"], "shards": [info],
        "sources": {"pydocs-rows": {"rows": len(samples), "tokens": int(sum(lengths))}}})
    return out


def text_batches(folder: Path, sizes: list[int]) -> tuple[list, list]:
    """Consecutive samples of `folder` in batches of `sizes`, and the folder's streams."""
    index = TokenIndex([folder], verify=False)
    starts = np.cumsum([0, *sizes])
    return [assemble(index, np.arange(a, z), "packed") for a, z in zip(starts[:-1], starts[1:])], index.streams


def measure(model, batches, steps: int, trunk_only: bool = False) -> tuple[float, float]:
    """(real tokens/s, mean real tokens per batch) of forward+backward after one warm-up step.

    `trunk_only` backpropagates from the hidden states alone: encoders + transformer, without the
    objectives' output heads (whose cost depends on the modality mix, e.g. the 30k-word text head).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens, seconds = 0, 0.0
    for i, batch in enumerate(batches[: steps + 1]):
        start = time.perf_counter()
        if trunk_only:
            hidden, _ = model.hidden_states(batch)
            hidden.square().mean().backward()
        else:
            model(batch, generator=gen).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # step 0 warms up kernels and allocations
            seconds += time.perf_counter() - start
            tokens += batch.real_tokens
    return tokens / seconds, tokens / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-samples", type=int, default=24)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, help="keep the preprocessed data here between runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        folders = build(root)
        loader = Loader(LoaderConfig([f"{f}=1" for f in folders], strategy="packed",
                                     batch_samples=args.batch_samples, samples_per_epoch=4000))
        plans = loader.plan(0)[: args.steps + 1]
        model_cfg = ModelConfig(size=args.size, objectives={"next-token": 1.0, "masked-patch": 1.0})
        model = build_model(model_cfg, loader.index.streams)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.size}: "
              f"{model.num_parameters():,} parameters; attention {model.backend(torch.device('cpu')).registry_name}")
        packed = [assemble(loader.index, p, "packed") for p in plans]
        padded = [assemble(loader.index, p, "padded") for p in plans]
        pad = 1 - sum(b.real_tokens for b in padded) / sum(b.num_slots for b in padded)
        tps_packed, mean_tokens = measure(model, packed, args.steps)
        tps_padded, _ = measure(model, padded, args.steps)  # padding gathered away first
        model.keep_padding = True  # classic padded training: compute on all B x L slots, masked
        tps_padded_full, _ = measure(model, padded, args.steps)
        model.keep_padding = False

        rows = max(int(round(mean_tokens / args.text_len)), 1)
        fixed, streams = text_batches(text_rows(folders[-1], root / "pydocs-fixed", [args.text_len] * rows * (args.steps + 1)),
                                      [rows] * (args.steps + 1))
        # The same text, cut to exactly the mixed batches' sample lengths: attention costs O(L²)
        # per sample, so this isolates what mixing modalities costs from what long samples cost.
        lengths = [int(n) for b in packed for n in b.numpy("seqlens")]
        matched, _ = text_batches(text_rows(folders[-1], root / "pydocs-matched", lengths),
                                  [b.batch_size for b in packed])
        text_model = build_model(ModelConfig(size=args.size, objectives={"next-token": 1.0}), streams)
        tps_text, _ = measure(text_model, fixed, args.steps)
        tps_matched, _ = measure(text_model, matched, args.steps)
        trunk_mixed, _ = measure(model, packed, args.steps, trunk_only=True)
        trunk_text, _ = measure(text_model, fixed, args.steps, trunk_only=True)
        trunk_matched, _ = measure(text_model, matched, args.steps, trunk_only=True)

    print(f"mixed batches: {args.batch_samples} samples, {mean_tokens:,.0f} real tokens on average; "
          f"padded layout wastes {pad:.0%} of its slots")
    print(f"{'method':<34} {'real tokens/s':>14}")
    print(f"{'mixed, packed':<34} {tps_packed:>14,.0f}")
    print(f"{'mixed, padded, computed on padding':<34} {tps_padded_full:>14,.0f}")
    print(f"{'mixed, padded, padding gathered out':<34} {tps_padded:>14,.0f}")
    print(f"{f'unimodal text, {rows} x {args.text_len} fixed':<34} {tps_text:>14,.0f}")
    print(f"{'unimodal text, mixed batch lengths':<34} {tps_matched:>14,.0f}")
    print(f"packed / padded   = {tps_packed / tps_padded_full:.2f}x  (target >= 1.8; "
          f"{tps_packed / tps_padded:.2f}x against a padded batch whose padding the model gathers out)")
    print(f"packed / unimodal = {tps_packed / tps_text:.2f}x  (target >= 0.9); "
          f"{tps_packed / tps_matched:.2f}x against text of the same sample lengths")
    print("trunk only (encoders + transformer, no output heads), real tokens/s:")
    print(f"  mixed packed {trunk_mixed:,.0f}; unimodal {args.text_len}-token rows {trunk_text:,.0f} "
          f"= {trunk_mixed / trunk_text:.2f}x; unimodal at the mixed batches' lengths {trunk_matched:,.0f} "
          f"= {trunk_mixed / trunk_matched:.2f}x")

if __name__ == "__main__":
    main()
