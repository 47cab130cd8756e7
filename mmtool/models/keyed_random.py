"""Randomness keyed by what a token is, not by where it is stored.

A stream's tokens are stored grouped by shard (one gather per run, `data.batching`), so the same
batch of the same data comes in another token order when the data was written with another
`--shard-size`. Draws taken from a generator in storage order would then mask other tokens and the
run would differ. Instead, every token gets a uniform number from a counter-based hash of

    (a base drawn once per call from the step's generator, the sample's number in the run's data,
     the segment's place in its sample, the token's place in its segment)

The sample's number (`sample_index`: folder order, then row order) does not depend on the shard
size, nor does the rest, so the same data and seed give the same masks whatever the layout;
different generators (seed, step, micro-batch, call) give independent draws.

The hash is Wellons' `lowbias32` on 32-bit words held in int64 tensors, with the multiplications
split so that no intermediate exceeds 2^49 (no reliance on signed overflow): it runs on any device.
Two 32-bit hashes make a 53-bit uniform, so ties within a segment are practically impossible.
"""

from __future__ import annotations

import torch
from torch import Tensor

M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for x in [0, 2^32) and a 32-bit constant c, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _mix(x: Tensor) -> Tensor:
    """lowbias32: a bijective avalanche hash of 32-bit words (int64 [n] in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: Tensor, key: Tensor) -> Tensor:
    """Mixes the 64-bit words of `key` (int64 [n]) into hash state `h` (int64 [n] 32-bit words)."""
    h = _mix(h ^ (key & M32))
    return _mix(h ^ ((key >> 32) & M32))


def keyed_uniform(generator: torch.Generator, *keys: Tensor) -> Tensor:
    """A uniform number in [0, 1) per element, a function of the keys and one draw of `generator`.

    Args:
        generator: consumed by exactly one `randint` draw (the base), so successive calls differ.
        keys: int64 [n] tensors, all on one device (e.g. sample number, segment, position).
    Returns:
        float64 [n].
    """
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    device = keys[0].device
    h1 = _absorb(torch.full_like(keys[0], base & M32), torch.full_like(keys[0], base >> 32))
    for key in keys:
        h1 = _absorb(h1, key.to(device=device, dtype=torch.int64))
    h2 = _mix(h1 ^ 0x9E3779B9)  # a second, independent word
    return ((h1 << 21) + (h2 >> 11)).double() / 2.0**53  # [n] 53 bits


def stream_token_keys(batch, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(batch-local segment, sample number, segment place in its sample, token place in its segment)
    of every token of stream `k`, in the stream's storage order: long [n_k] each."""
    seg = batch["slot_segment"].long()[batch[f"s{k}.slot"].long()]  # [n_k]
    seg_sample = batch["seg_sample"].long()  # [G] segments of a sample are consecutive
    n_seg = seg_sample.shape[0]
    first_of_sample = torch.full((int(batch["seqlens"].shape[0]),), n_seg, dtype=torch.long,
                                 device=seg.device).scatter_reduce(
        0, seg_sample, torch.arange(n_seg, device=seg.device), "amin")  # [B]
    ordinal = torch.arange(n_seg, device=seg.device) - first_of_sample[seg_sample]  # [G]
    idx = torch.arange(seg.shape[0], device=seg.device)  # [n_k]
    first_tok = torch.full((n_seg,), seg.shape[0], dtype=torch.long, device=seg.device).scatter_reduce(
        0, seg, idx, "amin")  # [G] a segment's tokens are contiguous in its stream
    sample = batch["sample_index"].long()[seg_sample[seg]]  # [n_k]
    return seg, sample, ordinal[seg], idx - first_tok[seg]
