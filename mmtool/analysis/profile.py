"""Profiling the batching strategies: what each costs in throughput, padding, host-to-device traffic.

`profile_strategies` runs every requested strategy over the same folders, mixture and seed, and
measures `steps` batches of each (after `warmup` batches that fill caches and worker queues):

* loader throughput: samples/s, real (non-pad) tokens/s, batches/s, over the wall time of the loop;
* padding: the mean of `batching.padding_fraction` over the measured batches;
* host-to-device traffic of the one-buffer `Batch.to(device)` against the naive
  `Batch.to_per_field(device)`: copies and bytes per batch always (they follow from the buffer
  layout), and their time only where an accelerator exists — on a CPU-only machine the timing is
  reported as `null` with the reason, never as a made-up number;
* slot-level index fields (`layout.py`): the time to compute them from the batch's segment table
  on the destination device, once per batch — work the loader leaves to the device, reported so it
  is not hidden (a training step would otherwise pay it on its first read of `slot_stream`);
* memory: peak RSS of the process so far (`ru_maxrss`, so it never falls between strategies) and
  current RSS (`/proc/self/statm`) before and after each strategy;
* with a `step_fn` (the model's forward + backward on a batch), the step throughput in real tokens/s
  and the fraction of the loop's time spent blocked in `next(iterator)` waiting for data;
* the mixture: each folder's requested share (of tokens or samples, per `--mix-by`) against the
  realised shares of tokens and samples over a whole epoch, and per strategy the token shares of
  the measured batches, the share of them that hold one folder only, and the loader's warnings.

The result is a JSON-ready dict; `plot_profile` draws it as bar charts. Nothing here prints.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmtool.data.batch import Batch
from mmtool.data.batching import STRATEGIES, BatchSize, padding_fraction
from mmtool.data.loader import Loader, LoaderConfig
from mmtool.errors import MMToolError

DEFAULT_STRATEGIES = ["per-sample", "by-modality", "by-modality-sorted", "padded", "packed"]
NO_ACCELERATOR = "n/a (no accelerator)"
PLOT_FORMATS = (".png", ".svg", ".pdf")


@dataclass
class ProfileConfig:
    """What `mmtool profile` measures; every field but `step_fn` (built from `--model SIZE`) is a
    flag of `mmtool profile`."""

    data: list[str]
    """`DIR[=WEIGHT]` entries or a mixture YAML file (`--data`), as for the loader."""
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    """Registered batching strategies to compare (`mmtool ls strategies`)."""
    batch_tokens: int | None = None
    """Token budget per batch (`--batch-tokens`); exactly one of this and `batch_samples`."""
    batch_samples: int | None = None
    """Fixed samples per batch (`--batch-samples`): strategies compared on identical content."""
    steps: int = 50
    """Batches measured per strategy, after `warmup` batches."""
    warmup: int = 2
    """Batches drawn before the clock starts (worker start-up, first epoch plan, caches)."""
    num_workers: int = 0
    """Loader workers (0: assemble in the measuring thread)."""
    worker_type: str = "thread"
    """"thread" or "process" (see `LoaderConfig.worker_type`)."""
    device: str = "cpu"
    """"cpu" or "cuda": where batches go; with "cuda" the H2D copies are timed."""
    seed: int = 0
    """Mixture seed, the same for every strategy."""
    samples_per_epoch: int | None = None
    """Draws per epoch (default: every sample once); see `LoaderConfig`."""
    mix_by: str | None = None
    """What a weight is a share of: tokens or samples (`--mix-by`; see `LoaderConfig.mix_by`)."""
    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"])
    """Rows profiled, by split column (`--splits`); all of them by default."""
    compile: bool = False
    """Compile the `--model` step (`mmtool.models.compile`); its graphs compile in the warm-up
    steps, whose first-step time and graph count the result reports."""
    step_fn: Callable[[Batch], None] | None = None
    """Optional model step (forward + backward) called on each batch, warm-up ones included, on `device`."""


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware the numbers were measured on."""
    import pyarrow

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__,
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
            "accelerator": None}
    if device == "cuda" and torch.cuda.is_available():
        info["accelerator"] = torch.cuda.get_device_name(0)
    return info


