"""Eager vs `--compile` training steps on mixed packed batches, measured in one run.

Usage: python benchmarks/compile.py [--size small] [--steps 20] [--warmup 3] [--batch-tokens 4096]
                                    [--threads N] [--blocks auto|on|off] [--static]
                                    [--parts] [--warm-cache] [--bf16] [--workdir DIR]

The built-in mixture of `benchmarks/train_throughput.py` (digits, spoken-digits, cartpole, pydocs at
equal weights) is cut into packed batches of `--batch-tokens`; two copies of one model (same initial
weights, next-token + masked-patch, early fusion), one eager and one compiled
(`mmtool.models.compile`), train on the very same batches with the same masks. After `--warmup`
steps each (the compiled model compiles there: its first step is the first-step cost), the steps
alternate eager, compiled, compiled, eager, ... so that a busy shared machine slows both alike;
each pair gives one ratio eager/compiled, and the median and spread of those ratios are printed
with the compilations per 100 steps. `--static` compiles one static graph per row bucket instead of
marking rows dynamic; the inductor cache starts empty (cold, as on a new machine) unless
`--warm-cache`. `--parts` then times a step's parts (whole loss, trunk, text head, its bare
matmuls) in CPU seconds: where the time goes, and so what compiling can save. `--bf16` runs both
models under bfloat16 autocast (`torch.autocast("cpu")`; on a CPU with AMX its matmuls are the
fast ones, so the memory-bound work that compiling fuses is a larger share of a step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--static", action="store_true", help="static graphs per bucket, not dynamic rows")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--blocks", choices=("auto", "on", "off"), default="auto",
                        help="compile the trunk blocks too (auto: on CUDA only)")
    parser.add_argument("--bf16", action="store_true", help="both models under bfloat16 autocast")
    parser.add_argument("--workdir", type=Path, help="keep the preprocessed data here between runs")
    parser.add_argument("--parts", action="store_true",
                        help="also time the parts of a step: trunk, text head, its bare matmuls (CPU s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.warm_cache:  # before torch is imported: a cold cache, honest first-step cost
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        run(args, args.workdir or Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    import copy

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import mixture_batches

    from mmtool.models import compile as compiling
    from mmtool.models.model import ModelConfig, build_model

    compiling.SETTINGS.dynamic = not args.static
    compiling.SETTINGS.blocks = {"auto": None, "on": True, "off": False}[args.blocks]
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, index = mixture_batches(root, args.batch_tokens, args.warmup + args.steps)
    torch.manual_seed(0)
    eager = build_model(ModelConfig(size=args.size, objectives={"next-token": 1.0, "masked-patch": 1.0}),
                        index.streams)
    compiled = compiling.compile_model(copy.deepcopy(eager))
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (eager, compiled)}

    def step(model, i: int) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds of this process, loss) of one training step."""
        start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(batches[i], torch.Generator().manual_seed(i)).loss
        loss.backward()
        opts[id(model)].step()
        opts[id(model)].zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu, float(loss.detach())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.size}: "
          f"{eager.num_parameters():,} parameters; attention {eager.backend(torch.device('cpu')).registry_name}; "
          f"rows {'static per bucket' if args.static else 'dynamic'}, buckets {compiling.SETTINGS.buckets}; "
          f"inductor cache {'warm' if args.warm_cache else 'cold'}; "
          f"{'bf16 autocast' if args.bf16 else 'float32'}")
    print(f"compiled: {compiling.compile_note('cpu')}")
    tokens = [b.real_tokens for b in batches]
    rows = sorted({compiling.SETTINGS.buckets.size(n) for n in tokens})
    print(f"{len(batches)} packed batches of the built-in mixture: {min(tokens):,}-{max(tokens):,} real tokens, "
          f"{min(b.batch_size for b in batches)}-{max(b.batch_size for b in batches)} samples; "
          f"trunk row buckets hit: {rows}")
    first = {}
    diffs = []
    for i in range(args.warmup):
        (te, _, le), (tc, _, lc) = step(eager, i), step(compiled, i)
        first.setdefault("eager", te)
        first.setdefault("compiled", tc)
        diffs.append(abs(le - lc))
    graphs_warm = compiling.stats().graphs
    times = {"eager": [], "compiled": []}
    cpu = {"eager": [], "compiled": []}
    for j, i in enumerate(range(args.warmup, args.warmup + args.steps)):
        order = (eager, compiled) if j % 2 == 0 else (compiled, eager)  # ABBA: drift hits both
        out = {id(m): step(m, i) for m in order}
        for name, m in (("eager", eager), ("compiled", compiled)):
            times[name].append(out[id(m)][0])
            cpu[name].append(out[id(m)][1])
        diffs.append(abs(out[id(eager)][2] - out[id(compiled)][2]))
    report(args, first, times, cpu, diffs, graphs_warm, compiling.stats().graphs)
    if args.parts:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            parts(eager, compiled, batches[args.warmup:], index.streams)


