"""The peer data loaders of `benchmarks/peers.py`: each one's own writer and own reader.

A sample is a plain dict: `draw` (its position in the mixture's epoch order, int), `label` (int,
-1 when the source has none) and one array per stream it has, named `modality_tokenizer`
(`text_wordpiece` int32 `[n]`, `image_patches` float32 `[n, 16]`, ...). Samples are heterogeneous:
a document has only `text_wordpiece`, a CartPole episode `observation_mulaw`, `action_discrete` and
`reward_raw_float`. Each peer stores them in one of two *forms*:

* ``heterogeneous``: a sample holds only the streams it has (what the data is);
* ``fixed``: every sample holds every stream, absent ones as empty arrays (what a writer that wants
  one structure per sample needs).

A peer lists the forms it tries, in order; `peers.py` writes the first one that works and reports
what broke on the way. Every reader yields batches made by the one shared `pad_collate`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

META = ("draw", "label")


@dataclass(frozen=True)
class Stream:
    """One field of the samples: its dtype and token width (None: one id per token)."""

    name: str
    dtype: str  # "int32" or "float32"
    dim: int | None

    def empty(self) -> np.ndarray:
        return np.zeros((0,) if self.dim is None else (0, self.dim), self.dtype)


def tokens_of(sample: dict, streams: dict[str, Stream]) -> int:
    """Tokens a sample holds (rows of its arrays; separators are not data)."""
    return sum(len(sample[k]) for k in streams if sample.get(k) is not None)


def pad_collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The one padding collate every loader's samples go through.

    Per stream: every sample's tokens padded to the longest in the batch, plus a bool mask; a
    sample without the stream (absent, None or empty) gets an all-False mask row; a stream no
    sample of the batch has is left out. One numpy buffer per stream, filled by row copies.

    Returns:
        `draw` and `label` int64 `[B]`; per stream `NAME` `[B, L(, dim)]` and `NAME.mask` `[B, L]`.
    """
    out = {k: torch.tensor([int(s[k]) for s in samples], dtype=torch.int64) for k in META}
    names = sorted({k for s in samples for k, v in s.items()
                    if k not in META and not k.startswith("__") and v is not None})
    for name in names:
        toks = [None if s.get(name) is None or len(s[name]) == 0 else np.asarray(s[name])
                for s in samples]  # empty: absent (a reader may drop an empty array's width)
        like = next((t for t in toks if t is not None), None)
        if like is None:
            continue
        lengths = np.array([0 if t is None else len(t) for t in toks])  # [B]
        buf = np.zeros((len(toks), int(lengths.max()), *like.shape[1:]), like.dtype)  # [B, L(, dim)]
        for b, t in enumerate(toks):
            if t is not None:
                buf[b, :len(t)] = t
        out[name] = torch.from_numpy(buf)
        out[name + ".mask"] = torch.from_numpy(np.arange(buf.shape[1])[None, :] < lengths[:, None])  # [B, L]
    return out


def in_form(sample: dict, streams: dict[str, Stream], form: str) -> dict:
    """`sample` as stored in `form` (heterogeneous: as is; fixed: every stream, empty if absent)."""
    if form == "heterogeneous":
        return sample
    return {**{k: sample[k] for k in META},
            **{k: sample[k] if k in sample else s.empty() for k, s in streams.items()}}


def _loader(dataset, batch: int, workers: int, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=pad_collate,
                                       num_workers=workers, **kw)


# -- Hugging Face datasets --------------------------------------------------------------------
def _hf_features(streams: dict[str, Stream]):
    import datasets

    feats = {"draw": datasets.Value("int64"), "label": datasets.Value("int64")}
    for k, s in streams.items():
        feats[k] = (datasets.List(datasets.Value(s.dtype)) if s.dim is None  # [n]
                    else datasets.Array2D((None, s.dim), s.dtype))  # [n, dim], n varies
    return datasets.Features(feats)


def hf_write(samples: list[dict], out: Path, form: str, streams: dict[str, Stream]) -> None:
    import datasets

    datasets.disable_progress_bars()
    cols: dict[str, list] = {k: [] for k in (*META, *streams)}
    for s in samples:
        s = in_form(s, streams, form)
        for k in cols:
            v = s.get(k)
            cols[k].append(v.tolist() if isinstance(v, np.ndarray) else v)
    datasets.Dataset.from_dict(cols, features=_hf_features(streams)).save_to_disk(str(out))


def hf_read(out: Path, form: str, streams: dict[str, Stream], batch: int, workers: int) -> Iterable:
    import datasets

    ds = datasets.load_from_disk(str(out)).with_format("torch")  # memory-mapped Arrow
    return _loader(ds, batch, workers)


# -- LitData ----------------------------------------------------------------------------------
def _identity(sample: dict) -> dict:
    return sample


