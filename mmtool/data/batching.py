"""Batching strategies: which samples go together, and how their tokens are laid out.

A strategy has two halves:

* a *planner* cuts an epoch's sample order into batches (arrays of sample numbers). Planning
  touches only sample lengths and signatures, so every rank and worker can plan the whole epoch
  cheaply and then assemble only its own batches;
* `assemble` turns one planned batch into a `Batch` buffer with a few vectorized numpy gathers —
  no Python loop over samples or tokens.

Registered strategies (`mmtool ls strategies`): `per-sample`, `by-modality`, `by-modality-sorted`,
`padded`, `packed`, `embeddings`.
The padding fraction of a batch is the share of its token capacity that holds no real token:
capacity is B·L for padded layouts and the token budget for `packed` with `--batch-tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from mmtool.data.batch import Batch, BufferBuilder
from mmtool.data.index import SEPARATOR, TokenIndex
from mmtool.errors import MMToolError
from mmtool.registry import Registry


@dataclass
class BatchSize:
    """How big a batch is: a token budget, or a fixed number of samples (exactly one is set)."""

    tokens: int | None = None
    samples: int | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.samples is None):
            raise MMToolError("give exactly one of --batch-tokens and --batch-samples")
        if min(n for n in (self.tokens, self.samples) if n is not None) < 1:  # 0 included
            raise MMToolError("--batch-tokens and --batch-samples must be positive")


@dataclass
class Strategy:
    """A registered batching strategy: a planner and the layout its batches use."""

    layout: str  # "packed" or "padded"
    plan: Callable[[TokenIndex, np.ndarray, BatchSize], list[np.ndarray]]
    __doc__: str = ""
    mixes: bool = True
    """Whether batches are meant to hold several sources (False: by-modality, per-sample)."""
    window: Callable[[TokenIndex, np.ndarray, BatchSize], int] | None = None
    """Samples of the order the planner reorders among (None: it keeps the order)."""


STRATEGIES: Registry[Strategy] = Registry(
    "strategies", "batching strategies: how heterogeneous samples are grouped and laid out")


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of `arange(s, s + c)` for each (s, c), vectorized."""
    total = int(counts.sum())
    return np.repeat(starts - _excl_cumsum(counts), counts) + np.arange(total)


def check_budget(index: TokenIndex, order: np.ndarray, size: BatchSize) -> None:
    """Refuses a token budget smaller than the longest sample, naming it."""
    if size.tokens is None or len(order) == 0:
        return
    longest = int(np.argmax(index.lengths[order]))
    if index.lengths[order][longest] > size.tokens:
        sample = int(order[longest])
        folder = index.folders[int(index.folder_of(np.array([sample]))[0])]
        raise MMToolError(
            f"--batch-tokens {size.tokens} is smaller than sample {index.sample_ids([sample])[0]!r} "
            f"of {folder.path} ({int(index.lengths[sample])} tokens); raise --batch-tokens to at least that")


# -- planners ----------------------------------------------------------------------------------
def _fixed_count(order: np.ndarray, n: int) -> list[np.ndarray]:
    return [order[i:i + n] for i in range(0, len(order), n)]


def _greedy_padded(index: TokenIndex, order: np.ndarray, budget: int) -> list[np.ndarray]:
    """Consecutive samples while batch_size × longest ≤ budget (what a padded batch costs)."""
    lengths = index.lengths[order]
    batches, start = [], 0
    while start < len(order):
        running_max = np.maximum.accumulate(lengths[start:start + budget])  # [≤ budget]: at most that fit
        fits = running_max * np.arange(1, len(running_max) + 1) <= budget
        n = max(int(np.argmin(fits)) if not fits.all() else len(fits), 1)
        batches.append(order[start:start + n])
        start += n
    return batches


def _window_samples(lengths: np.ndarray, order: np.ndarray, size: BatchSize, window: int) -> int:
    """Samples in `window` batches of `size` (by the order's mean length for a token budget)."""
    mean_len = max(float(lengths[order].mean()), 1.0) if len(order) else 1.0
    return max(int(window * (size.samples or size.tokens / mean_len)), 1)


PACK_LOOKAHEAD = 64
"""Most samples `packed` carries over to later bins (how far it may move a sample in the order)."""


