"""Attention over packed (jagged) batches: one signature, several interchangeable backends.

A packed batch concatenates the real tokens of B samples into one `[N, d]` tensor with no padding;
`cu_seqlens` (int32 `[B+1]`, 0 first, N last) marks where each sample starts. Linear layers and
MLPs run on the flat tensor directly. Attention is the one place that must respect sample
boundaries: token i may only attend to tokens of its own sample (a block-diagonal mask), and,
when causal, only to earlier ones. Every backend here computes exactly that:

    fn(q, k, v, cu_seqlens, max_seqlen, causal, seqlens_cpu=None) -> out
        q, k, v, out: [N, H, Dh];  cu_seqlens: int32 [B+1];  max_seqlen: longest sample (int)

`seqlens_cpu` (the B sample lengths as a Python list) lets a backend plan its work without reading
`cu_seqlens` back from the GPU; the batch loader knows the lengths anyway, so it should pass them.

The backends and what they trade (numbers: `benchmarks/attention.py` on the 2-core dev CPU,
32 samples of mixed lengths, forward+backward; see `default_backend` for the rule they back):

* `padded`: scatter into `[B, H, Lmax, Dh]`, one SDPA with a key-padding mask, gather back. The
  reference every other backend is tested against. Simple and sync-free, but pays for the padding
  quadratically: with one 1200-token episode among captions, >90% of the score matrix is padding.
* `loop`: one SDPA per sample slice. No padding at all and no mask (so the fused `is_causal`
  kernel is used), but B kernel launches and B small matmuls; great for a few long samples,
  launch-bound for many short ones (on a GPU especially).
* `bucketed`: sort samples by length, cut the sorted list into groups whose padding stays under
  `PAD_BUDGET`, one padded SDPA per group. Near-zero padding with a handful of calls: the
  fastest on CPU for realistic mixtures, and the CPU default.
* `njt`: torch nested jagged tensors (`layout=torch.jagged`) + SDPA. No padding and one call, but
  on CPU it runs the unfused math path, and CPU has no causal NJT kernel at all (`is_causal` is
  only supported by the CUDA flash / efficient kernels), so causal calls on CPU raise.
* `flex`: FlexAttention with a block mask built from per-token document ids. One call, skips
  fully-masked blocks; made for GPUs (compiled Triton kernels). On CPU, eager flex materialises
  the full `[H, N, N]` score matrix and has no backward, so it is unavailable when gradients
  are needed.
* `flash-varlen`: the flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, or the
  `flash_attn` package), which takes `cu_seqlens` natively: no padding, one launch, no sync. CUDA
  and fp16/bf16 only; unavailable here and raises `MMToolError` rather than fake it.

Use `get_backend(name, device, requires_grad)` to look one up with an availability check, and
`default_backend(device, requires_grad)` for the documented fastest choice.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from mmtool.errors import MMToolError
from mmtool.registry import Registry

PAD_BUDGET = 0.10
"""`bucketed` grows a group of length-sorted samples while its padding stays within this fraction."""


class AttentionBackend:
    """Base class: one attention implementation over packed sequences.

    Subclasses implement `forward` and, where they need something this machine may lack,
    `unavailable_reason`. Instances are what the registry holds; calling one checks availability
    (so an unavailable backend raises `MMToolError` saying why) and then runs `forward`.
    """

    registry_name: str = ""

    def unavailable_reason(self, device: torch.device, requires_grad: bool,
                           causal: bool = False) -> str | None:
        """Why this backend cannot run here, or None when it can."""
        return None

    def is_available(self, device: torch.device, requires_grad: bool, causal: bool = False) -> bool:
        """Whether this backend runs on `device` (with backward when `requires_grad`).

        `causal` defaults to False; pass True to also require causal support (only `njt` on CPU
        lacks it).
        """
        return self.unavailable_reason(torch.device(device), requires_grad, causal) is None

    def forward(self, q, k, v, cu_seqlens, max_seqlen, causal, seqlens):
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int, causal: bool, seqlens_cpu: list[int] | None = None) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        reason = self.unavailable_reason(q.device, needs_grad, causal)
        if reason is not None:
            raise MMToolError(f"attention backend {self.registry_name!r} cannot run here: {reason}")
        if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
            raise MMToolError(f"attention expects q, k, v of one shape [N, H, Dh]; got "
                              f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        return self.forward(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), seqlens_cpu)


ATTENTION: Registry[AttentionBackend] = Registry(
    "attention", "attention backends over packed sequences (cu_seqlens)")


def _backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    """Class decorator: registers one instance of the class as attention backend `name`."""

    def decorate(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        ATTENTION.add(name, cls())
        return cls

    return decorate


def _lengths(cu_seqlens: torch.Tensor, seqlens_cpu: list[int] | None) -> list[int]:
    """The B sample lengths as Python ints; reads `cu_seqlens` back (one sync) only without a hint."""
    if seqlens_cpu is not None:
        return [int(n) for n in seqlens_cpu]
    return torch.diff(cu_seqlens).tolist()  # [B] → list; a device→host sync on GPU


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on `[..., H, L, Dh]`; `mask` (True = attend) replaces `causal` when given."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [..., H, L, Dh]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [..., H, L, Dh]


def _pad_mask(lengths: torch.Tensor, width: int, causal: bool) -> torch.Tensor:
    """Boolean attention mask `[B, 1, width, width]` (True = attend) for samples padded to `width`.

    Keys past a sample's length are masked (and future keys when causal). Query rows that are
    themselves padding attend to every key: their output is thrown away, and a fully masked row
    would give NaN (0/0 in the softmax) that could leak into gradients.
    """
    pos = torch.arange(width, device=lengths.device)  # [W]
    valid = pos[None, :] < lengths[:, None]  # [B, W] real tokens
    mask = valid[:, None, None, :].expand(-1, 1, width, width)  # [B, 1, Wq, Wk] key padding
    if causal:
        mask = mask & (pos[None, :] <= pos[:, None])  # [B, 1, Wq, Wk] and no future keys
    return mask | ~valid[:, None, :, None]  # [B, 1, Wq, Wk] padded query rows see everything


@_backend("padded")
class Padded(AttentionBackend):
    """Reference: scatter into [B, H, Lmax, Dh], one masked SDPA, gather back (pays for padding)."""

    def forward(self, q, k, v, cu_seqlens, max_seqlen, causal, seqlens):
        n, h, dh = q.shape
        b = cu_seqlens.numel() - 1
        cu = cu_seqlens.long()  # [B+1]
        lengths = torch.diff(cu)  # [B]
        # Which sample and position each packed token has, without a device→host sync:
        sample = torch.repeat_interleave(torch.arange(b, device=q.device), lengths,
                                         output_size=n)  # [N]
        pos = torch.arange(n, device=q.device) - cu[sample]  # [N] position inside its sample

        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(b, max_seqlen, h, dh)  # [B, Lmax, H, Dh]
            out = out.index_put((sample, pos), x)  # [B, Lmax, H, Dh] real tokens in place
            return out.transpose(1, 2)  # [B, H, Lmax, Dh]

        mask = _pad_mask(lengths, max_seqlen, causal)  # [B, 1, Lmax, Lmax]
        o = _sdpa(pad(q), pad(k), pad(v), causal, mask)  # [B, H, Lmax, Dh]
        return o.transpose(1, 2)[sample, pos]  # [N, H, Dh]


@_backend("loop")
class Loop(AttentionBackend):
    """One SDPA per sample slice: no padding, B kernel calls."""

    def forward(self, q, k, v, cu_seqlens, max_seqlen, causal, seqlens):
        lengths = _lengths(cu_seqlens, seqlens)
        # `split` rather than slicing: its backward is one cat, where each slice's backward would
        # add a full-size [N, H, Dh] zero tensor (B of them per input: slower than the attention).
        pieces = zip(q.split(lengths), k.split(lengths), v.split(lengths))  # B × [n, H, Dh]
        outs = [_sdpa(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                      causal).transpose(0, 1)  # [H, n, Dh] → [n, H, Dh]
                for qs, ks, vs in pieces if qs.shape[0] > 0]
        return torch.cat(outs) if outs else torch.empty_like(q)  # [N, H, Dh]


def length_buckets(lengths: list[int], pad_budget: float = PAD_BUDGET,
                   slack: int = 0) -> list[list[int]]:
    """Groups sample indices so that padding each group to its longest stays within `pad_budget`.

    Samples are sorted by length and the sorted run is cut greedily: a group takes the next
    (longer) sample while `1 - sum(lengths) / (count * max)` stays ≤ `pad_budget`, or while
    widening the group to it adds at most `slack` padded score entries (count · (new² - old²)).
    Zero-length samples are dropped (they have no tokens to attend with).
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    total = width = 0
    for i in order:
        n = lengths[i]
        if groups and (1 - (total + n) / ((len(groups[-1]) + 1) * n) <= pad_budget
                       or len(groups[-1]) * (n * n - width * width) <= slack):
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
        width = n
    return groups


