"""Attention backends over one packed, mixed-modality batch: ms per forward+backward, one run.

Usage: python benchmarks/attention.py [--samples 32] [--heads 4] [--head-dim 32] [--repeat 5]

The batch mixes three kinds of samples, as a multimodal mixture does: ~14-token images/captions
(50%), ~70-token text (35%) and ~1200-token RL episodes (15%). For each backend available on this
machine with backward, it times forward+backward (best of `--repeat`, after one warm-up), both
non-causal and causal, and prints the ratio of each to the `padded` reference measured in the same
run, plus the largest difference from the reference's output. A forward-only (no_grad) pass
is timed too, where backends without a backward here (flex on CPU) can take part.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from mmtool.models.attention import ATTENTION, length_buckets

MIXTURE = [  # (share of samples, lowest length, highest length)
    (0.50, 8, 20),  # images / captions, ~14 tokens
    (0.35, 40, 100),  # text, ~70 tokens
    (0.15, 900, 1500),  # RL episodes, ~1200 tokens
]


def draw_lengths(samples: int, seed: int) -> list[int]:
    """`samples` lengths from MIXTURE, with at least one sample of every kind."""
    rng = random.Random(seed)
    kinds = list(range(len(MIXTURE))) + rng.choices(range(len(MIXTURE)), [m[0] for m in MIXTURE],
                                                    k=samples - len(MIXTURE))
    rng.shuffle(kinds)
    return [rng.randint(MIXTURE[i][1], MIXTURE[i][2]) for i in kinds]


def time_call(fn, repeat: int, budget_s: float):
    """(best wall time in ms, last result) of `fn()` over up to `repeat` runs after one warm-up.

    Stops early once `budget_s` seconds have gone into timed runs (at least one always runs), so
    that very slow backends (njt, eager flex on CPU) do not dominate the benchmark's runtime.
    """
    fn()
    best, spent, out = float("inf"), 0.0, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="samples in the batch")
    parser.add_argument("--heads", type=int, default=4, help="attention heads H")
    parser.add_argument("--head-dim", type=int, default=32, help="head dimension Dh")
    parser.add_argument("--repeat", type=int, default=5, help="best of N timed calls per setting")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="stop repeating a setting after this many seconds of timed runs")
    parser.add_argument("--seed", type=int, default=0, help="seed for lengths and values")
    parser.add_argument("--skip-forward-only", action="store_true", help="only time forward+backward")
    args = parser.parse_args()

    lengths = draw_lengths(args.samples, args.seed)
    n, b, lmax = sum(lengths), len(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # [B+1]
    g = torch.Generator().manual_seed(args.seed)
    q, k, v, grad_out = (torch.randn(n, args.heads, args.head_dim, generator=g)
                         for _ in range(4))  # [N, H, Dh] each
    device = q.device
    token_pad = 1 - n / (b * lmax)
    score_pad = 1 - sum(x * x for x in lengths) / (b * lmax * lmax)
    buckets = length_buckets(lengths)
    print(f"batch: {b} samples, {n:,} real tokens, lengths {min(lengths)}..{lmax}; H={args.heads} "
          f"Dh={args.head_dim}; torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    print(f"padded reference pays: {token_pad:.1%} padding tokens ({b}×{lmax} = {b * lmax:,} slots), "
          f"{score_pad:.1%} of its score matrix on padding; bucketed uses {len(buckets)} buckets")

    def fwd_bwd(name: str, causal: bool):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))

        def call():
            out = ATTENTION.get(name)(qq, kk, vv, cu, lmax, causal, lengths)  # [N, H, Dh]
            out.backward(grad_out)
            return out.detach()
        return call

    def fwd(name: str, causal: bool):
        def call():
            with torch.no_grad():
                return ATTENTION.get(name)(q, k, v, cu, lmax, causal, lengths)  # [N, H, Dh]
        return call

    modes = [("fwd+bwd", True, fwd_bwd)] + ([] if args.skip_forward_only else [("fwd only", False, fwd)])
    for title, requires_grad, make in modes:
        print(f"\n{title}: ms per call (best of {args.repeat}), ratio = padded time / backend time")
        print(f"{'backend':<13} {'full ms':>9} {'speedup':>8} {'max|Δ|':>8}   "
              f"{'causal ms':>9} {'speedup':>8} {'max|Δ|':>8}")
        with torch.no_grad():
            refs = {c: ATTENTION.get("padded")(q, k, v, cu, lmax, c, lengths) for c in (False, True)}
        base = {c: time_call(make("padded", c), args.repeat, args.budget)[0] for c in (False, True)}
        for name in ["padded"] + [x for x in ATTENTION.names() if x != "padded"]:
            backend = ATTENTION.get(name)
            if not backend.is_available(device, requires_grad):
                print(f"{name:<13} unavailable: {backend.unavailable_reason(device, requires_grad)}")
                continue
            cells = []
            for causal in (False, True):
                if not backend.is_available(device, requires_grad, causal):
                    cells.append(f"{'n/a (no causal kernel here)':>27}")
                    continue
                if name == "padded":  # timed above, as the base of the ratios
                    ms, out = base[causal], refs[causal]
                else:
                    ms, out = time_call(make(name, causal), args.repeat, args.budget)
                diff = (out - refs[causal]).abs().max()
                cells.append(f"{ms:>9.1f} {base[causal] / ms:>7.2f}x {diff:>8.1e}")
            print(f"{name:<13} " + "   ".join(cells))


if __name__ == "__main__":
    main()