def plan_packed_tokens(index: TokenIndex, order: np.ndarray, budget: int,
                       lookahead: int = PACK_LOOKAHEAD) -> list[np.ndarray]:
    """Packs samples into bins of `budget` tokens, each bin filled from the next draws of the order.

    The mixture order already interleaves the folders in their requested shares, so a bin that
    takes the next samples of the order holds about the mixture. A bin first takes the samples
    carried over from earlier bins (oldest first) that fit, then the next samples of the order;
    a sample that does not fit in the room left is carried to the next bin, and the bin closes when
    `lookahead` samples are carried, when the room is below the shortest sample, or at the order's
    end. So every sample is placed at most ~`lookahead` positions from where the order put it, no
    sample is lost or repeated, and the plan is a pure function of (lengths, order, budget).

    (Packing longest-first over a large window, which this replaced, pads less on paper but puts
    every long sample in the window's first bins and the short ones after: with 1,400-token
    episodes and 20-token captions most batches held one source.)

    Runs of consecutive samples that fit are taken with one `searchsorted` on the cumulative
    lengths, so the Python cost is one step per carried sample and per bin, not per sample.

    Args:
        index: the token index (for `lengths`).
        order: int64 [L] global sample numbers in mixture order.
        budget: tokens per bin (a sample longer than it gets a bin of its own).
        lookahead: the most samples carried over at once.
    """
    lengths = index.lengths[order]  # [L]
    n = len(order)
    if n == 0:
        return []
    cum = np.concatenate([[0], np.cumsum(lengths)])  # [L+1]
    shortest = int(lengths.min())
    lens = lengths.tolist()
    batches: list[np.ndarray] = []
    carried: list[int] = []  # positions into `order`, oldest first
    pos = 0
    while pos < n or carried:
        room, parts, kept = budget, [], []
        for p in carried:
            if lens[p] <= room:
                parts.append(np.array([p]))
                room -= lens[p]
            else:
                kept.append(p)
        while pos < n and room >= shortest and len(kept) < lookahead:
            k = int(np.searchsorted(cum, cum[pos] + room, side="right")) - 1 - pos  # fit in a row
            if k > 0:
                parts.append(np.arange(pos, pos + k))
                room -= int(cum[pos + k] - cum[pos])
                pos += k
            elif lens[pos] > budget and room == budget:  # over budget: alone (the loader refuses it)
                parts.append(np.array([pos]))
                pos += 1
                break
            else:
                kept.append(pos)
                pos += 1
        if not parts:  # only carried samples over budget are left: one alone
            parts, kept = [np.array([kept[0]])], kept[1:]
        carried = kept
        batches.append(order[np.concatenate(parts)])
    return batches


def _plan_per_sample(index, order, size):
    return [order[i:i + 1] for i in range(len(order))]


def _plan_padded(index, order, size):
    if size.samples is not None:
        return _fixed_count(order, size.samples)
    return _greedy_padded(index, order, size.tokens)


def _plan_packed(index, order, size):
    if size.samples is not None:
        return _fixed_count(order, size.samples)
    return plan_packed_tokens(index, order, size.tokens, PACK_LOOKAHEAD)


def _plan_by_modality(index, order, size):
    """Samples grouped by modality signature, each group batched in its own order."""
    sig = index.signature[order]
    batches, firsts = [], []
    for s in np.unique(sig):
        where = np.flatnonzero(sig == s)  # positions of the group in the mixture order
        planned = _plan_padded(index, order[where], size)
        batches.extend(planned)
        firsts.extend(where[_excl_cumsum(np.array([len(p) for p in planned]))].tolist())
    # Interleave the groups by where each batch's first sample stood in the mixture order.
    return [batches[i] for i in np.argsort(firsts, kind="stable")]


def _plan_by_modality_sorted(index, order, size, window: int = 64):
    """`by-modality` with length bucketing: within each signature group, the samples of every
    window of ~`window` batches are sorted by length before being cut into padded batches, and the
    window's batches are emitted in a pseudo-random order (as `packed` does with its bins)."""
    sig = index.signature[order]
    lengths = index.lengths
    take = _window_samples(lengths, order, size, window)
    batches, firsts = [], []
    for s in np.unique(sig):
        where = np.flatnonzero(sig == s)
        for at in range(0, len(where), take):
            chunk = where[at:at + take]  # [w] positions in the mixture order
            by_len = order[chunk][np.argsort(lengths[order[chunk]], kind="stable")]
            planned = _plan_padded(index, by_len, size)
            rng = np.random.default_rng(by_len[:8].tolist() + [len(batches)])
            batches.extend(planned[i] for i in rng.permutation(len(planned)))
            firsts.extend([int(chunk[0])] * len(planned))
    return [batches[i] for i in np.argsort(firsts, kind="stable")]


# per-sample uses the padded layout: a [1, L] row has no padding, whereas the packed layout would
# measure the lone sample against the whole --batch-tokens budget (e.g. 90% "padding").
STRATEGIES.add("per-sample", Strategy("padded", _plan_per_sample, mixes=False),
               "one sample per batch: no padding, no batching benefit")