@_backend("bucketed")
class Bucketed(AttentionBackend):
    """Length-bucketed: samples sorted by length, one padded SDPA per bucket of similar lengths."""

    def __init__(self, pad_budget: float = PAD_BUDGET, slack: int = 0):
        self.pad_budget = pad_budget
        self.slack = slack

    def forward(self, q, k, v, cu_seqlens, max_seqlen, causal, seqlens):
        lengths = _lengths(cu_seqlens, seqlens)
        groups = length_buckets(lengths, self.pad_budget, self.slack)
        if not groups:
            return torch.empty_like(q)  # [0, H, Dh]
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)  # [B] first packed row of each sample
        # The plan, built on the host from Python ints: all buckets laid out one after another,
        # bucket g as a [G, W] block of packed-row indices (padding repeats a sample's last row).
        index, valid, shapes = [], [], []
        for group in groups:
            lens = torch.tensor([lengths[i] for i in group])  # [G]
            width = int(lens.max())
            pos = torch.arange(width)  # [W]
            index.append(starts[group][:, None] + torch.minimum(pos, lens[:, None] - 1))  # [G, W]
            valid.append(pos < lens[:, None])  # [G, W]
            shapes.append((len(group), width))
        index = torch.cat([i.flatten() for i in index])  # [P] P = Σ G·W padded slots
        valid_flat = torch.cat([m.flatten() for m in valid])  # [P]
        back = torch.empty(q.shape[0], dtype=torch.long)  # [N] slot of each packed row
        back[index[valid_flat]] = torch.nonzero(valid_flat).flatten()  # [N]
        index = index.to(q.device, non_blocking=True)  # [P]
        back = back.to(q.device, non_blocking=True)  # [N]

        # One gather per input (so one scatter in backward), then a view per bucket.
        sizes = [g * w for g, w in shapes]
        qb, kb, vb = (x[index].split(sizes) for x in (q, k, v))  # buckets × [G·W, H, Dh]
        outs = []
        for (g, w), m, qs, ks, vs in zip(shapes, valid, qb, kb, vb):
            bucket = lambda x: x.view(g, w, *x.shape[1:]).transpose(1, 2)  # [G, H, W, Dh]
            mask = None  # equal lengths need no mask, so the fused is_causal path runs
            if not bool(m.all()):
                mask = _pad_mask(m.sum(1).to(q.device), w, causal)  # [G, 1, W, W]
            o = _sdpa(bucket(qs), bucket(ks), bucket(vs), causal, mask)  # [G, H, W, Dh]
            outs.append(o.transpose(1, 2).flatten(0, 1))  # [G·W, H, Dh]
        return torch.cat(outs)[back]  # [P, H, Dh] → [N, H, Dh] real rows, packed order


