"""One-call GPU check: the CUDA paths of mmtool run, measured, in a few minutes.

Usage: python benchmarks/gpu_check.py [--workdir DIR] [--steps 20] [--size base]

On a CUDA machine it prints one table:

* every attention backend against the padded reference in bf16 (max |error|; the reference runs
  in float32), causal, on one batch of mixed sample lengths;
* flash-varlen vs bucketed speed (forward + backward, ms per call);
* host-to-device: one copy of a pinned `Batch` buffer vs one copy per field (GB/s);
* data wait with the copy on a side stream (the next batch copies while this one trains);
* `--steps` bf16-autocast training steps of `--size` (default base): real tokens/s and an MFU
  estimate, the model's FLOPs per token (`flops_per_token`) over the H200's dense bf16 peak;
* a 1-process NCCL `torchrun` step (DDP forward, backward, all-reduce) in a subprocess.

Without CUDA it prints "no CUDA device", then item 4 of issue 17 on paper (`paper_data_wait`):
the data-wait fraction at the step rate an H200 needs for `--size`, from the packed loader's
tokens/s measured here and the model's FLOPs per token; and exits 0. Every function takes a
`device` (and runs on "cpu" in tests/benchmarks/test_gpu_check.py, float32 where bf16 means nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

H200_BF16_FLOPS = 989e12
"""NVIDIA H200 SXM dense bf16 tensor-core peak (FLOP/s; 1,979 T is the 2:4-sparse figure)."""
MIXED_LENGTHS = [14, 70, 1200, 16, 64, 300, 9, 120, 33, 700, 18, 256] * 2
"""Sample lengths of the attention checks: captions, text, episodes (as the built-in mixture)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _qkv(lengths: list[int], heads: int, dh: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random q, k, v [N, H, Dh] in `dtype` and cu_seqlens int32 [B+1] for samples of `lengths`."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, dh, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def attention_errors(device: str, dtype: torch.dtype, lengths: list[int] = MIXED_LENGTHS,
                     causal: bool = True) -> dict[str, float | str]:
    """Max |backend − padded reference (float32)| of every registered attention backend, on packed
    samples of `lengths` in `dtype`; a backend that cannot run here gives its reason instead."""
    from mmtool.models.attention import ATTENTION

    dev = torch.device(device)
    q, k, v, cu = _qkv(lengths, 8, 64, dev, dtype)
    ref = ATTENTION.get("padded")(q.float(), k.float(), v.float(), cu, max(lengths), causal, lengths)
    out: dict[str, float | str] = {}
    for name in ATTENTION.names():
        backend = ATTENTION.get(name)
        reason = backend.unavailable_reason(dev, False, causal)
        if reason is not None:
            out[name] = f"unavailable: {reason}"
            continue
        with torch.no_grad():
            got = backend(q, k, v, cu, max(lengths), causal, lengths)
        out[name] = float((got.float() - ref).abs().max())
    return out


def attention_speed(device: str, dtype: torch.dtype, names: tuple[str, ...] = ("flash-varlen", "bucketed"),
                    lengths: list[int] = MIXED_LENGTHS, repeats: int = 5) -> dict[str, float | str]:
    """Forward + backward milliseconds per call of each backend in `names` (causal, `lengths`)."""
    from mmtool.models.attention import ATTENTION

    dev = torch.device(device)
    q, k, v, cu = _qkv(lengths, 8, 64, dev, dtype)
    out: dict[str, float | str] = {}
    for name in names:
        backend = ATTENTION.get(name)
        reason = backend.unavailable_reason(dev, True, True)
        if reason is not None:
            out[name] = f"unavailable: {reason}"
            continue
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def call() -> None:
            backend(*leaves, cu, max(lengths), True, lengths).float().square().sum().backward()

        out[name] = 1e3 * _timed(call, dev, repeats)
    return out