def validate(cfg: ProfileConfig) -> BatchSize:
    """Checks every flag before any work starts; returns the batch size.

    Raises:
        MMToolError: no strategies or an unknown one (with close matches), both or neither of the
            batch sizes, a non-positive step count, an unknown or absent device.
    """
    if not cfg.strategies:
        raise MMToolError("--strategies is empty; give e.g. per-sample,by-modality,padded,packed")
    for name in cfg.strategies:
        try:
            STRATEGIES.get(name)
        except MMToolError as exc:
            raise MMToolError(f"--strategies: {exc}") from None
    dupes = sorted({s for s in cfg.strategies if cfg.strategies.count(s) > 1})
    if dupes:
        raise MMToolError(f"--strategies lists {', '.join(dupes)} more than once")
    size = BatchSize(cfg.batch_tokens, cfg.batch_samples)
    if cfg.steps < 1:
        raise MMToolError(f"--steps {cfg.steps}: must be ≥ 1")
    if cfg.warmup < 0:
        raise MMToolError(f"warmup {cfg.warmup}: must be ≥ 0")
    if cfg.device not in ("cpu", "cuda"):
        raise MMToolError(f"--device {cfg.device!r}: expected cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MMToolError("--device cuda: torch sees no CUDA device on this machine; use --device cpu")
    return size


def _loader_config(cfg: ProfileConfig, strategy: str, verify: bool) -> LoaderConfig:
    return LoaderConfig(data=list(cfg.data), strategy=strategy, batch_tokens=cfg.batch_tokens,
                        batch_samples=cfg.batch_samples, seed=cfg.seed,
                        samples_per_epoch=cfg.samples_per_epoch, num_workers=cfg.num_workers,
                        worker_type=cfg.worker_type, pin_memory=cfg.device == "cuda", verify=verify,
                        mix_by=cfg.mix_by, splits=list(cfg.splits))


class _H2D:
    """Copies and bytes per batch of both transfer paths, and their time on a real device."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.timed = self.device.type == "cuda"
        self.copies = {"one_buffer": 0, "per_field": 0}
        self.bytes = {"one_buffer": 0, "per_field": 0}
        self.seconds = {"one_buffer": 0.0, "per_field": 0.0}

    def move(self, batch: Batch) -> Batch:
        """The batch on the device by the one-buffer path (timed on CUDA); counts both paths."""
        self.copies["per_field"] += len(batch.specs)
        self.bytes["per_field"] += sum(s.nbytes for s in batch.specs)
        if not self.timed:  # what a GPU would get: one copy of the whole buffer
            self.copies["one_buffer"] += 1
            self.bytes["one_buffer"] += batch.buffer.numel()
            return batch
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        moved = batch.to(self.device)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        per_field = batch.to_per_field(self.device)
        torch.cuda.synchronize()
        self.seconds["per_field"] += time.perf_counter() - t1
        self.seconds["one_buffer"] += t1 - t0
        self.copies["one_buffer"] += moved.h2d_copies - batch.h2d_copies
        self.bytes["one_buffer"] += moved.h2d_bytes - batch.h2d_bytes
        del per_field
        return moved

    def report(self, batches: int) -> dict[str, Any]:
        out: dict[str, Any] = {"timing": f"measured on {self.device}" if self.timed else NO_ACCELERATOR}
        for path in ("one_buffer", "per_field"):
            out[path] = {"copies_per_batch": self.copies[path] / batches,
                         "bytes_per_batch": self.bytes[path] / batches,
                         "seconds_per_batch": self.seconds[path] / batches if self.timed else None}
        return out


class _Tally:
    """What the measured batches held: samples, real tokens, slots, padding, and per folder real tokens."""

    def __init__(self, folders: int):
        self.samples = self.real = self.slots = 0
        self.pads: list[float] = []
        self.folder_tokens = np.zeros(folders)  # [F] real tokens of the measured batches per folder
        self.single = 0  # measured batches that hold one folder only

    def add(self, batch: Batch, size: BatchSize) -> None:
        self.samples += batch.batch_size
        self.real += batch.real_tokens
        self.slots += batch.num_slots
        self.pads.append(padding_fraction(batch, size))
        folders = batch.numpy("sample_folder")
        self.folder_tokens += np.bincount(folders, batch.numpy("seqlens"), len(self.folder_tokens))
        self.single += int(folders.min() == folders.max())


def _synced_seconds(device: str, work: Callable[[], Any]) -> float:
    """Wall seconds of `work()`, waiting for the device to finish it on CUDA."""
    t0 = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _warm_up(cfg: ProfileConfig, stream: Any) -> list[float]:
    """Draws `cfg.warmup` batches; returns the model's step times on them (the first one compiles,
    with --compile), empty without a `step_fn`."""
    warm: list[float] = []
    for _ in range(cfg.warmup):
        batch = next(stream)
        if cfg.step_fn is not None:
            warm.append(_synced_seconds(cfg.device, lambda: cfg.step_fn(batch.to(cfg.device))))
    return warm


def _measure(cfg: ProfileConfig, stream: Any, size: BatchSize, h2d: _H2D, tally: _Tally) -> dict[str, float]:
    """Draws, moves and (with a `step_fn`) steps on `cfg.steps` batches; returns the seconds of the
    pipeline (`seconds`: without the per-field copy comparison and the slot-field derivation), of
    waiting for data, of the model steps, and of deriving the slot-level fields."""
    wait = step = compare = derive = 0.0
    start = time.perf_counter()
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        batch = next(stream)
        wait += time.perf_counter() - t0
        tally.add(batch, size)
        per_field_before = h2d.seconds["per_field"]
        moved = h2d.move(batch)
        compare += h2d.seconds["per_field"] - per_field_before  # not part of the pipeline
        # computes (and caches) every slot-level field on the device
        derive += _synced_seconds(cfg.device, lambda: moved["slot_stream"])
        if cfg.step_fn is not None:
            step += _synced_seconds(cfg.device, lambda: cfg.step_fn(moved))
    seconds = time.perf_counter() - start - compare - derive
    return {"seconds": seconds, "wait": wait, "step": step, "derive": derive}


def profile_strategy(cfg: ProfileConfig, strategy: str, size: BatchSize,
                     verify: bool = True) -> dict[str, Any]:
    """Measures one strategy (see the module docstring); JSON-ready."""
    gc.collect()
    rss_before = _rss_mb()
    loader = Loader(_loader_config(cfg, strategy, verify))
    stream = loader.forever()
    h2d = _H2D(cfg.device)
    names = [f.name for f in loader.index.folders]
    tally = _Tally(len(names))
    warnings = loader.warnings()
    graphs_before = _graphs()
    try:
        warm = _warm_up(cfg, stream)
        took = _measure(cfg, stream, size, h2d, tally)
    finally:
        stream.close()
        loader.close()  # ends worker threads/processes now rather than at exit
        del loader, stream
        gc.collect()
    seconds, t = took["seconds"], tally
    result: dict[str, Any] = {
        "layout": STRATEGIES.get(strategy).layout,
        "batches": cfg.steps, "samples": t.samples, "real_tokens": t.real, "token_slots": t.slots,
        "seconds": seconds, "data_wait_seconds": took["wait"],
        "samples_per_s": t.samples / seconds, "real_tokens_per_s": t.real / seconds,
        "batches_per_s": cfg.steps / seconds, "mean_batch_samples": t.samples / cfg.steps,
        "padding_fraction": float(np.mean(t.pads)),
        "padding_fraction_max": float(np.max(t.pads)),
        "h2d": h2d.report(cfg.steps),
        "slot_fields_seconds_per_batch": took["derive"] / cfg.steps,
        "rss_mb": {"before": rss_before, "after": (now := _rss_mb()),
                   # Linux updates ru_maxrss lazily: it can trail the current RSS by a few pages
                   "peak_so_far": max(_peak_rss_mb(), now)},
        "step": None,
        "token_share": {n: float(x / t.folder_tokens.sum()) for n, x in zip(names, t.folder_tokens)},
        "single_source_fraction": t.single / cfg.steps,
        "warnings": warnings,
    }
    if cfg.step_fn is not None:
        result["step"] = {"real_tokens_per_s": t.real / seconds, "step_seconds": took["step"],
                          "data_wait_fraction": took["wait"] / seconds,
                          "first_step_seconds": warm[0] if warm else None,
                          "compile_graphs": _graphs() - graphs_before if cfg.compile else None}
    return result


def _graphs() -> int:
    """Graphs `mmtool.models.compile` has compiled in this process so far."""
    from mmtool.models.compile import stats

    return stats().graphs


def step_objectives(streams: list) -> dict[str, float]:
    """The default training objectives that these streams can feed (e.g. masked-patch alone for an
    embedding folder, which has no ids to predict): profiling times a step, it needs no recipe.

    Raises:
        MMToolError: none of them can (the first one's error says what it needs).
    """
    from mmtool.models.builders import feedable_objectives
    from mmtool.models.model import ModelConfig

    return feedable_objectives(ModelConfig().objectives, streams)[0]


def model_step(cfg: ProfileConfig, size: str) -> Callable[[Batch], None]:
    """A training step (forward, backward, AdamW) of a `size` model built for `cfg`'s data."""
    from mmtool.data.index import TokenIndex
    from mmtool.data.mixture import parse_data_specs
    from mmtool.models.model import ModelConfig, build_model

    streams = TokenIndex([s.path for s in parse_data_specs(cfg.data)], verify=False).streams
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(size=size, objectives=step_objectives(streams)), streams).to(cfg.device)
    if cfg.compile:
        from mmtool.models.compile import compile_model

        compile_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(cfg.seed)

    def step(batch: Batch) -> None:
        model(batch, generator=generator).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.__qualname__ = f"model_step[{size}{', compiled' if cfg.compile else ''}]"
    return step


