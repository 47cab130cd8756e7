"""Batching strategies: which samples go together, and how their tokens are laid out.

A strategy has two halves:

* a *planner* cuts an epoch's sample order into batches (arrays of sample numbers). Planning
  touches only sample lengths and signatures, so every rank and worker can plan the whole epoch
  cheaply and then assemble only its own batches;
* `assemble` turns one planned batch into a `Batch` buffer with a few vectorized numpy gathers —
  no Python loop over samples or tokens.

Registered strategies (`mmtool ls strategies`): `per-sample`, `by-modality`, `padded`, `packed`,
`embeddings`.
The padding fraction of a batch is the share of its token capacity that holds no real token:
capacity is B·L for padded layouts and the token budget for `packed` with `--batch-tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
        running_max = np.maximum.accumulate(lengths[start:])  # [rest]
        fits = running_max * np.arange(1, len(running_max) + 1) <= budget
        n = max(int(np.argmin(fits)) if not fits.all() else len(fits), 1)
        batches.append(order[start:start + n])
        start += n
    return batches


def _next_fit(lengths: np.ndarray, budget: int) -> np.ndarray:
    """Batch number of each sample when consecutive samples fill bins of `budget` tokens."""
    bins = np.zeros(len(lengths), np.int64)
    start, b = 0, 0
    cs = np.cumsum(lengths)
    while start < len(lengths):
        base = cs[start - 1] if start else 0
        end = int(np.searchsorted(cs, base + budget, side="right"))
        end = max(end, start + 1)
        bins[start:end] = b
        start, b = end, b + 1
    return bins


def plan_packed_tokens(index: TokenIndex, order: np.ndarray, budget: int,
                       window: int = 64) -> list[np.ndarray]:
    """First-fit-decreasing packing over a sliding window of the sample order.

    The order is read `window` budgets' worth of samples at a time; those samples are packed
    longest-first into bins of `budget` tokens, every bin but the emptiest is emitted, and the
    emptiest goes back to the window's start. The window's bins are emitted in a pseudo-random
    order, so that long and short samples do not form separate runs of batches. Near-zero padding,
    no sample lost or repeated, deterministic, and the mixture's order is kept at window scale.
    """
    lengths = index.lengths
    batches: list[np.ndarray] = []
    carry = np.zeros(0, np.int64)
    pos = 0
    mean_len = max(float(lengths[order].mean()), 1.0) if len(order) else 1.0
    take = max(int(window * budget / mean_len), 1)
    while pos < len(order) or len(carry):
        chunk = np.concatenate([carry, order[pos:pos + take]])
        pos += take
        last = pos >= len(order)
        by_len = chunk[np.argsort(-lengths[chunk], kind="stable")]
        space: list[int] = []
        members: list[list[int]] = []
        for s, n in zip(by_len.tolist(), lengths[by_len].tolist()):
            for b, free in enumerate(space):  # first fit; few open bins per window
                if n <= free:
                    space[b] -= n
                    members[b].append(s)
                    break
            else:
                space.append(budget - n)
                members.append([s])
        bins = [np.asarray(m, np.int64) for m in members]
        if not last and len(bins) > 1:
            worst = int(np.argmax(space))
            carry = bins.pop(worst)
        else:
            carry = np.zeros(0, np.int64)
        # First-fit-decreasing fills bins longest-first; emit them in a pseudo-random order
        # (seeded by the window's content, so still deterministic) so that batches stay mixed.
        rng = np.random.default_rng(chunk[:8].tolist() + [len(batches)])
        batches.extend(bins[i] for i in rng.permutation(len(bins)))
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
    return plan_packed_tokens(index, order, size.tokens)


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


# per-sample uses the padded layout: a [1, L] row has no padding, whereas the packed layout would
# measure the lone sample against the whole --batch-tokens budget (e.g. 90% "padding").
STRATEGIES.add("per-sample", Strategy("padded", _plan_per_sample),
               "one sample per batch: no padding, no batching benefit")
STRATEGIES.add("by-modality", Strategy("padded", _plan_by_modality),
               "batches of samples that share a modality signature, padded to the longest")
STRATEGIES.add("padded", Strategy("padded", _plan_padded),
               "mixed batches, every sample padded to the longest, with masks")
STRATEGIES.add("packed", Strategy("packed", _plan_packed),
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


STRATEGIES.add("embeddings", Strategy("packed", _plan_embeddings),
               "packed batches of embedding folders (`mmtool embed`): one vector token per pooled segment")


# -- assembly ----------------------------------------------------------------------------------
def assemble(index: TokenIndex, samples: np.ndarray, layout: str = "packed") -> Batch:
    """Gathers the tokens of `samples` (global numbers, batch order) into one `Batch` buffer.

    Args:
        index: the token index the sample numbers refer to.
        samples: int64 [B] sample numbers.
        layout: "packed" (back to back) or "padded" (rows of the longest length).
    """
    samples = np.asarray(samples, np.int64)
    b = len(samples)
    lens = index.lengths[samples]  # [B]
    if layout == "packed":
        starts = _excl_cumsum(lens)  # [B]
        n_slots = int(lens.sum())
    elif layout == "padded":
        width = int(lens.max()) if b else 0
        starts = np.arange(b, dtype=np.int64) * width  # [B]
        n_slots = b * width
    else:
        raise MMToolError(f"unknown layout {layout!r}")

    # Segments of the batch, regrouped by (stream, shard) so that each stream's tokens are one
    # contiguous run per shard; `seg_local` keeps each segment's original batch-local number.
    seg_first = index.seg_offsets[samples]  # [B]
    seg_count = index.seg_offsets[samples + 1] - seg_first  # [B]
    segs = _ranges(seg_first, seg_count)  # [G]
    seg_sample = np.repeat(np.arange(b), seg_count)  # [G]
    stream = index.seg_stream[segs]  # [G]
    shard = index.seg_shard[segs]  # [G]
    regroup = np.lexsort((shard, stream))  # [G] stable: stream-major, then shard
    segs_g, sample_g, stream_g, shard_g = segs[regroup], seg_sample[regroup], stream[regroup], shard[regroup]
    ntok = index.seg_ntok[segs_g]  # [G]
    tok_seg_first = _excl_cumsum(ntok)  # [G] first token (in grouped order) of each segment
    n_tok = int(ntok.sum())
    j = np.arange(n_tok) - np.repeat(tok_seg_first, ntok)  # [T] token index within its segment
    slot = np.repeat(starts[sample_g] + index.seg_base[segs_g], ntok) + j  # [T] contiguous segments
    stride = index.seg_stride[segs_g]  # [G]; > 0 only for trajectory (timestep) segments
    if stride.any():  # token j of a timestep segment: row j // step, column j % step
        steps_in = stride > 0
        tok = _ranges(tok_seg_first[steps_in], ntok[steps_in])  # [T_traj] their tokens
        step = np.repeat(index.seg_step[segs_g][steps_in], ntok[steps_in])  # [T_traj]
        slot[tok] += (j[tok] // step) * (np.repeat(stride[steps_in], ntok[steps_in]) - step)

    # Separators of trajectory samples: one per timestep.
    steps = index.steps[samples]  # [B]
    t = np.arange(int(steps.sum())) - np.repeat(_excl_cumsum(steps), steps)  # [n_sep]
    sep_slot = np.repeat(starts + index.sep[samples], steps) + t * np.repeat(index.step_len[samples], steps)

    present = np.unique(stream_g)  # streams with tokens, sorted
    run_bounds = np.searchsorted(stream_g, present)  # [K] first grouped segment of each stream
    run_ends = np.append(run_bounds[1:], len(stream_g))
    sep_id = index.stream_ids[SEPARATOR]

    plan = BufferBuilder()
    for name, dtype, shape in (("slot_sample", np.int32, (n_slots,)), ("slot_pos", np.int32, (n_slots,)),
                               ("slot_stream", np.int32, (n_slots,)), ("slot_segment", np.int32, (n_slots,)),
                               ("cu_seqlens", np.int32, (b + 1,)), ("seqlens", np.int32, (b,)),
                               ("sample_folder", np.int32, (b,)), ("sample_index", np.int64, (b,)),
                               ("label", np.int64, (b,)), ("seg_sample", np.int32, (len(segs),)),
                               ("seg_stream", np.int32, (len(segs),))):
        plan.add(name, dtype, shape)
    token_ranges = []
    for k, g0, g1 in zip(present.tolist(), run_bounds.tolist(), run_ends.tolist()):
        t0, t1 = int(tok_seg_first[g0]), int(tok_seg_first[g1 - 1] + ntok[g1 - 1])
        token_ranges.append((k, g0, g1, t0, t1))
        info = index.streams[k]
        if info.kind == "ids":
            plan.add(f"s{k}.ids", np.int32, (t1 - t0,))
        else:
            plan.add(f"s{k}.values", np.float32, (t1 - t0, info.dim))
        plan.add(f"s{k}.slot", np.int32, (t1 - t0,))
        plan.add(f"s{k}.pos", np.int32, (t1 - t0,))
    if len(sep_slot):
        plan.add(f"s{sep_id}.slot", np.int32, (len(sep_slot),))
        plan.add(f"s{sep_id}.pos", np.int32, (len(sep_slot),))
    buf, v = plan.allocate()

    # Per-sample and per-segment fields.
    v["seqlens"][:] = lens
    v["cu_seqlens"][:-1] = starts
    v["cu_seqlens"][-1] = n_slots
    v["sample_folder"][:] = index.sample_folder[samples]
    v["sample_index"][:] = samples
    v["label"][:] = index.labels[samples]
    v["seg_sample"][:] = seg_sample
    v["seg_stream"][:] = stream

    # Per-slot fields: padding first, then every real token and separator writes its slot.
    if layout == "padded":
        v["slot_sample"].fill(-1)
        v["slot_pos"].fill(0)
        v["slot_stream"].fill(-1)
        real = _ranges(starts, lens)  # [Σ lens]
        v["slot_sample"][real] = np.repeat(np.arange(b), lens)
        v["slot_pos"][real] = real - np.repeat(starts, lens)
    else:  # every slot is real: plain writes, no identity scatter
        v["slot_sample"][:] = np.repeat(np.arange(b, dtype=np.int32), lens)
        v["slot_pos"][:] = np.arange(n_slots, dtype=np.int32) - np.repeat(starts.astype(np.int32), lens)
    v["slot_segment"].fill(-1)
    seg_local = regroup  # grouped position → original batch-local segment number
    v["slot_segment"][slot] = np.repeat(seg_local, ntok)
    v["slot_stream"][slot] = np.repeat(stream_g, ntok)
    if len(sep_slot):
        v["slot_stream"][sep_slot] = sep_id
        v[f"s{sep_id}.slot"][:] = sep_slot
        v[f"s{sep_id}.pos"][:] = t

    # The tokens themselves, one contiguous run per (stream, shard).
    seg_src = index.seg_start[segs_g]  # [G] start in the shard's ids or values buffer
    for k, g0, g1, t0, t1 in token_ranges:
        info = index.streams[k]
        v[f"s{k}.slot"][:] = slot[t0:t1]
        v[f"s{k}.pos"][:] = j[t0:t1]
        shards_here = shard_g[g0:g1]
        cuts = np.flatnonzero(np.diff(shards_here)) + 1
        for a, z in zip(np.r_[0, cuts], np.r_[cuts, g1 - g0]):
            ga, gz = g0 + a, g0 + z
            ta, tz = int(tok_seg_first[ga]) - t0, int(tok_seg_first[gz - 1] + ntok[gz - 1]) - t0
            src_shard = index.shards[int(shards_here[a])]
            seg_n = ntok[ga:gz]
            if info.kind == "ids":
                src = np.repeat(seg_src[ga:gz], seg_n) + j[t0 + ta:t0 + tz]  # [tokens]
                np.take(src_shard.ids, src, out=v[f"s{k}.ids"][ta:tz])
            else:
                # A values segment is one contiguous run of n·dim floats. Gather whole token rows
                # from a zero-copy sliding-window view (row r = values[r:r+dim]), so the index
                # array has one entry per token rather than one per float (dim× smaller).
                rows = np.lib.stride_tricks.sliding_window_view(src_shard.values, info.dim)  # [F-dim+1, dim]
                src = np.repeat(seg_src[ga:gz], seg_n) + j[t0 + ta:t0 + tz] * info.dim  # [tokens]
                v[f"s{k}.values"][ta:tz] = rows[src]  # (np.take would copy the whole view first)
    streams = tuple(k for k, *_ in token_ranges) + ((sep_id,) if len(sep_slot) else ())
    return Batch.from_numpy(buf, plan.specs, layout, streams)


def padding_fraction(batch: Batch, size: BatchSize) -> float:
    """Share of the batch's token capacity without a real token (see module docstring)."""
    capacity = size.tokens if (batch.layout == "packed" and size.tokens) else batch.num_slots
    return 1.0 - batch.real_tokens / max(capacity, 1)
