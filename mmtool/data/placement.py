"""Token placement: where each segment's tokens go in its sample's token sequence.

Token j of a segment lands at position `base + (j // step) * stride + j % step` of its sample.
Ordinary segments have `step = n` (contiguous, back to back in segment order). Trajectory segments
(roles observation/action/reward of a sample that has both observations and actions, shape
`[T, k]`) have `step = k` and `stride = ` the timestep length, which interleaves them as Gato does:
`obs_t | separator | action_t | reward_t`, for t = 0..T-1, after the sample's other segments (e.g.
a prompt). `placement` computes it for a whole shard at once, vectorised (`TokenIndex` stores it
per shard; `mmtool.data.layout` turns it into slot positions).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TIMESTEP_ROLES = ("observation", "action", "reward")
AFTER_SEPARATOR = ("action", "reward")


class Placement(NamedTuple):
    """Per segment [G] and per sample [n] placement arrays of one shard (all int64)."""

    seg_base: np.ndarray  # [G] position of the segment's token 0 (of its step 0) in its sample
    seg_step: np.ndarray  # [G] tokens per timestep (the whole segment when not a trajectory one)
    seg_stride: np.ndarray  # [G] positions from one timestep to the next (0: not a trajectory segment)
    sample_len: np.ndarray  # [n] tokens of each sample, separators included
    sample_steps: np.ndarray  # [n] timesteps T (0 when not a trajectory)
    sample_sep: np.ndarray  # [n] position of the first separator
    sample_step_len: np.ndarray  # [n] tokens per timestep, separator included


def _excl_cumsum_in_groups(x: np.ndarray, group_start: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum of `x` restarting at each group (groups are consecutive runs)."""
    cs = np.cumsum(x) - x  # [G] exclusive over everything
    return cs - np.repeat(cs[group_start], counts) if len(x) else cs


def placement(seg_offsets: np.ndarray, role: np.ndarray, first_dim: np.ndarray, seg_ntok: np.ndarray,
              n: int) -> Placement:
    """The placement of a shard's segments.

    Args:
        seg_offsets: int64 [n+1] segments of sample i are seg_offsets[i]:seg_offsets[i+1].
        role: [G] each segment's role (object array of str).
        first_dim: int64 [G] each segment's leading shape entry (T for a `[T, k]` trajectory segment).
        seg_ntok: [G] tokens of each segment.
        n: samples.
    """
    is_obs = role == "observation"
    is_act = role == "action"
    n_seg = np.diff(seg_offsets)  # [n]
    sample_of_seg = np.repeat(np.arange(n), n_seg)  # [G]
    traj = (np.bincount(sample_of_seg, is_obs, n) > 0) & (np.bincount(sample_of_seg, is_act, n) > 0)
    steps = np.zeros(n, np.int64)
    obs_first = np.flatnonzero(is_obs)
    steps[sample_of_seg[obs_first[::-1]]] = first_dim[obs_first[::-1]]  # first obs seg wins
    steps = np.where(traj, steps, 0)
    aligned = np.isin(role, TIMESTEP_ROLES) & traj[sample_of_seg] \
        & (first_dim == steps[sample_of_seg]) & (steps[sample_of_seg] > 0)  # [G]
    per_step = np.where(aligned, seg_ntok // np.maximum(steps[sample_of_seg], 1), seg_ntok)
    after_sep = aligned & np.isin(role, AFTER_SEPARATOR)
    group_start = seg_offsets[:-1][n_seg > 0]
    counts = n_seg[n_seg > 0]
    plain_tok = np.where(aligned, 0, seg_ntok)
    step_tok = np.where(aligned, per_step, 0)
    prefix = np.bincount(sample_of_seg, plain_tok, n).astype(np.int64)  # [n]
    step_len = np.bincount(sample_of_seg, step_tok, n).astype(np.int64) + traj  # [n] (+1 sep)
    obs_tok = np.bincount(sample_of_seg, np.where(aligned & ~after_sep, per_step, 0), n).astype(np.int64)
    base_plain = _excl_cumsum_in_groups(plain_tok, group_start, counts)
    base_step = _excl_cumsum_in_groups(step_tok, group_start, counts) + after_sep
    seg_base = np.where(aligned, prefix[sample_of_seg] + base_step, base_plain)
    seg_stride = np.where(aligned, step_len[sample_of_seg], 0)
    return Placement(seg_base.astype(np.int64), np.maximum(per_step, 1).astype(np.int64),
                     seg_stride.astype(np.int64), prefix + steps * step_len, steps, prefix + obs_tok, step_len)