def h2d_bandwidth(device: str, batch: Any, repeats: int = 5) -> dict[str, float]:
    """GB/s of moving `batch` to `device`: one copy of its (pinned, on CUDA) buffer vs one copy per
    stored field (`Batch.to_per_field`). On CPU both are memory copies (no pinning there)."""
    dev = torch.device(device)
    src = batch.pin_memory() if dev.type == "cuda" else batch
    nbytes = src.buffer.numel()

    def one() -> None:
        torch.empty_like(src.buffer, device=dev).copy_(src.buffer, non_blocking=True)

    def per_field() -> None:
        for spec in src.specs:
            view = src[spec.name]
            torch.empty_like(view, device=dev).copy_(view, non_blocking=True)

    return {"one_copy_gb_s": nbytes / _timed(one, dev, repeats) / 1e9,
            "per_field_gb_s": nbytes / _timed(per_field, dev, repeats) / 1e9,
            "fields": len(src.specs), "bytes": nbytes}


def side_stream_wait(device: str, batches: list[Any], step: Callable[[Any], None]) -> dict[str, float]:
    """Trains `step` on `batches`, copying batch i+1 to `device` on a side stream while batch i
    trains (on CPU: in line, no streams). Returns the share of the wall time spent waiting for a
    batch's copy, and the mean step seconds."""
    dev = torch.device(device)
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    pinned = [b.pin_memory() if side is not None else b for b in batches]

    def fetch(b: Any) -> tuple[Any, Any]:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            moved = b.to(dev)
            event = side.record_event() if side is not None else None
        return moved, event

    _sync(dev)
    start, wait = time.perf_counter(), 0.0
    nxt = fetch(pinned[0])
    for i in range(len(pinned)):
        t0 = time.perf_counter()
        batch, event = nxt
        if event is not None:
            torch.cuda.current_stream(dev).wait_event(event)
            event.synchronize()  # what the host blocks on: the copy, not the previous step
        wait += time.perf_counter() - t0
        if i + 1 < len(pinned):
            nxt = fetch(pinned[i + 1])
        step(batch)
    _sync(dev)
    seconds = time.perf_counter() - start
    return {"data_wait_fraction": wait / seconds, "step_seconds": seconds / len(pinned)}


def flops_per_token(model: Any, batch: Any) -> float:
    """Training FLOPs per real token of `model` on `batch` (forward + backward = 3 × forward):
    6 · trunk matmul parameters, + attention 12 · layers · d · Σ len² / N (halved when causal),
    + the tied heads, 6 · V · d per predicted token of a discrete stream (all of them, an upper
    bound), + 6 · d · dim per vector token (its encoder linear; decoders are as large). Embedding
    gathers are not FLOPs."""
    size, lengths = model.size, batch.numpy("seqlens").astype(float)
    n = float(lengths.sum())
    per_block = 4 * size.d_model ** 2 + 2 * size.d_model * size.d_mlp  # qkv, proj, MLP weights
    flops = 6.0 * per_block * size.n_layers * n
    flops += 12.0 * size.n_layers * size.d_model * float((lengths ** 2).sum()) * (0.5 if model.causal else 1.0)
    for k in batch.token_streams:
        stream, tokens = model.streams[k], batch.stream_tokens(k)
        if stream.kind == "ids":
            flops += 6.0 * stream.vocab_size * size.d_model * tokens
        elif stream.kind == "values" and stream.dim:
            flops += 6.0 * size.d_model * stream.dim * tokens
    return flops / n


