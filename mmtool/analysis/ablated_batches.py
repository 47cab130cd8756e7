"""Batches with one modality ablated, for `mmtool ablate`: the modes and the rebuilt batches.

`ablated_orders` says, for one modality and mode, which samples of a packed batch are affected and
what their slot order becomes (`drop`: without the modality's slots; `permute`: with another
same-signature sample's slots in their place); `rebuild` turns those orders into a new packed
`Batch` (keeping each token's position when asked). Why these two modes, and what is measured on
the result: `mmtool.analysis.ablate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mmtool.data.batch import Batch, BufferBuilder
from mmtool.errors import MMToolError
from mmtool.registry import Registry

@dataclass(frozen=True)
class Ablation:
    """One ablation mode: how the affected samples' slots are reordered, and how to read the result.

    Attributes:
        orders: (slots per sample, is_m per sample (bool over its slots), candidate samples — those
            with modality m and another modality —, signature per sample of the batch, rng) →
            (chosen samples, their ablated slot orders).
        keep_positions: rebuilt tokens keep their original positions (drop: the gap stays a gap).
        refit_probe: the accuracy check refits its probe on ablated training features (drop: what
            the rest still tells), instead of applying the intact-data probe.
    """

    orders: Callable[..., tuple[list[int], list[np.ndarray]]]
    keep_positions: bool = False
    refit_probe: bool = False


ABLATIONS: Registry[Ablation] = Registry(
    "ablations", "ablation modes of `mmtool ablate --modes` (a plug-in registers an `Ablation`)")


def _drop(slots, is_m, cand, signature, rng):
    return cand, [slots[i][~is_m[i]] for i in cand]


def _permute(slots, is_m, cand, signature, rng):
    chosen, ablated = [], []
    sig = signature[cand] if cand else np.zeros(0, np.int64)
    donor: dict[int, int] = {}
    for s in np.unique(sig):
        group = [cand[j] for j in np.flatnonzero(sig == s)]
        if len(group) < 2:
            continue
        for a, d in zip(group, np.asarray(group)[derangement(len(group), rng)]):
            donor[a] = int(d)
    for i in cand:
        if i not in donor:
            continue
        mine, theirs = slots[i], slots[donor[i]][is_m[donor[i]]]
        if int(is_m[i].sum()) == len(theirs):  # same count: slot for slot (keeps interleaving)
            new = mine.copy()
            new[is_m[i]] = theirs
        else:  # a block of another length where this sample's first such token was
            p = int(np.argmax(is_m[i]))
            rest = mine[~is_m[i]]
            new = np.concatenate([rest[:p], theirs, rest[p:]])
        chosen.append(i)
        ablated.append(new)
    return chosen, ablated


ABLATIONS.add("drop", Ablation(_drop, keep_positions=True, refit_probe=True),
              "remove the modality's tokens from each sample that has another modality")
ABLATIONS.add("permute", Ablation(_permute),
              "swap the modality's tokens between same-signature samples of a batch (no sample keeps its own)")


# -- rebuilding batches ----------------------------------------------------------------------------
def rebuild(batch: Batch, orders: list[np.ndarray], keep: list[int], keep_positions: bool = False) -> Batch:
    """A new packed batch whose sample i is the slots `orders[i]` of `batch` (a packed host batch),
    in that order, carrying the folder, index and label of `batch`'s sample `keep[i]`.

    Slots may come from any sample (permutation) and may be left out (drop); each token keeps its
    stream, data and within-segment position. Positions in the sample (`slot_pos`, which the model
    embeds) are renumbered 0..n-1, or with `keep_positions` stay what they were, so that tokens
    left after a drop are where they were (the model reads `slot_pos`; attention and next-token
    order follow the row order, which is unchanged).
    """
    if batch.layout != "packed":
        raise MMToolError("rebuild needs a packed batch")
    keep = np.asarray(keep, np.int64)
    lens = np.array([len(o) for o in orders], np.int64)
    src = np.concatenate(orders).astype(np.int64) if len(orders) else np.zeros(0, np.int64)  # [n] old slots
    b, n = len(orders), int(lens.sum())
    starts = np.zeros(b, np.int64)
    if b > 1:
        np.cumsum(lens[:-1], out=starts[1:])
    new_stream = batch.numpy("slot_stream")[src]  # [n]
    old_seg = batch.numpy("slot_segment")[src]  # [n]
    sample_of_new = np.repeat(np.arange(b), lens)  # [n]
    seg_order, seg_of_slot, seg_sample = _renumber_segments(
        old_seg, sample_of_new, max(int(batch.numpy("seg_stream").shape[0]), 1))
    rows = {k: r for k in batch.streams if len(r := np.flatnonzero(new_stream == k))}  # new slots per stream
    plan = _plan(batch, n, b, len(seg_order), rows)
    buf, v = plan.allocate()
    v["slot_sample"][:] = sample_of_new
    v["slot_pos"][:] = batch.numpy("slot_pos")[src] if keep_positions else np.arange(n) - np.repeat(starts, lens)
    v["slot_stream"][:] = new_stream
    v["slot_segment"][:] = seg_of_slot
    v["cu_seqlens"][:-1], v["cu_seqlens"][-1] = starts, n
    v["seqlens"][:] = lens
    for name in ("sample_folder", "sample_index", "label"):
        v[name][:] = batch.numpy(name)[keep]
    v["seg_sample"][:] = seg_sample
    v["seg_stream"][:] = batch.numpy("seg_stream")[seg_order]
    if "seg_role" in v:
        v["seg_role"][:] = batch.numpy("seg_role")[seg_order]
    _copy_tokens(batch, src, rows, v)
    return Batch.from_numpy(buf, plan.specs, "packed", tuple(rows))


def _renumber_segments(old_seg: np.ndarray, sample_of_new: np.ndarray, n_old: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments of the new slots numbered in order of first appearance.

    Args:
        old_seg: [n] each new slot's segment in the old batch (-1: none).
        sample_of_new: [n] each new slot's sample.
        n_old: segments of the old batch (at least 1).

    Returns:
        (old segment of each new one [S], new segment of each slot [n] (-1: none), sample of each new one [S]).
    """
    has = old_seg >= 0
    first = np.unique(old_seg[has], return_index=True)[1]  # first occurrence of each old segment
    seg_order = old_seg[has][np.sort(first)]  # old segments in order of appearance
    seg_new = np.full(n_old, -1, np.int64)
    seg_new[seg_order] = np.arange(len(seg_order))
    seg_sample = np.zeros(len(seg_order), np.int64)
    seg_sample[seg_new[old_seg[has]]] = sample_of_new[has]
    return seg_order, np.where(has, seg_new[np.maximum(old_seg, 0)], -1), seg_sample