STRATEGIES.add("by-modality", Strategy("padded", _plan_by_modality, mixes=False),
               "batches of samples that share a modality signature, padded to the longest")
STRATEGIES.add("by-modality-sorted", Strategy(
    "padded", _plan_by_modality_sorted, mixes=False,
    window=lambda index, order, size: _window_samples(index.lengths, order, size, 64)),
               "by-modality with length bucketing: each signature's samples sorted by length within windows")
STRATEGIES.add("padded", Strategy("padded", _plan_padded),
               "mixed batches, every sample padded to the longest, with masks")


def _packed_window(index, order, size):
    """Samples a packed bin may come from: one budget's worth plus the carried ones."""
    return 0 if size.tokens is None else _window_samples(index.lengths, order, size, 1) + PACK_LOOKAHEAD


STRATEGIES.add("packed", Strategy("packed", _plan_packed, window=_packed_window),
               "mixed samples back to back up to a token budget, cu_seqlens for attention (default)")


def _plan_embeddings(index, order, size):
    """Packed batches of embedding folders (`mmtool embed`): refuses data without an embedding stream.

    What it measures: the batching cost of precomputed embeddings. In an embedding folder a pooled
    segment is a single vector token (`[1, dim]` floats) instead of n token ids, so a token budget
    holds more samples, and each such token carries dim·4 bytes to the device instead of 4. Planning
    and layout are `packed`'s; the strategy exists so that `mmtool profile --data EMBED_DIR
    --strategies packed,embeddings` names what is being measured, and fails loudly when the folders
    hold no embeddings rather than silently measuring plain packing.
    """
    if not any(s.modality == "embedding" for s in index.streams):
        raise MMToolError("strategy 'embeddings' measures embedding folders, and the --data given has "
                          "no embedding segments; make one with `mmtool embed DATA --encoder "
                          "minilm-l6 --out DIR` and profile DIR")
    return _plan_packed(index, order, size)


STRATEGIES.add("embeddings", Strategy("packed", _plan_embeddings, window=_packed_window),
               "packed batches of embedding folders (`mmtool embed`): one vector token per pooled segment")


# -- warnings ----------------------------------------------------------------------------------
SINGLE_SOURCE_WARN = 0.10
"""Warn when more than this share of a mixing strategy's batches hold one folder only."""


def plan_warnings(index: TokenIndex, order: np.ndarray, plan: list[np.ndarray], size: BatchSize,
                  strategy: str) -> list[str]:
    """Warnings about a planned epoch whose batches do not follow the mixture (one line each).

    Warns when more than `SINGLE_SOURCE_WARN` of a mixing strategy's batches hold samples of one
    folder only, and when the planner's reordering window covers the whole epoch (then the
    mixture's order no longer decides which samples meet in a batch). Silent for one folder.

    Args:
        index: the token index. order: int64 [L] the epoch's mixture order.
        plan: the epoch's batches. size: the batch size. strategy: the strategy's name.
    """
    folders = index.sample_folder[order]  # [L]
    if len(plan) == 0 or folders.min() == folders.max():
        return []
    found = STRATEGIES.get(strategy)
    out = []
    if found.mixes:
        flat = index.sample_folder[np.concatenate(plan)]  # [L]
        starts = _excl_cumsum(np.array([len(p) for p in plan]))  # [B]
        single = int((np.minimum.reduceat(flat, starts) == np.maximum.reduceat(flat, starts)).sum())
        if single > SINGLE_SOURCE_WARN * len(plan):
            out.append(f"{single} of {len(plan)} batches ({single / len(plan):.0%}) of an epoch hold "
                       f"samples of one data folder only (strategy {strategy}): those steps train on "
                       "one source; check the weights, --mix-by and the batch size")
    window = found.window(index, order, size) if found.window else 0
    if window >= len(order):
        out.append(f"strategy {strategy} reorders samples within windows of ~{window:,} samples, which "
                   f"cover the whole epoch ({len(order):,} samples): which samples meet in a batch no "
                   "longer follows the mixture; use more data or --samples-per-epoch")
    return out


# -- assembly ----------------------------------------------------------------------------------
_I32, _I64, _F32 = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32)