def litdata_write(samples: list[dict], out: Path, form: str, streams: dict[str, Stream]) -> None:
    import litdata

    litdata.optimize(fn=_identity, inputs=[in_form(s, streams, form) for s in samples],
                     output_dir=str(out), chunk_bytes="64MB", num_workers=1, mode="overwrite")


def litdata_read(out: Path, form: str, streams: dict[str, Stream], batch: int, workers: int) -> Iterable:
    import litdata

    ds = litdata.StreamingDataset(str(out))
    return litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=pad_collate)


# -- Mosaic streaming -------------------------------------------------------------------------
def mds_columns(form: str, streams: dict[str, Stream]) -> dict[str, str]:
    """MDS column encodings: `ndarray` per stream, or raw `bytes` for the `fixed-bytes` form."""
    enc = "bytes" if form == "fixed-bytes" else "ndarray"
    return {"draw": "int", "label": "int", **{k: enc for k in streams}}


def mds_write(samples: list[dict], out: Path, form: str, streams: dict[str, Stream]) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns=mds_columns(form, streams), size_limit="64mb") as w:
        for s in samples:
            s = in_form(s, streams, "heterogeneous" if form == "heterogeneous" else "fixed")
            if form == "fixed-bytes":
                s = {k: v.tobytes() if k in streams else v for k, v in s.items()}
            w.write(s)


def mds_read(out: Path, form: str, streams: dict[str, Stream], batch: int, workers: int) -> Iterable:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    class Decoded(StreamingDataset):
        def __getitem__(self, i):  # the bytes form: back to arrays
            s = super().__getitem__(i)
            return {k: np.frombuffer(v, streams[k].dtype).reshape(
                -1, *(() if streams[k].dim is None else (streams[k].dim,))) if k in streams else v
                for k, v in s.items()}

    clean_stale_shared_memory()
    cls = Decoded if form == "fixed-bytes" else StreamingDataset
    ds = cls(local=str(out), batch_size=batch, shuffle=False)
    return _loader(ds, batch, workers, persistent_workers=False)


# -- WebDataset -------------------------------------------------------------------------------
def _wds_sample(s: dict, streams: dict[str, Stream]) -> dict:
    return {"__key__": f"{int(s['draw']):09d}", "draw.cls": int(s["draw"]), "label.cls": int(s["label"]),
            **{f"{k}.npy": s[k] for k in streams if k in s}}


def wds_write(samples: list[dict], out: Path, form: str, streams: dict[str, Stream],
              shards: int = 8) -> None:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(samples) // shards)
    with wds.ShardWriter(str(out / "part-%06d.tar"), maxcount=per, verbose=0) as w:
        for s in samples:
            w.write(_wds_sample(in_form(s, streams, form), streams))


def _from_wds(s: dict) -> dict:
    return {k.split(".")[0]: v for k, v in s.items() if not k.startswith("__")}


def wds_read(out: Path, form: str, streams: dict[str, Stream], batch: int, workers: int) -> Iterable:
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob("part-*.tar"))
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().map(_from_wds)
          .batched(batch, collation_fn=pad_collate, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


# -- Megatron-Energon -------------------------------------------------------------------------
def energon_write(samples: list[dict], out: Path, form: str, streams: dict[str, Stream]) -> None:
    """WebDataset tars, then Energon's own `energon prepare` (index, split, dataset.yaml)."""
    from energon_peer import prepare

    wds_write(samples, out, form, streams)
    prepare(out)


def energon_read(out: Path, form: str, streams: dict[str, Stream], batch: int, workers: int) -> Iterable:
    from energon_peer import loader

    return loader(out, batch, workers, pad_collate)


@dataclass(frozen=True)
class Peer:
    """A peer loader: the module it needs, the forms it tries, its writer and reader."""

    name: str
    module: str
    forms: tuple[str, ...]
    write: Callable[[list[dict], Path, str, dict[str, Stream]], None]
    read: Callable[[Path, str, dict[str, Stream], int, int], Iterable[dict]]

    def missing(self) -> str | None:
        """Why the peer cannot run here (its ImportError), or None."""
        try:
            importlib.import_module(self.module)
        except Exception as e:  # ImportError, or a broken install raising anything at import
            return f"{type(e).__name__}: {e}"
        return None


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("hf-datasets", "datasets", ("heterogeneous", "fixed"), hf_write, hf_read),
    Peer("litdata", "litdata", ("heterogeneous", "fixed"), litdata_write, litdata_read),
    Peer("mosaic-streaming", "streaming", ("heterogeneous", "fixed", "fixed-bytes"), mds_write, mds_read),
    Peer("webdataset", "webdataset", ("heterogeneous",), wds_write, wds_read),
    Peer("megatron-energon", "megatron.energon", ("heterogeneous",), energon_write, energon_read),
)}