def _plan(batch: Batch, n: int, b: int, segments: int, rows: dict[int, np.ndarray]) -> BufferBuilder:
    """The fields of a packed batch of `n` slots, `b` samples and `segments` segments, with the
    streams of `rows` (stream → its new slots), each with the ids or values part `batch` has."""
    plan = BufferBuilder()
    for name, dtype, shape in (("slot_sample", np.int32, (n,)), ("slot_pos", np.int32, (n,)),
                               ("slot_stream", np.int32, (n,)), ("slot_segment", np.int32, (n,)),
                               ("cu_seqlens", np.int32, (b + 1,)), ("seqlens", np.int32, (b,)),
                               ("sample_folder", np.int32, (b,)), ("sample_index", np.int64, (b,)),
                               ("label", np.int64, (b,)), ("seg_sample", np.int32, (segments,)),
                               ("seg_stream", np.int32, (segments,))):
        plan.add(name, dtype, shape)
    if "seg_role" in batch:  # role loss masks (next-token:roles=...) read it
        plan.add("seg_role", np.int32, (segments,))
    for k, new in rows.items():
        if f"s{k}.ids" in batch:
            plan.add(f"s{k}.ids", np.int32, (len(new),))
        elif f"s{k}.values" in batch:
            plan.add(f"s{k}.values", np.float32, (len(new), batch[f"s{k}.values"].shape[1]))
        plan.add(f"s{k}.slot", np.int32, (len(new),))
        plan.add(f"s{k}.pos", np.int32, (len(new),))
    return plan


def _copy_tokens(batch: Batch, src: np.ndarray, rows: dict[int, np.ndarray], v: dict[str, np.ndarray]) -> None:
    """Fills each stream's ids or values, slots and positions of the new slots `rows[k]` (which are
    the old slots `src[rows[k]]`) into the views `v`."""
    which = np.full(batch.num_slots, -1, np.int64)  # token number of each old slot in its stream
    for k in batch.streams:
        which[batch.numpy(f"s{k}.slot")] = np.arange(len(batch.numpy(f"s{k}.slot")))
    for k, new in rows.items():
        tok = which[src[new]]  # token numbers in the old stream arrays
        for part in ("ids", "values"):
            if f"s{k}.{part}" in batch:
                v[f"s{k}.{part}"][:] = batch.numpy(f"s{k}.{part}")[tok]
        v[f"s{k}.slot"][:] = new
        v[f"s{k}.pos"][:] = batch.numpy(f"s{k}.pos")[tok]


def sample_slots(batch: Batch) -> list[np.ndarray]:
    """The slots of each sample of a packed batch."""
    cu = batch.numpy("cu_seqlens")
    return [np.arange(cu[i], cu[i + 1]) for i in range(batch.batch_size)]


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (n ≥ 2): a random cycle."""
    order = rng.permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, -1)
    return out


def ablated_orders(batch: Batch, modality_of_slot: np.ndarray, m: int, mode: str,
                   signature: np.ndarray, rng: np.random.Generator
                   ) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """(affected samples, their intact slot orders, their ablated slot orders) for modality `m`.

    Affected: samples with modality `m` and at least one other non-separator modality (and, for
    permute, a same-signature partner in the batch). `modality_of_slot` is -1 for separators. The
    mode is looked up in `ABLATIONS` (unknown modes are refused, listing the known ones).
    """
    slots = sample_slots(batch)
    is_m = [modality_of_slot[s] == m for s in slots]
    other = [((modality_of_slot[s] != m) & (modality_of_slot[s] >= 0)).any() for s in slots]
    cand = [i for i in range(len(slots)) if is_m[i].any() and other[i]]
    chosen, ablated = ABLATIONS.get(mode).orders(slots, is_m, cand, signature, rng)
    return chosen, [slots[i] for i in chosen], ablated