def assemble(index: TokenIndex, samples: np.ndarray, layout: str = "packed") -> Batch:
    """Gathers the tokens of `samples` (global numbers, batch order) into one `Batch` buffer.

    The buffer holds the tokens and one row per sample and per segment saying where they go; the
    slot-level index fields (`slot_stream`, `s{k}.slot`, ...) are computed from those rows on the
    device that reads the batch (`layout.py`). The batch's segments are regrouped into *runs* —
    segments of one stream in one shard — and each run's tokens are one gather, so a batch costs
    O(runs) Python steps (streams × shards, typically under ten), never O(samples) or O(tokens).

    Args:
        index: the token index the sample numbers refer to.
        samples: int64 [B] sample numbers.
        layout: "packed" (back to back) or "padded" (rows of the longest length).
    """
    samples = np.asarray(samples, np.int64)
    lens = index.lengths[samples]  # [B]
    starts, n_slots = _sample_starts(lens, layout)
    segs = _runs(index, samples)
    n_sep = int(index.steps[samples].sum())
    plan = _plan(index, len(samples), len(segs.segs), segs.per_stream)
    buf, v = plan.allocate()
    _fill_rows(v, index, samples, lens, starts, n_slots, segs)
    _gather_tokens(v, index, segs)
    sep_id = index.stream_ids[SEPARATOR]
    streams = tuple(segs.per_stream) + ((sep_id,) if n_sep else ())
    return Batch.from_numpy(buf, plan.specs, layout, streams, num_slots=n_slots,
                            real_tokens=int(lens.sum()), sep_stream=sep_id if n_sep else -1,
                            num_separators=n_sep)


def _sample_starts(lens: np.ndarray, layout: str) -> tuple[np.ndarray, int]:
    """(first slot of each sample [B], slots of the batch) in `layout`: packed back to back, or
    padded to rows of the longest length."""
    if layout == "packed":
        return _excl_cumsum(lens), int(lens.sum())
    if layout == "padded":
        b = len(lens)
        width = int(lens.max()) if b else 0
        return np.arange(b, dtype=np.int64) * width, b * width
    raise MMToolError(f"unknown layout {layout!r}")


class _Runs(NamedTuple):
    """A batch's segments and the order their tokens are stored in: by (stream, shard), so that each
    run — segments of one stream in one shard — is one gather."""

    segs: np.ndarray  # [G] global segment numbers, in batch order
    count: np.ndarray  # [B] segments per sample
    stream: np.ndarray  # [G] stream of each segment, batch order
    order: np.ndarray  # [G] stored position → batch-local segment
    stored: np.ndarray  # [G] global segment numbers, stored order
    ntok: np.ndarray  # [G] tokens per segment, stored order
    tok_first: np.ndarray  # [G] first stored token of each segment, stored order
    runs: list[tuple[int, int, int, int, int, int]]  # (stream, shard, g0, g1, first token, end token)
    per_stream: dict[int, list[int]]  # stream → [first, end) stored tokens


def _runs(index: TokenIndex, samples: np.ndarray) -> _Runs:
    seg_first = index.seg_offsets[samples]  # [B]
    seg_count = index.seg_offsets[samples + 1] - seg_first  # [B]
    segs = _ranges(seg_first, seg_count)  # [G]
    stream = index.seg_stream[segs]  # [G]
    shard = index.seg_shard[segs]  # [G]
    seg_order = np.lexsort((shard, stream))  # [G] stable: stream-major, then shard
    segs_g, stream_g, shard_g = segs[seg_order], stream[seg_order], shard[seg_order]
    ntok = index.seg_ntok[segs_g]  # [G]
    tok_first = _excl_cumsum(ntok)  # [G] first stored token of each segment
    cut = np.flatnonzero((np.diff(stream_g) != 0) | (np.diff(shard_g) != 0)) + 1
    g0s = np.concatenate([[0], cut]).astype(np.int64) if len(segs) else cut
    g1s = np.concatenate([cut, [len(segs)]]).astype(np.int64) if len(segs) else cut
    runs = list(zip(stream_g[g0s].tolist(), shard_g[g0s].tolist(), g0s.tolist(), g1s.tolist(),
                    tok_first[g0s].tolist(), (tok_first[g1s - 1] + ntok[g1s - 1]).tolist()))
    per_stream: dict[int, list[int]] = {}  # stream → [first, end) stored tokens
    for k, _, _, _, t0, t1 in runs:
        per_stream.setdefault(k, [t0, t1])[1] = t1
    return _Runs(segs, seg_count, stream, seg_order, segs_g, ntok, tok_first, runs, per_stream)


