"""Frozen minilm-l6 text embeddings vs text embeddings learned from scratch, side by side in one run.

The experiment (CLIP-style, on scikit-learn's digits: an 8×8 image and the caption "a handwritten
seven" per sample):

* **learned**: the captions as wordpiece ids; the model learns its 30,522-row text embedding table.
* **frozen**: the captions replaced by their all-MiniLM-L6-v2 sentence vectors (`mmtool embed`, one
  384-d token per caption); the model learns only the Linear that projects them to its width.

Everything else is equal: the same model preset, `late` fusion (each modality its own tower until
the end, so image features cannot read the caption), the same objectives (`masked-patch` on the
image + `contrastive` image↔caption), seed, batch size and number of steps. Reported per arm: wall
time of the training loop, real tokens/s and samples/s, parameters trained (and the frozen encoder's
parameters that were *not* trained), the final loss, and a downstream probe: logistic regression on
the image tower's pooled features (mean final hidden state over the image tokens, the caption left
out) predicting the digit, trained on the `train` split, scored on `validation`+`test`. An untrained
model's image features give the floor. The one-off cost of embedding is reported separately.

    python benchmarks/frozen_vs_learned.py [--steps 300] [--size tiny] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmtool.data import batching
from mmtool.data import shards as store
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.embed import EmbedConfig, embed
from mmtool.models.model import ModelConfig, build_model
from mmtool.train import TrainConfig, load_run, train

OBJECTIVES = {"masked-patch": 1.0, "contrastive": 1.0}


def image_features(model, index, batch: int = 256) -> np.ndarray:
    """[N, d] mean final hidden state over each sample's image tokens (late fusion: image only)."""
    k = index.stream_ids["image:patches"]
    feats = []
    with torch.inference_mode():
        for a in range(0, len(index), batch):
            b = batching.assemble(index, np.arange(a, min(a + batch, len(index))), "packed")
            hidden, view = model.hidden_states(b)  # [N, d]
            sel = view.stream == k
            sums = torch.zeros(b.batch_size, hidden.shape[1]).index_add_(0, view.sample[sel], hidden[sel])
            counts = torch.bincount(view.sample[sel], minlength=b.batch_size).clamp(min=1)[:, None]
            feats.append((sums / counts).numpy())
    return np.concatenate(feats)


def probe(features: np.ndarray, labels: np.ndarray, splits: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = splits == "train"
    scaler = StandardScaler().fit(features[train])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(features[train]), labels[train])
    return float(clf.score(scaler.transform(features[~train]), labels[~train]))


def run_arm(name: str, data: Path, work: Path, args, splits: np.ndarray) -> dict:
    cfg = TrainConfig(data=[str(data)], out=work / f"run-{name}", max_steps=args.steps,
                      batch_samples=args.batch_samples, warmup=10, num_workers=0, seed=args.seed,
                      save_every=args.steps, lr=args.lr, device="cpu",
                      model=ModelConfig(size=args.size, fusion="late", objectives=dict(OBJECTIVES)))
    summary = train(cfg)
    log = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    steady = log[5:] or log  # drop warm-up steps from the rates
    seconds = sum(x["seconds"] for x in steady)
    model, _, loader = load_run(cfg.out)
    labels = loader.index.labels
    torch.manual_seed(args.seed)
    untrained = build_model(cfg.model, loader.index.streams).eval()
    last = log[-10:]
    return {
        "arm": name,
        "streams": [s.key for s in loader.index.streams if s.key != "separator"],
        "train_seconds": summary["seconds"],
        "tokens_per_s": sum(x["tokens"] for x in steady) / seconds,
        "samples_per_s": len(steady) * args.batch_samples / seconds,
        "tokens_per_sample": float(np.mean(loader.index.lengths)),
        "parameters_trained": summary["parameters"],
        "final_loss": float(np.mean([x["loss"] for x in last])),
        "final_losses": {k: float(np.mean([x["losses"][k] for x in last if k in x["losses"]])) for k in OBJECTIVES},
        "probe_accuracy": probe(image_features(model, loader.index), labels, splits),
        "probe_untrained": probe(image_features(untrained, loader.index), labels, splits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch-samples", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="frozen-vs-learned-"))
    for stale in work.glob("run-*"):  # each run trains afresh
        import shutil

        shutil.rmtree(stale)
    data, emb = work / "digits", work / "digits-minilm"
    preprocess(PreprocessConfig(source="digits", out=data))
    t0 = time.perf_counter()
    m = embed(EmbedConfig(data=data, encoder="minilm-l6", out=emb, modality="text"))
    embed_seconds = time.perf_counter() - t0
    splits = np.asarray(store.read_folder(data).column("split").to_pylist())

    rows = [run_arm("learned", data, work, args, splits), run_arm("frozen", emb, work, args, splits)]
    learned, frozen = rows
    print(f"digits: {m['rows']} samples, model {args.size}, late fusion, objectives "
          f"{', '.join(OBJECTIVES)}, {args.steps} steps × {args.batch_samples} samples, seed {args.seed}, "
          f"{torch.get_num_threads()} CPU threads")
    from safetensors import safe_open

    from mmtool.embed.frozen import minilm_folder

    with safe_open(str(minilm_folder() / "model.safetensors"), "np") as f:
        frozen_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    print(f"one-off embedding with minilm-l6 ({frozen_params:,} frozen parameters, not trained): "
          f"{embed_seconds:.1f} s{' (cache hit)' if m['up_to_date'] else ''}")
    header = ["", "learned text (wordpiece ids)", "frozen minilm-l6", "frozen / learned"]
    table = [
        ("text stream", "text:wordpiece", "embedding:minilm-l6", ""),
        ("tokens per sample", f"{learned['tokens_per_sample']:.2f}", f"{frozen['tokens_per_sample']:.2f}",
         f"{frozen['tokens_per_sample'] / learned['tokens_per_sample']:.2f}"),
        ("parameters trained", f"{learned['parameters_trained']:,}", f"{frozen['parameters_trained']:,}",
         f"{frozen['parameters_trained'] / learned['parameters_trained']:.3f}"),
        ("train wall time (s)", f"{learned['train_seconds']:.1f}", f"{frozen['train_seconds']:.1f}",
         f"{frozen['train_seconds'] / learned['train_seconds']:.2f}"),
        ("real tokens/s", f"{learned['tokens_per_s']:,.0f}", f"{frozen['tokens_per_s']:,.0f}",
         f"{frozen['tokens_per_s'] / learned['tokens_per_s']:.2f}"),
        ("samples/s", f"{learned['samples_per_s']:,.0f}", f"{frozen['samples_per_s']:,.0f}",
         f"{frozen['samples_per_s'] / learned['samples_per_s']:.2f}"),
        ("final loss (last 10 steps)", f"{learned['final_loss']:.4f}", f"{frozen['final_loss']:.4f}", ""),
        *[(f"  {k}", f"{learned['final_losses'][k]:.4f}", f"{frozen['final_losses'][k]:.4f}", "")
          for k in OBJECTIVES],
        ("image probe accuracy", f"{learned['probe_accuracy']:.3f}", f"{frozen['probe_accuracy']:.3f}",
         f"{frozen['probe_accuracy'] - learned['probe_accuracy']:+.3f} (diff)"),
        ("  same model untrained", f"{learned['probe_untrained']:.3f}", f"{frozen['probe_untrained']:.3f}", ""),
    ]
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(4)]
    for r in [header, *table]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    (work / "frozen_vs_learned.json").write_text(json.dumps(rows, indent=2))
    print(f"details: {work / 'frozen_vs_learned.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
