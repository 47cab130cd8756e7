"""The loader: mixture order → planned batches → this rank's share → workers → `Batch` buffers.

Work is split at the level of planned batches, which makes every split exact: the epoch's batch
list is computed identically everywhere; rank r takes batches r, r+W, r+2W, ... (W = world size),
and within a rank, worker w takes every `num_workers`-th of the rank's remaining batches. The
PyTorch DataLoader returns worker results round-robin, so the rank sees its batches in plan order
whatever the number of workers. Resuming is a position: (epoch, batches done in it).

With `--plan shards` (`mmtool.data.shardplan`, and `auto` above `PLAN_AUTO_ROWS` rows) the epoch is
planned one block at a time: a block's batches are dealt to ranks round-robin as above, and the
position is (epoch, block, this rank's batches done in the block): resuming plans one block, not
the epoch, and the state is the same few numbers at 10^3 rows or 10^9.

Only rows whose `split` is in `LoaderConfig.splits` are drawn (default: train); the index still
numbers every row, so sample numbers mean the same whatever the splits.

Ranks can differ by one batch at an epoch's end (no sample is dropped or repeated to even them
out; with the shard plan, by up to one batch per block); a distributed trainer stops each epoch at
the smallest count or uses `Join`.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtool.data.batch import Batch
from mmtool.data.batching import STRATEGIES, BatchSize, assemble, check_budget, plan_warnings
from mmtool.data.index import TokenIndex
from mmtool.data.mixture import Mixture, parse_data_specs, resolve_mix_by, take_fractions
from mmtool.data.remote import DEFAULT_CACHE_DIR, ShardCache, redact
from mmtool.data.schema import SPLITS
from mmtool.data.shardplan import WINDOW, ShardPlan
from mmtool.data.shards import parse_size
from mmtool.errors import MMToolError


@dataclass
class LoaderConfig:
    """How to read a mixture of preprocessed folders into batches."""

    data: list[str]
    """`DIR[=WEIGHT]` entries or a mixture YAML file (`--data`)."""
    strategy: str = "packed"
    """Batching strategy (`mmtool ls strategies`)."""
    batch_tokens: int | None = None
    """Token budget per batch (`--batch-tokens`)."""
    batch_samples: int | None = None
    """Fixed samples per batch (`--batch-samples`), to compare strategies on identical content."""
    temperature: float | None = None
    """Size-based mixture temperature: p ∝ weight · n^(1/T)."""
    mix_by: str | None = None
    """What a weight is a share of: "tokens" or "samples" (`--mix-by`); None: the mixture YAML's
    `mix_by`, else "tokens". See `mmtool.data.mixture`."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    """Read only rows whose `split` column is one of these (`--splits`): train, validation, test.
    The default keeps validation and test rows out of pretraining, for evaluation."""
    seed: int = 0
    samples_per_epoch: int | None = None
    """Draws per epoch (default: every sample once)."""
    num_workers: int = 0
    """Loader workers (0: assemble in the calling process, on demand)."""
    worker_type: str = "thread"
    """"thread": assemble in threads (numpy releases the GIL; buffers stay in this process's warm
    memory, no inter-process copy); "process": PyTorch DataLoader worker processes."""
    prefetch: int = 4
    """Batches each worker prepares ahead."""
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False
    """Page-lock batch buffers (set when training on CUDA)."""
    verify: bool = True
    """Check shard sha256 against the manifests before reading."""
    cache_dir: str | None = None
    """Local folder remote shards are cached in (`--cache-dir`; None: ~/.cache/mmtool/shards)."""
    cache_limit: str = "20GB"
    """Bytes of remote shards kept in `cache_dir` (`--cache-limit`), least recently used out."""
    prefetch_batches: int = 8
    """Batches ahead whose remote shards a background thread fetches."""
    plan: str = "auto"
    """How an epoch's order is planned (`--plan`): "samples" (one permutation of every draw, O(samples)
    memory and resume time), "shards" (a shard-window shuffle built block by block from per-shard row
    counts, O(shards); `mmtool.data.shardplan`), or "auto" (shards above `PLAN_AUTO_ROWS` rows)."""
    shard_window: int = WINDOW
    """With the shard plan: shards whose rows are shuffled together (`--shard-window`)."""


PLANS = ("samples", "shards", "auto")
WARN_DRAWS = 100_000
"""With the shard plan, `Loader.warnings` judges this many draws of the epoch (its first blocks)."""
PLAN_AUTO_ROWS = 10_000_000
"""`--plan auto` plans by shards above this many rows (a per-sample epoch then costs ≥ 80 MB)."""


class _BatchStream(IterableDataset):
    """Yields planned batches from a position onwards, epoch after epoch, assembled.

    With W worker processes, worker w assembles the batches at stream positions w, w+W, ...; the
    DataLoader's round-robin then restores plan order. Workers plan epochs themselves (cheap), so
    they persist across epoch boundaries.
    """

    def __init__(self, loader: "Loader", epoch: int, block: int, batch: int):
        self.loader, self.epoch, self.block, self.batch = loader, epoch, block, batch

    def plans(self, worker: int = 0, workers: int = 1) -> Iterator[np.ndarray]:
        position = 0
        for samples in self.loader.batches_from(self.epoch, self.block, self.batch):
            if position % workers == worker:
                yield samples
            position += 1

    def ahead(self, plans: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """`plans` unchanged, but each batch's remote shards are queued for prefetching
        `prefetch_batches` batches before it is yielded (local folders: `plans` itself)."""
        index, depth = self.loader.index, self.loader.cfg.prefetch_batches
        if index.cache is None or depth <= 0:
            yield from plans
            return
        window: deque = deque()
        for samples in plans:  # endless: the window never needs draining
            index.prefetch(samples)
            window.append(samples)
            if len(window) > depth:
                yield window.popleft()

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        index, layout = self.loader.index, self.loader.strategy.layout
        for samples in self.ahead(self.plans(*((info.id, info.num_workers) if info else (0, 1)))):
            with index.using(samples):
                batch = assemble(index, samples, layout)
            yield batch

    def threaded(self, threads: int, prefetch: int, pin: bool) -> Iterator[Batch]:
        """Assembles ahead in `threads` threads (numpy releases the GIL), yielding in plan order."""
        index, layout = self.loader.index, self.loader.strategy.layout

        def build(samples: np.ndarray) -> Batch:
            with index.using(samples):
                batch = assemble(index, samples, layout)
            return batch.pin_memory() if pin else batch

        with ThreadPoolExecutor(threads, thread_name_prefix="mmtool-loader") as pool:
            pending: deque = deque()
            for samples in self.ahead(self.plans()):
                pending.append(pool.submit(build, samples))
                if len(pending) >= threads * prefetch:
                    yield pending.popleft().result()


@dataclass
class Drawn:
    """Samples and real tokens drawn so far, per folder."""

    samples: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class Loader:
    """Deterministic, resumable batches from a weighted mixture of folders.

    Iterating yields the rest of the current epoch; `forever()` never stops. Worker processes
    (if any) live as long as the loader and prefetch across epoch boundaries. `state_dict()` taken after any batch, restored into a fresh loader, continues with
    exactly the batches the first loader would have yielded next.

    Raises:
        MMToolError: bad folders (missing, corrupt, newer schema, incompatible tokenizers), a weight
            ≤ 0, an unknown strategy, or a token budget below the longest sample.
    """

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        specs = parse_data_specs(cfg.data)
        if not specs:
            raise MMToolError("no data folders given (--data DIR[=WEIGHT])")
        self.index = TokenIndex([s.path for s in specs], verify=cfg.verify, cache=self._cache)
        members = self._members(cfg.splits)  # [M] global numbers of the rows in `splits`
        self.members = take_fractions(members, self.index.sample_folder[members],
                                      [s.fraction for s in specs], cfg.seed)  # [M'] `fraction=` subsets
        folder = self.index.sample_folder[self.members]  # [M']
        n = len(self.index.folders)
        sizes = np.bincount(folder, minlength=n)  # [F] rows in `splits` per folder
        tokens = np.bincount(folder, self.index.lengths[self.members], minlength=n).astype(np.int64)
        weights = None if all(s.weight is None for s in specs) else [s.weight for s in specs]
        self.mixture = Mixture(sizes.tolist(), weights, cfg.temperature, cfg.seed,
                               cfg.samples_per_epoch, resolve_mix_by(cfg.mix_by, cfg.data),
                               tokens.tolist())
        self.strategy = STRATEGIES.get(cfg.strategy)
        self.size = BatchSize(cfg.batch_tokens, cfg.batch_samples)
        check_budget(self.index, self.members, self.size)
        if cfg.worker_type not in ("thread", "process"):
            raise MMToolError(f"--worker-type {cfg.worker_type!r}: expected thread or process")
        if cfg.num_workers < 0:
            raise MMToolError(f"--num-workers {cfg.num_workers}: must be ≥ 0")
        if not 0 <= cfg.rank < cfg.world_size:
            raise MMToolError(f"rank {cfg.rank} is outside world size {cfg.world_size}")
        self.epoch = 0
        self.batch = 0  # batches of this rank already yielded in `epoch`
        self.block, self.block_batch = 0, 0  # shard plan: block of `epoch`, this rank's batches in it
        n = len(self.index.folders)
        self.drawn = Drawn([0] * n, [0] * n)
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        self._block_cache: dict[tuple[int, int], list[np.ndarray]] = {}
        self.shard_plan = self._shard_plan() if self._plan_kind() == "shards" else None
        self._stream: Iterator[Batch] | None = None  # open worker stream at (epoch, batch)

    def _cache(self) -> ShardCache:
        """The shard cache of `--cache-dir`/`--cache-limit` (made only when a folder is remote)."""
        return ShardCache(self.cfg.cache_dir or DEFAULT_CACHE_DIR,
                          parse_size(self.cfg.cache_limit, "--cache-limit"))

    def _members(self, splits: list[str]) -> np.ndarray:
        """Global numbers of the rows whose split is in `splits`; refuses a folder with none."""
        mask = self.index.split_mask(list(splits))  # [N]
        for f, folder in enumerate(self.index.folders):
            if not mask[self.index.folder_start[f]:self.index.folder_start[f + 1]].any():
                have = sorted({SPLITS[c] if c >= 0 else "other" for c in np.unique(
                    self.index.split[self.index.sample_folder == f]).tolist()})
                raise MMToolError(f"{folder.path} has no row in splits {','.join(splits)} (it has "
                                  f"{', '.join(have)}); choose others with --splits, e.g. "
                                  f"--splits {','.join(have)}")
        return np.flatnonzero(mask).astype(np.int64)

    def _plan_kind(self) -> str:
        """"samples" or "shards": `--plan`, with "auto" resolved by the number of rows."""
        if self.cfg.plan not in PLANS:
            raise MMToolError(f"--plan {self.cfg.plan!r}: expected {', '.join(PLANS)}")
        if self.cfg.plan == "auto":
            return "shards" if len(self.members) > PLAN_AUTO_ROWS else "samples"
        return self.cfg.plan

    def _shard_plan(self) -> ShardPlan:
        """The shard plan over the rows in `members`, counted per shard (O(shards) numbers)."""
        shard = np.searchsorted(self.index.shard_start, self.members, side="right") - 1  # [M']
        sizes = np.bincount(shard, minlength=len(self.index.shards))  # [S]
        folder = np.repeat(np.arange(len(self.index.folders)),
                           [len(f.shards) for f in self.index.folders])  # [S]
        return ShardPlan(sizes, folder, self.mixture, self.cfg.shard_window)

    # -- planning --------------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """Global sample numbers of `epoch` in mixture order (only rows of `splits`)."""
        plan = self.shard_plan or self.mixture
        return self.members[plan.epoch(epoch)]

    def plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches (arrays of global sample numbers) for `epoch`, in order. With the
        shard plan this plans every block (O(samples)); iterating plans one block at a time."""
        if self.shard_plan is not None:
            return [b for k in range(self.shard_plan.blocks) for b in self.block_plan(epoch, k)]
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            everything = self.strategy.plan(self.index, self.order(epoch), self.size)
            self._plan_cache = (epoch, everything[self.cfg.rank::self.cfg.world_size])
        return self._plan_cache[1]

    def block_plan(self, epoch: int, block: int) -> list[np.ndarray]:
        """Shard plan: this rank's batches of one block. A block's batches are planned together
        and dealt to ranks round-robin from rank `block mod W` (so no rank is always first)."""
        key = (epoch, block)
        if key not in self._block_cache:
            order = self.members[self.shard_plan.block(epoch, block)]
            everything = self.strategy.plan(self.index, order, self.size)
            world = self.cfg.world_size
            if len(self._block_cache) >= 4:
                del self._block_cache[next(iter(self._block_cache))]
            self._block_cache[key] = everything[(self.cfg.rank - block) % world::world]
        return self._block_cache[key]

    def batches_from(self, epoch: int, block: int, batch: int) -> Iterator[np.ndarray]:
        """This rank's planned batches from a position on, epoch after epoch, without end."""
        while True:
            if self.shard_plan is None:
                yield from self.plan(epoch)[batch:]
            else:
                for k in range(block, self.shard_plan.blocks):
                    yield from self.block_plan(epoch, k)[batch:]
                    batch = 0
            epoch, block, batch = epoch + 1, 0, 0

    def _settle(self) -> None:
        """Moves the position past an ended epoch (shard plan: past ended blocks, and past blocks
        that deal this rank no batch)."""
        if self.shard_plan is None:
            if self.batch == len(self.plan(self.epoch)):
                self.epoch, self.batch = self.epoch + 1, 0
            return
        for _ in range(self.shard_plan.blocks + 1):
            if self.block_batch < len(self.block_plan(self.epoch, self.block)):
                return
            self.block, self.block_batch = self.block + 1, 0
            if self.block == self.shard_plan.blocks:
                self.epoch, self.block, self.batch = self.epoch + 1, 0, 0
        raise MMToolError(f"rank {self.cfg.rank} of {self.cfg.world_size} gets no batch in a whole "
                          "epoch; use fewer ranks or smaller batches")

    def warnings(self) -> list[str]:
        """Lines saying where the current epoch's batches stray from the mixture (`plan_warnings`);
        with the shard plan, judged on the epoch's first blocks (`WARN_DRAWS` draws or all)."""
        if self.shard_plan is not None:
            plan = self.shard_plan
            blocks = range(min(plan.blocks, -(-WARN_DRAWS // plan.block_draws)))
            order = self.members[np.concatenate([plan.block(self.epoch, b) for b in blocks])]
            batches = [x for b in blocks for x in self.block_plan(self.epoch, b)]
            return plan_warnings(self.index, order, batches, self.size, self.cfg.strategy)
        return plan_warnings(self.index, self.order(self.epoch), self.plan(self.epoch), self.size,
                             self.cfg.strategy)

    def __len__(self) -> int:
        """Batches of this rank in the current epoch."""
        return len(self.plan(self.epoch))

    # -- iteration -------------------------------------------------------------------------------
    def _open_stream(self) -> Iterator[Batch]:
        if self.shard_plan is not None:
            self._settle()
        block_batch = self.batch if self.shard_plan is None else self.block_batch
        dataset = _BatchStream(self, self.epoch, self.block, block_batch)
        if self.cfg.num_workers == 0:  # pin here too, or the "non-blocking" H2D copy is synchronous
            return (b.pin_memory() for b in dataset) if self.cfg.pin_memory else iter(dataset)
        if self.cfg.worker_type == "thread":
            return dataset.threaded(self.cfg.num_workers, self.cfg.prefetch, self.cfg.pin_memory)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch, pin_memory=self.cfg.pin_memory))

    def forever(self) -> Iterator[Batch]:
        """Batches epoch after epoch, without end."""
        while True:
            if self._stream is None:
                self._stream = self._open_stream()
            batch = next(self._stream)
            folders = batch["sample_folder"].numpy()
            n = len(self.drawn.samples)
            self.drawn.samples = (np.asarray(self.drawn.samples) + np.bincount(folders, minlength=n)).tolist()
            self.drawn.tokens = (np.asarray(self.drawn.tokens) + np.bincount(
                folders, batch["seqlens"].numpy(), minlength=n).astype(np.int64)).tolist()
            self.batch += 1
            self.block_batch += 1
            self._settle()
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch."""
        epoch = self.epoch
        for batch in self.forever():
            yield batch
            if self.epoch != epoch:
                return

    def close(self) -> None:
        """Stops worker threads or processes (also on `with Loader(...) as loader:` exit)."""
        stream, self._stream = self._stream, None
        if hasattr(stream, "_shutdown_workers"):  # a DataLoader iterator
            stream._shutdown_workers()
        elif hasattr(stream, "close"):  # the thread generator: closing it shuts its pool
            stream.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- resuming --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loader's position and counters (JSON-ready)."""
        shards = {} if self.shard_plan is None else {
            "block": self.block, "block_batch": self.block_batch, "shard_window": self.cfg.shard_window}
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.cfg.seed,
                "strategy": self.cfg.strategy, "mix_by": self.mixture.mix_by,
                "splits": list(self.cfg.splits), "rank": self.cfg.rank,
                "world_size": self.cfg.world_size, "drawn_samples": list(self.drawn.samples),
                "drawn_tokens": list(self.drawn.tokens),
                "plan": "samples" if self.shard_plan is None else "shards", **shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a `state_dict()`; refuses one from another seed, strategy, world size or
        plan (a state without `plan` is the per-sample plan's)."""
        state = {"plan": "samples", **state}
        mine = self.state_dict()
        for key in ("seed", "strategy", "world_size", "mix_by", "splits", "plan", "shard_window"):
            if key in state and key in mine and state[key] != mine[key]:
                raise MMToolError(f"loader state was saved with {key}={state[key]!r}, "
                                  f"but this run has {key}={mine[key]!r}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.block, self.block_batch = int(state.get("block", 0)), int(state.get("block_batch", 0))
        self.close()  # batches prefetched from the old position are dropped
        self.drawn = Drawn(list(state["drawn_samples"]), list(state["drawn_tokens"]))

    def drawn_by_folder(self) -> dict[str, dict[str, int]]:
        """Samples and tokens drawn so far, by folder name."""
        return {redact(str(f.path)): {"samples": s, "tokens": t}
                for f, s, t in zip(self.index.folders, self.drawn.samples, self.drawn.tokens)}