def _plan(index: TokenIndex, b: int, g: int, per_stream: dict[int, list[int]]) -> BufferBuilder:
    """The fields of a batch of `b` samples and `g` segments, with each stream's stored tokens."""
    plan = BufferBuilder()
    for name, dtype, n in (("cu_seqlens", _I32, b + 1), ("seqlens", _I32, b),
                           ("sample_folder", _I32, b), ("sample_index", _I64, b), ("label", _I64, b),
                           ("sample_steps", _I32, b), ("sample_sep", _I32, b), ("sample_step_len", _I32, b),
                           ("seg_sample", _I32, g), ("seg_stream", _I32, g),
                           ("seg_order", _I32, g), ("seg_ntok", _I32, g),
                           ("seg_base", _I32, g), ("seg_step", _I32, g),
                           ("seg_stride", _I32, g), ("seg_role", _I32, g)):
        plan.add(name, dtype, (n,))
    for k, (t0, t1) in per_stream.items():
        info = index.streams[k]
        if info.kind == "ids":
            plan.add(f"s{k}.ids", _I32, (t1 - t0,))
        else:
            plan.add(f"s{k}.values", _F32, (t1 - t0, info.dim))
    return plan


def _fill_rows(v: dict[str, np.ndarray], index: TokenIndex, samples: np.ndarray, lens: np.ndarray,
               starts: np.ndarray, n_slots: int, segs: _Runs) -> None:
    """The per-sample and per-segment rows: where each sample starts, what each segment holds."""
    v["seqlens"][:] = lens
    v["cu_seqlens"][:-1] = starts
    v["cu_seqlens"][-1] = n_slots
    v["sample_folder"][:] = index.sample_folder[samples]
    v["sample_index"][:] = samples
    v["label"][:] = index.labels[samples]
    v["sample_steps"][:] = index.steps[samples]
    v["sample_sep"][:] = index.sep[samples]
    v["sample_step_len"][:] = index.step_len[samples]
    v["seg_sample"][:] = np.repeat(np.arange(len(samples), dtype=np.int32), segs.count)
    v["seg_stream"][:] = segs.stream
    v["seg_order"][:] = segs.order
    for name, per_seg in (("seg_ntok", index.seg_ntok), ("seg_base", index.seg_base),
                          ("seg_step", index.seg_step), ("seg_stride", index.seg_stride),
                          ("seg_role", index.seg_role)):
        v[name][:] = per_seg[segs.segs]


def _gather_tokens(v: dict[str, np.ndarray], index: TokenIndex, segs: _Runs) -> None:
    """The tokens, run by run: one gather of ids or vector rows each."""
    for k, sh, g0, g1, t0, t1 in segs.runs:
        first = segs.per_stream[k][0]
        n = segs.ntok[g0:g1]  # [g]
        start = index.seg_start[segs.stored[g0:g1]]  # [g] first id, or first float, in the shard
        back = segs.tok_first[g0:g1] - t0  # [g] the run's token number of each segment's token 0
        src = index.shards[sh]
        info = index.streams[k]
        if info.kind == "ids":  # token i of the run, in segment g, is id start[g] + i - back[g]
            at = np.repeat(start - back, n)  # [t]
            at += np.arange(t1 - t0)
            np.take(src.ids, at, out=v[f"s{k}.ids"][t0 - first:t1 - first])
        else:
            _gather_rows(src.values, info.dim, start, back, n, v[f"s{k}.values"][t0 - first:t1 - first])


def _gather_rows(values: np.ndarray, dim: int, start: np.ndarray, back: np.ndarray, n: np.ndarray,
                 out: np.ndarray) -> None:
    """Copies the token rows of a run of segments from a shard's flat `values` into `out`.

    Args:
        values: float32 [F] the shard's flat values. dim: floats per token.
        start: [g] first float of each segment. back: [g] the run's token number of each
            segment's token 0. n: [g] tokens of each segment.
        out: float32 [Σ n, dim].
    """
    t = np.arange(len(out))  # [t] the run's token numbers
    if dim == 1 or not (start % dim).any():  # every segment starts on a row: a [F/dim, dim] view
        rows = values[:len(values) // dim * dim].reshape(-1, dim)  # zero-copy
        at = np.repeat(start // dim - back, n)  # [t]
        at += t
        np.take(rows, at, axis=0, out=out)
    else:  # rows at arbitrary float offsets: a sliding-window view (row r = values[r:r+dim])
        windows = np.lib.stride_tricks.sliding_window_view(values, dim)  # [F-dim+1, dim]
        out[:] = windows[np.repeat(start - back * dim, n) + t * dim]


def padding_fraction(batch: Batch, size: BatchSize) -> float:
    """Share of the batch's token capacity without a real token (see module docstring)."""
    capacity = size.tokens if (batch.layout == "packed" and size.tokens) else batch.num_slots
    return 1.0 - batch.real_tokens / max(capacity, 1)