def train_steps(device: str, batches: list[Any], streams: list[Any], size: str = "base",
                bf16: bool = True, peak_flops: float | None = H200_BF16_FLOPS) -> dict[str, Any]:
    """AdamW training steps of a `size` model (next-token + masked-patch) on `batches`, under
    bf16 autocast when `bf16`: real tokens/s after the first step, FLOPs per token, and MFU
    (model FLOP/s over `peak_flops`; None without a peak)."""
    from mmtool.models.model import ModelConfig, build_model

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(size=size, objectives={"next-token": 1.0, "masked-patch": 1.0}), streams).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    losses, tokens, flops, seconds = [], 0, 0.0, 0.0
    for i, host in enumerate(batches):
        batch = host.to(dev)
        _sync(dev)
        start = time.perf_counter()
        with autocast:
            loss = model(batch, torch.Generator().manual_seed(i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        losses.append(float(loss.detach()))
        if i:  # the first step warms kernels up
            seconds += time.perf_counter() - start
            tokens += host.real_tokens
            flops += flops_per_token(model, host) * host.real_tokens
    rate = flops / seconds if seconds else 0.0
    return {"size": size, "parameters": model.num_parameters(), "tokens_per_s": tokens / seconds if seconds else 0.0,
            "flops_per_token": flops / tokens if tokens else 0.0, "model_flops_per_s": rate,
            "mfu": rate / peak_flops if peak_flops else None, "losses": losses,
            "attention": model.backend(dev).registry_name}


def ddp_step(device: str, timeout: float = 240) -> dict[str, Any]:
    """One DDP training step in a real 1-process `torchrun` (NCCL on CUDA, gloo on CPU): the
    worker's JSON line (backend, loss, all-reduced value)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(Path(__file__).resolve()), "--ddp-worker", "--device", device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return {"ok": True, **json.loads(lines[-1])}


def _ddp_worker(device: str) -> None:
    """Runs under torchrun: init the process group, one DDP step of a tiny block, an all-reduce."""
    import torch.distributed as dist

    from mmtool.models.fusion import Block

    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else "cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    torch.manual_seed(0)
    block = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(dev))
    x = torch.randn(512, 64, device=dev)
    loss = block(x).square().mean()
    loss.backward()
    total = torch.tensor([1.0], device=dev)
    dist.all_reduce(total)
    grad = sum(float(p.grad.abs().sum()) for p in block.parameters())
    print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                      "loss": float(loss), "all_reduce": float(total), "grad_abs_sum": grad,
                      "block": Block.__name__}))
    dist.destroy_process_group()


def mixture_batches(root: Path, batch_tokens: int, count: int) -> tuple[list[Any], list[Any], Any]:
    """`count` packed batches of the built-in mixture (`train_throughput.MIXTURE`, built under
    `root` if missing), the index's streams, and the loader."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import MIXTURE, build

    from mmtool.data.batching import assemble
    from mmtool.data.loader import Loader, LoaderConfig

    folders = [root / name for name, *_ in MIXTURE]
    if not all((f / "manifest.json").exists() for f in folders):
        folders = build(root)
    loader = Loader(LoaderConfig([f"{f}=1" for f in folders], strategy="packed", batch_tokens=batch_tokens,
                                 samples_per_epoch=8000, num_workers=0))
    batches = [assemble(loader.index, p, "packed") for p in loader.plan(0)[:count]]
    return batches, loader.index.streams, loader


def loader_tokens_per_s(loader: Any, seconds: float = 3.0) -> tuple[float, float]:
    """(real tokens per wall second, per CPU second of this thread) of `loader` assembling packed
    batches in this thread for about `seconds`: on a machine shared with other jobs the second is
    what one free core gives."""
    it = loader.forever()
    next(it)
    tokens, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        tokens += next(it).real_tokens
    rates = tokens / (time.perf_counter() - start), tokens / max(time.thread_time() - cpu, 1e-9)
    it.close()
    return rates


def paper_data_wait(loader_rate: float, flops_token: float, peak: float = H200_BF16_FLOPS,
                    mfus: tuple[float, ...] = (0.4, 1.0)) -> list[dict[str, float]]:
    """Data wait at the token rate an accelerator needs: at MFU m it trains G = m · peak / FLOPs
    per token tokens/s. Loading in the training thread (`num_workers 0`) adds T/L to each step's
    T/G: wait = G / (L + G). Loading in a worker overlaps: wait = max(0, 1 − L/G); w workers
    (processes: they scale) keep the wait ≤ 2% from w ≥ 0.98 · G / L."""
    rows = []
    for m in mfus:
        need = m * peak / flops_token
        rows.append({"mfu": m, "needed_tokens_per_s": need, "loader_tokens_per_s": loader_rate,
                     "wait_inline": need / (loader_rate + need), "wait_overlapped": max(0.0, 1 - loader_rate / need),
                     "workers_for_2pct": max(1, math.ceil(0.98 * need / loader_rate - 1e-9))})
    return rows


def cpu_branch(args: argparse.Namespace, root: Path) -> None:
    """No CUDA: says so, then prints item 4 on paper from what this machine measures."""
    print("no CUDA device: the GPU checks need one (torch.cuda.is_available() is False); "
          "what follows is computed on paper from this CPU's loader")
    batches, streams, loader = mixture_batches(root, args.batch_tokens, 4)
    from mmtool.models.model import ModelConfig, build_model

    model = build_model(ModelConfig(size=args.size, objectives={"next-token": 1.0, "masked-patch": 1.0}), streams)
    fpt = sum(flops_per_token(model, b) * b.real_tokens for b in batches) / sum(b.real_tokens for b in batches)
    wall, rate = loader_tokens_per_s(loader)
    loader.close()
    print(f"model {args.size}: {model.num_parameters():,} parameters, {fpt / 1e6:,.0f} MFLOPs per real token "
          f"(training, mixed packed batches of {args.batch_tokens:,} tokens); packed loader, one thread: "
          f"{rate / 1e6:,.2f}M real tokens per CPU second ({wall / 1e6:,.2f}M per wall second on this "
          f"shared {os.cpu_count()}-CPU machine; the table uses the first)")
    print(f"{'H200 at MFU':<12} {'needs tok/s':>12} {'wait, inline loader':>20} {'wait, 1 worker':>15} "
          f"{'workers for <=2%':>17}")
    for r in paper_data_wait(rate, fpt):
        print(f"{r['mfu']:<12.0%} {r['needed_tokens_per_s'] / 1e6:>11.2f}M {r['wait_inline']:>20.1%} "
              f"{r['wait_overlapped']:>15.1%} {r['workers_for_2pct']:>17}")


def gpu_branch(args: argparse.Namespace, root: Path) -> None:
    """Every check on cuda, one row each, as it completes."""
    batches, streams, loader = mixture_batches(root, args.batch_tokens, args.steps + 1)
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name(0) + f", torch {torch.__version__}")]

    def show(name: str, value: Any) -> None:
        rows.append((name, value if isinstance(value, str) else json.dumps(value, default=float)))
        print(f"{name:<34} {rows[-1][1]}", flush=True)

    show("device", rows.pop()[1])
    show("attention max |err| bf16 vs ref", {k: v if isinstance(v, str) else float(f"{v:.3g}")
                                           for k, v in attention_errors("cuda", torch.bfloat16).items()})
    show("attention fwd+bwd ms (bf16)", {k: v if isinstance(v, str) else round(v, 3)
                                        for k, v in attention_speed("cuda", torch.bfloat16).items()})
    show("H2D GB/s: one pinned copy / per field", h2d_bandwidth("cuda", batches[0]))
    result = train_steps("cuda", batches, streams, args.size)
    show(f"train {args.size} bf16: tok/s, MFU", {"tokens_per_s": round(result["tokens_per_s"]),
                                                "mfu": round(result["mfu"], 4),
                                                "mflops_per_token": round(result["flops_per_token"] / 1e6, 1),
                                                "attention": result["attention"]})
    from mmtool.models.model import ModelConfig, build_model

    model = build_model(ModelConfig(size=args.size), streams).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: Any) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch, torch.Generator().manual_seed(0)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    show("data wait, copy on side stream", side_stream_wait("cuda", batches, step))
    show("torchrun 1 process NCCL step", ddp_step("cuda"))
    rate = loader_tokens_per_s(loader)[1]
    show("item 4 on paper (measured MFU)", paper_data_wait(rate, result["flops_per_token"], mfus=(result["mfu"], 0.4)))
    loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the preprocessed mixture here between runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        return _ddp_worker(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        (gpu_branch if torch.cuda.is_available() else cpu_branch)(args, root)


if __name__ == "__main__":
    main()
