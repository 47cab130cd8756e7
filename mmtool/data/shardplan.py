"""The shard plan: an epoch's order from per-shard counts alone, O(shards) in memory and state.

The per-sample plan (`Mixture.epoch`) materialises a permutation of every draw of an epoch: 8 bytes
per sample, 8 GB at 10^9 samples, and a resume that must rebuild it. The shard plan keeps only a
few numbers per shard and builds the order one *block* at a time, as Mosaic streaming and LitData
do with their shard-window shuffles:

* each folder walks laps through its rows (lap ℓ of folder f: a permutation of f's shards seeded
  by `(seed, f, ℓ)`), cut into *windows* of `window` consecutive shards of that permutation; a
  window's rows are shuffled together (seeded by `(seed, f, ℓ, w)`). A lap visits every row of
  the folder exactly once, so with the natural shares an epoch is exactly one lap of every folder;
* folder f draws `k_f` rows per epoch (`Mixture.counts()`: the same largest-remainder rounding as
  the per-sample plan), draw d of the folder being position `d mod n_f` of lap `d // n_f` —
  weighted epochs continue the walk across epochs, as the per-sample plan does;
* an epoch is `blocks` blocks; block b takes draws `[⌊b·k_f/B⌋, ⌊(b+1)·k_f/B⌋)` of the epoch from
  every folder f, so each block holds the mixture's shares to within one draw per folder, and
  interleaves them at random positions (seeded by `(seed, epoch, b)`) keeping each folder's draws
  in walk order.

Planning is a pure function of `(seed, epoch, block)` and the per-shard counts: any rank or worker
computes any block without talking to the others or opening a shard. A position in the order is
`(epoch, block, offset)`, three integers, whatever the data's size. The plan works on *member
ordinals* (0..M-1, folder-major, then shard, then row), as `Mixture` does; the loader maps them to
global sample numbers.

The price of the shard plan: a row can only meet rows of its own window (and the blocks around
it) in a batch, and two rows of one shard are never more than about `window` shards' worth of
draws apart in the order. Larger windows shuffle better and cost more memory per block.
"""

from __future__ import annotations

import numpy as np

from mmtool.data.mixture import Mixture
from mmtool.errors import MMToolError

WINDOW = 8
"""Shards whose rows are shuffled together (`--shard-window`)."""
_LAP, _WIN = 0x1A9, 0x3E1  # seed tags, so the plan's streams differ from `Mixture`'s


def shard_rows(manifests: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(rows per shard int64 [S], folder of each shard int64 [S]) from the folders' manifests, in
    `TokenIndex`'s order (folder, then shard): what the plan needs, without opening a shard."""
    rows = [np.fromiter((s["rows"] for s in m["shards"]), np.int64, len(m["shards"])) for m in manifests]
    folder = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), folder