@_backend("njt")
class Nested(AttentionBackend):
    """Nested jagged tensors (layout=torch.jagged) + SDPA: no padding, one call; no causal on CPU."""

    def unavailable_reason(self, device, requires_grad, causal=False):
        if causal and device.type != "cuda":
            return ("nested-tensor SDPA has no causal kernel on CPU (only the CUDA flash/efficient "
                    "kernels take is_causal with jagged inputs); use 'bucketed' or 'loop'")
        return None

    def forward(self, q, k, v, cu_seqlens, max_seqlen, causal, seqlens):
        offsets = cu_seqlens.long()  # [B+1]
        min_seqlen = min(seqlens) if seqlens else None  # passing both bounds avoids a sync

        def jagged(x: torch.Tensor) -> torch.Tensor:
            nt = torch.nested.nested_tensor_from_jagged(
                x, offsets, min_seqlen=min_seqlen, max_seqlen=max_seqlen)  # [B, j, H, Dh]
            return nt.transpose(1, 2)  # [B, H, j, Dh]

        with warnings.catch_warnings():  # the CPU math path unbinds via the old strided layout,
            warnings.filterwarnings("ignore", "The PyTorch API of nested tensors")  # which warns
            o = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v),
                                               is_causal=causal)  # [B, H, j, Dh]
        return o.transpose(1, 2).values()  # [N, H, Dh]