def profile_strategies(cfg: ProfileConfig) -> dict[str, Any]:
    """Profiles each strategy of `cfg` on the same data and seed; returns a JSON-ready dict.

    Keys: `config` (the flags), `machine` (versions, CPUs, accelerator), `data` (folders and
    samples), `strategies` (name → measurements, in the order given).

    Raises:
        MMToolError: bad flags (`validate`) or bad data (`Loader`), before anything is measured.
    """
    size = validate(cfg)
    # Open the data once up front: every bad-input error surfaces before the first measurement,
    # and shards are checked against their manifests once rather than once per strategy.
    probe = Loader(_loader_config(cfg, cfg.strategies[0], verify=True))
    data = {"folders": [{"path": str(f.path), "samples": f.n} for f in probe.index.folders],
            "samples": len(probe.index), "samples_per_epoch": probe.mixture.samples_per_epoch,
            "longest_sample_tokens": int(probe.index.lengths.max())}
    mixture = mixture_shares(probe)
    for name in cfg.strategies[1:]:  # a too-small budget or bad worker flag fails here, not later
        Loader(_loader_config(cfg, name, verify=False))
    del probe
    config = {k: v for k, v in asdict(cfg).items() if k != "step_fn"}
    config["step_fn"] = getattr(cfg.step_fn, "__qualname__", repr(cfg.step_fn)) if cfg.step_fn else None
    results = {name: profile_strategy(cfg, name, size, verify=False) for name in cfg.strategies}
    return {"config": config, "machine": machine_info(cfg.device), "data": data,
            "mixture": mixture, "strategies": results}