class ShardPlan:
    """Deterministic blocks of an epoch's draws, from the number of rows in each shard.

    Args:
        shard_sizes: int64 [S] rows (members) per shard, folder-major; a shard may be empty.
        shard_folder: int64 [S] folder of each shard (non-decreasing).
        mixture: the draws per folder and epoch (`Mixture.counts()`) and the seed; its `sizes` must
            be the per-folder sums of `shard_sizes`.
        window: shards per shuffle window (≥ 1).

    Attributes:
        blocks: blocks per epoch.
        block_draws: about how many draws a block holds (`window` shards' worth of rows).
    """

    def __init__(self, shard_sizes: np.ndarray, shard_folder: np.ndarray, mixture: Mixture,
                 window: int = WINDOW):
        if window < 1:
            raise MMToolError(f"--shard-window {window}: must be ≥ 1")
        self.sizes = np.asarray(shard_sizes, np.int64)  # [S]
        self.folder = np.asarray(shard_folder, np.int64)  # [S]
        n_folders = len(mixture.sizes)
        per_folder = np.bincount(self.folder, self.sizes, n_folders).astype(np.int64)  # [F]
        if not np.array_equal(per_folder, mixture.sizes):
            raise MMToolError(f"shard sizes sum to {per_folder.tolist()} rows per folder, but the "
                              f"mixture has {mixture.sizes.tolist()}")
        self.mixture, self.window, self.seed = mixture, int(window), mixture.seed
        self.counts = mixture.counts()  # [F] draws per epoch
        self.first_shard = np.searchsorted(self.folder, np.arange(n_folders + 1))  # [F+1]
        self.first_row = np.concatenate([[0], np.cumsum(self.sizes)])  # [S+1] member ordinals
        total = int(self.counts.sum())
        self.block_draws = max(1, int(round(window * self.sizes.sum() / max(len(self.sizes), 1))))
        self.blocks = max(1, -(-total // self.block_draws))  # ceil
        self._laps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (f, lap) → lap
        self._windows: dict[int, tuple[tuple[int, int], np.ndarray]] = {}  # f → its last window

    def __len__(self) -> int:
        """Draws per epoch."""
        return int(self.counts.sum())

    # -- one folder's walk -----------------------------------------------------------------------
    def _lap(self, f: int, lap: int) -> tuple[np.ndarray, np.ndarray]:
        """(shards of folder f in lap order: int64 [S_f] global shard numbers, int64 [W_f+1] the
        cumulative rows at each window's start); the two latest laps of each folder are kept."""
        if (f, lap) not in self._laps:
            for key in [k for k in self._laps if k[0] == f and k[1] < lap - 1]:
                del self._laps[key]
            self._laps[f, lap] = self._lap_uncached(f, lap)
        return self._laps[f, lap]

    def _lap_uncached(self, f: int, lap: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.first_shard[f]), int(self.first_shard[f + 1])
        order = lo + np.random.default_rng([self.seed, f, lap, _LAP]).permutation(hi - lo)  # [S_f]
        rows = np.concatenate([[0], np.cumsum(self.sizes[order])])  # [S_f+1]
        return order, rows[::self.window] if (hi - lo) % self.window == 0 else \
            np.concatenate([rows[::self.window], rows[-1:]])

    def _window(self, f: int, lap: int, w: int) -> np.ndarray:
        """Member ordinals of window w of folder f's lap, shuffled (int64 [rows of the window])."""
        last = self._windows.get(f)
        if last is not None and last[0] == (lap, w):
            return last[1]
        order, _ = self._lap(f, lap)
        shards = order[w * self.window:(w + 1) * self.window]  # [≤ window]
        starts, counts = self.first_row[shards], self.sizes[shards]
        rows = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) \
            + np.arange(int(counts.sum()))  # [rows] the shards' ordinals, shard by shard
        rows = rows[np.random.default_rng([self.seed, f, lap, w, _WIN]).permutation(len(rows))]
        self._windows[f] = ((lap, w), rows)
        return rows

    def draws(self, f: int, start: int, stop: int) -> np.ndarray:
        """Member ordinals of folder f's draws `start..stop-1` of its endless walk (int64 [stop-start])."""
        n = int(self.mixture.sizes[f])
        parts = []
        d = start
        while d < stop:
            lap, pos = divmod(d, n)
            _, bounds = self._lap(f, lap)
            w = int(np.searchsorted(bounds, pos, side="right")) - 1
            rows = self._window(f, lap, w)
            take = min(stop - d, int(bounds[w + 1]) - pos)
            parts.append(rows[pos - int(bounds[w]):pos - int(bounds[w]) + take])
            d += take
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # -- an epoch, block by block ----------------------------------------------------------------
    def block(self, epoch: int, b: int) -> np.ndarray:
        """Member ordinals of block b of `epoch`, in visiting order (int64 [≈ block_draws])."""
        if not 0 <= b < self.blocks:
            raise MMToolError(f"block {b} is outside the epoch's {self.blocks} blocks")
        parts = []
        for f, k in enumerate(self.counts.tolist()):
            lo, hi = b * k // self.blocks, (b + 1) * k // self.blocks  # this block's draws of f
            parts.append(self.draws(f, epoch * k + lo, epoch * k + hi))
        counts = [len(p) for p in parts]
        rng = np.random.default_rng([self.seed, epoch, b, _WIN])
        which = np.repeat(np.arange(len(parts)), counts)[rng.permutation(sum(counts))]  # [B]
        out = np.empty(len(which), np.int64)
        out[np.argsort(which, kind="stable")] = np.concatenate(parts)  # each folder in walk order
        return out

    def epoch(self, epoch: int) -> np.ndarray:
        """The whole epoch's order (int64 [draws]): O(samples), for tests and small data."""
        return np.concatenate([self.block(epoch, b) for b in range(self.blocks)])

    def nbytes(self) -> int:
        """Bytes the plan holds between blocks: its per-shard arrays, the cached lap orders (one
        or two per folder) and each folder's last shuffled window."""
        arrays = [self.sizes, self.folder, self.first_shard, self.first_row]
        arrays += [a for lap in self._laps.values() for a in lap]
        arrays += [rows for _, rows in self._windows.values()]
        return sum(a.nbytes for a in arrays)