def spread(ratios: list[float]) -> str:
    """'median M x (quartiles a-b, range lo-hi)' of per-pair ratios."""
    ratios = sorted(ratios)
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
    return (f"median {statistics.median(ratios):.2f}x (quartiles {q[0]:.2f}-{q[2]:.2f}, "
            f"range {ratios[0]:.2f}-{ratios[-1]:.2f})")


def report(args: argparse.Namespace, first: dict, times: dict, cpu: dict, diffs: list[float],
           graphs_warm: int, graphs: int) -> None:
    """Prints the first-step cost, the steady ratios with their spread, compilations, loss agreement."""
    total = args.warmup + args.steps
    print(f"first step: eager {first['eager']:.2f} s, compiled {first['compiled']:.2f} s "
          f"(compile cost ≈ {first['compiled'] - first['eager']:.1f} s)")
    print(f"steady step (median of {args.steps}): eager {statistics.median(times['eager']):.3f} s, "
          f"compiled {statistics.median(times['compiled']):.3f} s")
    print(f"eager / compiled, per interleaved pair: {spread([e / c for e, c in zip(times['eager'], times['compiled'])])}; "
          f"total time {sum(times['eager']) / sum(times['compiled']):.2f}x  (target >= 1.15)")
    print(f"eager / compiled, CPU seconds of the process (what other jobs on the machine cannot "
          f"inflate): {spread([e / c for e, c in zip(cpu['eager'], cpu['compiled'])])}; "
          f"total {sum(cpu['eager']) / sum(cpu['compiled']):.2f}x")
    print(f"compilations: {graphs} in the run's {total} steps (target <= 8), {graphs_warm} of them in the "
          f"{args.warmup} warm-up steps; after warm-up {100 * (graphs - graphs_warm) / args.steps:.0f} per 100 steps")
    print(f"loss, eager vs compiled: max |difference| {max(diffs):.2e} over {total} steps")


def parts(eager, compiled, batches, streams) -> None:
    """Median CPU seconds per batch of a step's parts, eager and compiled: forward + backward of
    the whole loss, of the trunk alone (hidden states → backward), and of the largest text head
    alone on random rows as many as the batch's text tokens, beside that head's bare matmuls."""
    import torch

    from mmtool.models.compile import compiled_head_loss
    from mmtool.models.objectives import tied_head_loss

    k = max((i for i, st in enumerate(streams) if st.kind == "ids"), key=lambda i: streams[i].vocab_size)
    head = eager.embedder.encoders[str(k)].head_weight.detach().clone().requires_grad_()  # [V, d]

    def cpu(fn) -> float:
        start = time.process_time()
        fn()
        return time.process_time() - start

    def head_rows(b):
        n = b.stream_tokens(k)
        g = torch.Generator().manual_seed(n)
        return torch.randn(n, head.shape[1], generator=g).requires_grad_(), \
            torch.randint(0, head.shape[0], (n,), generator=g)

    def trunk(model, b):
        return lambda: model.hidden_states(b)[0].square().mean().backward()

    def loss(fn, b):
        rows, target = head_rows(b)
        return lambda: fn(rows, head, target).mean().backward()

    def matmuls(b):
        rows, _ = head_rows(b)
        return lambda: (rows @ head.T).sum().backward()

    cases = {"whole loss, eager": lambda b: lambda: eager(b, torch.Generator().manual_seed(0)).loss.backward(),
             "whole loss, compiled": lambda b: lambda: compiled(b, torch.Generator().manual_seed(0)).loss.backward(),
             "trunk, eager": lambda b: trunk(eager, b), "trunk, compiled": lambda b: trunk(compiled, b),
             f"{streams[k].key} head, eager": lambda b: loss(tied_head_loss, b),
             f"{streams[k].key} head, compiled": lambda b: loss(compiled_head_loss, b),
             f"{streams[k].key} head, bare matmuls": matmuls}
    times = {name: [] for name in cases}
    for b in batches:
        for name, make in cases.items():
            times[name].append(cpu(make(b)))
    eager.zero_grad(set_to_none=True)
    compiled.zero_grad(set_to_none=True)
    print(f"parts, forward + backward, median CPU seconds over {len(batches)} batches "
          f"({statistics.median(b.stream_tokens(k) for b in batches):,.0f} {streams[k].key} tokens each):")
    for name, values in times.items():
        print(f"  {name:<40} {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