def mixture_shares(loader: Loader) -> dict[str, Any]:
    """Requested shares against those one epoch of the loader's mixture realises; JSON-ready.

    Keys: `mix_by` (what `requested` is a share of), `splits`, `samples_per_epoch`, and per folder
    (`folders`, in order): `requested`, `tokens` and `samples` (realised shares of the epoch's
    tokens and draws).
    """
    order = loader.order(0)  # [L]
    n = len(loader.index.folders)
    folders = loader.index.sample_folder[order]  # [L]
    tokens = np.bincount(folders, loader.index.lengths[order], n)  # [F]
    samples = np.bincount(folders, minlength=n)  # [F]
    return {"mix_by": loader.mixture.mix_by, "splits": list(loader.cfg.splits),
            "samples_per_epoch": loader.mixture.samples_per_epoch,
            "folders": {f.name: {"requested": float(p), "tokens": float(t / tokens.sum()),
                                 "samples": float(c / samples.sum())}
                        for f, p, t, c in zip(loader.index.folders, loader.mixture.probabilities,
                                              tokens, samples)}}


def check_plot_path(path: str | Path) -> None:
    """Refuses a plot path whose format matplotlib is not asked to write, or when it is missing."""
    if Path(path).suffix.lower() not in PLOT_FORMATS:
        raise MMToolError(f"--plot {path}: expected a file ending in {', '.join(PLOT_FORMATS)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MMToolError("--plot needs matplotlib: pip install matplotlib") from None


def plot_profile(result: dict[str, Any], path: str | Path) -> None:
    """Bar charts comparing the strategies: samples/s, real tokens/s, padding (and step, if any).

    The measured version of the "speed by data-handling method" figure. Written atomically, as a
    `Figure` object (no display, no global backend switch).
    """
    check_plot_path(path)
    from matplotlib.ticker import FuncFormatter

    from mmtool.plotting import colors, save_figure, subplots

    names = list(result["strategies"])
    rows = [result["strategies"][n] for n in names]
    panels = [("samples / s", [r["samples_per_s"] for r in rows], "{:,.0f}"),
              ("real tokens / s", [r["real_tokens_per_s"] for r in rows], "{:,.0f}"),
              ("padding %", [100 * r["padding_fraction"] for r in rows], "{:.1f}%")]
    if all(r["step"] for r in rows):
        panels += [("step real tokens / s", [r["step"]["real_tokens_per_s"] for r in rows], "{:,.0f}"),
                   ("data wait % of step", [100 * r["step"]["data_wait_fraction"] for r in rows], "{:.1f}%")]
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, values, fmt) in zip(axes[0], panels):
        bars = ax.bar(range(len(names)), values, color=colors(len(names)))
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8, padding=2)
        ax.margins(y=0.15)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.spines[["top", "right"]].set_visible(False)
    cfg, machine = result["config"], result["machine"]
    size = (f"{cfg['batch_tokens']:,} tokens/batch" if cfg["batch_tokens"] else
            f"{cfg['batch_samples']} samples/batch")
    fig.suptitle(f"speed by batching strategy — {len(result['data']['folders'])} folders, {size}, "
                 f"{cfg['steps']} batches each, {cfg['num_workers']} {cfg['worker_type']} workers · "
                 f"torch {machine['torch']}, {machine['cpu_count']} CPUs"
                 + (f", {machine['accelerator']}" if machine["accelerator"] else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
