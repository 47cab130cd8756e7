"""`--precision fp32` vs `--precision bf16` training steps on mixed packed batches, in one run.

Usage: python benchmarks/precision.py [--size small] [--steps 12] [--warmup 2] [--batch-tokens 4096]
                                      [--threads N] [--workdir DIR]

The built-in mixture of `benchmarks/train_throughput.py` (digits, spoken-digits, cartpole, pydocs at
equal weights) is cut into packed batches; two copies of one model (same initial weights,
next-token + masked-patch) train on the very same batches with the same masks, one in float32 and
one under the autocast that `mmtool train --precision bf16` uses (`mmtool.train.device.autocast`:
matrix products in bfloat16, weights and AdamW state float32). After `--warmup` steps each, steps
alternate fp32, bf16, bf16, fp32, ... so that a busy machine slows both alike; each pair gives
one ratio fp32/bf16, printed as median and spread (wall and CPU seconds), with the largest loss
difference between the two. Whether bf16 pays depends on the CPU: with AMX or AVX512-BF16 its
matmuls are native; without, they are emulated and bf16 can be slower (the CPU flags are printed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per precision")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, help="keep the preprocessed data here between runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.workdir or Path(tmp))


def cpu_bf16_flags() -> str:
    """The CPU's bf16-relevant flags from /proc/cpuinfo ('unknown' where there is none)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f") if f in flags]
    return ", ".join(found) or "none of amx_bf16/avx512_bf16 (bf16 matmuls are emulated)"


def run(args: argparse.Namespace, root: Path) -> None:
    import torch
    from compile import spread
    from train_throughput import mixture_batches

    from mmtool.models.model import ModelConfig, build_model
    from mmtool.train.device import autocast

    if args.threads:
        torch.set_num_threads(args.threads)
    batches, index = mixture_batches(root, args.batch_tokens, args.warmup + args.steps)
    torch.manual_seed(0)
    fp32 = build_model(ModelConfig(size=args.size, objectives={"next-token": 1.0, "masked-patch": 1.0}),
                       index.streams)
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    cpu = torch.device("cpu")

    def step(name: str, i: int) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds of this process, loss) of one training step."""
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast(name, cpu):
            loss = models[name](batches[i], torch.Generator().manual_seed(i)).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu_start, float(loss.detach())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.size}: "
          f"{fp32.num_parameters():,} parameters; CPU flags: {cpu_bf16_flags()}")
    print(f"{len(batches)} packed batches of the built-in mixture, "
          f"{min(b.real_tokens for b in batches):,}-{max(b.real_tokens for b in batches):,} real tokens")
    diffs = []
    for i in range(args.warmup):
        diffs.append(abs(step("fp32", i)[2] - step("bf16", i)[2]))
    wall: dict[str, list[float]] = {"fp32": [], "bf16": []}
    cpus: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for j, i in enumerate(range(args.warmup, args.warmup + args.steps)):
        order = ("fp32", "bf16") if j % 2 == 0 else ("bf16", "fp32")  # ABBA: drift hits both
        out = {name: step(name, i) for name in order}
        for name in wall:
            wall[name].append(out[name][0])
            cpus[name].append(out[name][1])
        diffs.append(abs(out["fp32"][2] - out["bf16"][2]))
    print(f"steady step (median of {args.steps}): fp32 {statistics.median(wall['fp32']):.3f} s, "
          f"bf16 {statistics.median(wall['bf16']):.3f} s")
    print(f"fp32 / bf16, per interleaved pair: {spread([a / b for a, b in zip(wall['fp32'], wall['bf16'])])}; "
          f"total time {sum(wall['fp32']) / sum(wall['bf16']):.2f}x")
    print(f"fp32 / bf16, CPU seconds: {spread([a / b for a, b in zip(cpus['fp32'], cpus['bf16'])])}")
    print(f"loss, fp32 vs bf16: max |difference| {max(diffs):.2e} over {len(diffs)} steps "
          f"(the two copies' weights drift apart step by step, so later steps differ more)")


if __name__ == "__main__":
    main()