def _import_flex() -> tuple[Callable, Callable] | str:
    """(flex_attention, create_block_mask), or the import error as a string."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # older torch, or a broken build
        return f"torch.nn.attention.flex_attention does not import ({exc})"
    return flex_attention, create_block_mask


@_backend("flex")
class Flex(AttentionBackend):
    """FlexAttention with a document-id block mask: one call, skips empty blocks; no CPU backward."""

    def unavailable_reason(self, device, requires_grad, causal=False):
        flex = _import_flex()
        if isinstance(flex, str):
            return flex
        if device.type == "cpu" and requires_grad:
            return ("FlexAttention has no backward on CPU; use it for inference only "
                    "(no_grad) or choose 'bucketed'")
        return None

    def forward(self, q, k, v, cu_seqlens, max_seqlen, causal, seqlens):
        flex_attention, create_block_mask = _import_flex()
        n = q.shape[0]
        lengths = torch.diff(cu_seqlens.long())  # [B]
        doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths,
                                      output_size=n)  # [N] sample id of every token

        def same_doc(b, h, qi, ki):
            keep = doc[qi] == doc[ki]  # same sample
            return keep & (ki <= qi) if causal else keep  # and, if causal, not in the future

        block_mask = create_block_mask(same_doc, None, None, n, n, device=q.device)
        one = lambda x: x.transpose(0, 1)[None]  # [N, H, Dh] → [1, H, N, Dh]
        if q.device.type == "cuda":  # the fused Triton kernel exists only when compiled
            # (untested here: the dev machine has no GPU; benchmark it before relying on it)
            flex_attention = _compiled(flex_attention)
        with warnings.catch_warnings():  # eager (uncompiled) flex warns that it is unfused
            warnings.simplefilter("ignore", UserWarning)
            o = flex_attention(one(q), one(k), one(v), block_mask=block_mask)  # [1, H, N, Dh]
        return o[0].transpose(0, 1)  # [N, H, Dh]


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    """`torch.compile(fn)`, made once per process (compilation is slow; the result is reused)."""
    return torch.compile(fn, dynamic=True)


def _varlen_kernel() -> Callable | None:
    """The flash varlen kernel with signature (q, k, v, cu, cu, max, max, causal) → out, if any."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        varlen_attn = None
    if varlen_attn is not None:
        return lambda q, k, v, cu, m, causal: varlen_attn(
            q, k, v, cu, cu, m, m, window_size=(-1, 0) if causal else (-1, -1))
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return lambda q, k, v, cu, m, causal: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=causal)


@_backend("flash-varlen")
class FlashVarlen(AttentionBackend):
    """Flash-attention varlen kernel on cu_seqlens: no padding, one launch; CUDA with fp16/bf16 only."""

    def unavailable_reason(self, device, requires_grad, causal=False):
        if device.type != "cuda":
            return f"flash varlen attention needs a CUDA device (got {device.type})"
        if not torch.cuda.is_available():
            return "torch reports no usable CUDA device"
        if _varlen_kernel() is None:
            return "neither torch.nn.attention.varlen nor the flash_attn package is installed"
        return None

    def forward(self, q, k, v, cu_seqlens, max_seqlen, causal, seqlens):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise MMToolError(f"attention backend 'flash-varlen' needs float16 or bfloat16 inputs "
                              f"(got {q.dtype}); run under autocast or pick 'flex'/'bucketed'")
        cu = cu_seqlens.to(torch.int32)  # [B+1]
        return _varlen_kernel()(q, k, v, cu, max_seqlen, causal)  # [N, H, Dh]


def get_backend(name: str, device: torch.device | str, requires_grad: bool,
                causal: bool = False) -> AttentionBackend:
    """Returns backend `name` after checking that it runs on `device`.

    Raises:
        MMToolError: the name is unknown (with close matches), or the backend cannot run here
            (with the reason and the backends that can).
    """
    backend = ATTENTION.get(name)
    device = torch.device(device)
    reason = backend.unavailable_reason(device, requires_grad, causal)
    if reason is not None:
        ok = [n for n in ATTENTION.names()
              if ATTENTION.get(n).unavailable_reason(device, requires_grad, causal) is None]
        raise MMToolError(f"attention backend {name!r} is unavailable on {device} "
                          f"(requires_grad={requires_grad}): {reason}. Available here: {', '.join(ok)}")
    return backend


def default_backend(device: torch.device | str, requires_grad: bool,
                    dtype: torch.dtype | None = None) -> AttentionBackend:
    """The fastest correct backend for `device`, by a rule backed by `benchmarks/attention.py`.

    * CPU → `bucketed`. Measured on the 2-core dev CPU, torch 2.13, 32 mixed samples (captions
      ~14, text ~70, episodes ~1200 tokens; H=4, Dh=32), forward+backward: bucketed 4-8× faster
      than `padded` (which spends >80% of its score matrix on padding), as fast as `loop` or up to
      2× faster (interleaved comparison), and ~60× faster than `njt`; on 128-256 short samples `loop`
      falls 5-10× behind while bucketed stays within ~1.3× of padded (whose padding is cheap there).
    * CUDA → `flash-varlen` when its kernel is installed and `dtype` is not float32 (None means
      "assume fp16/bf16 autocast", the norm on GPUs): no padding, one launch, no sync. Otherwise
      `bucketed`. Not measured (no GPU on the dev machine); `flex` (compiled) is left out of the
      rule until a GPU run of the benchmark shows where it wins.
    """
    device = torch.device(device)
    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    order = ["flash-varlen"] if device.type == "cuda" and half else []
    for name in order + ["bucketed"]:
        backend = ATTENTION.get(name)
        if backend.is_available(device, requires_grad):
            return backend
    return ATTENTION.get("padded")
