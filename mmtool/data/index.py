"""A token index over preprocessed folders: numpy views of the shard buffers, built once.

Batching must not touch Python objects per sample. So when folders are opened, every shard is
memory-mapped and its Arrow buffers are viewed as flat numpy arrays (zero-copy): the flat `ids`
and `values` of all segments, and per segment its start in those buffers, its token count, its
*stream* (the encoder that will read it, e.g. `text:wordpiece`), and where each of its tokens goes
in the sample's token sequence. A batch is then a handful of vectorized gathers (`batching.py`).

Token placement (`seg_base`, `seg_step`, `seg_stride`): token j of a segment lands at position
`base + (j // step) * stride + j % step` of its sample; trajectory segments interleave as Gato's do
(`mmtool.data.placement` says how, and computes it for a whole shard at once). Separators are tokens
of the data-less `separator` stream.

Each segment also carries its role as a stable integer (`role_code`, `seg_role`), so that a loss
mask can select segments by role (`next-token:roles=assistant` trains on a conversation's
assistant turns only) without a role vocabulary shared between folders.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtool.data import remote
from mmtool.data import shards as store
from mmtool.data.placement import placement
from mmtool.data.schema import SPLITS
from mmtool.errors import MMToolError

SEPARATOR = "separator"
# Config keys that only bound a vocabulary or a length: folders that differ in them still mix.
NON_SEMANTIC = {"vocab_size", "num_classes", "max_tokens", "max_seconds", "max_pixels"}


def role_code(role: str) -> int:
    """The int32 code of a segment role: CRC-32 of its UTF-8 bytes, top bit cleared.

    A pure function of the name, so every folder, run and process agrees on it without a shared
    vocabulary (two roles that collide would be one role for a loss mask: 1 in 2^31 per pair).
    """
    return zlib.crc32(role.encode("utf-8")) & 0x7FFFFFFF


@dataclass
class Stream:
    """One encoder input: all tokens of one (modality, tokenizer) pair.

    Attributes:
        key: "modality:tokenizer", e.g. "text:wordpiece".
        modality: the modality name.
        kind: "ids" (discrete tokens), "values" (vectors of `dim`), or "none" (separators).
        vocab_size: for ids, the largest vocabulary over all folders (None if unknown).
        dim: for values, the vector size.
        config: the tokenizer config shared by every folder.
    """

    key: str
    modality: str
    kind: str
    vocab_size: int | None = None
    dim: int | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Shard:
    """Flat numpy views of one shard (one contiguous record batch) plus derived per-segment arrays.

    A remote shard (`ref` set) keeps its per-sample and per-segment arrays always; its `table`,
    `ids` and `values` are open only while its file is in the shard cache (`TokenIndex.using`
    reopens it, the cache's eviction closes it)."""

    path: Path
    table: pa.Table | None  # keeps the memory map alive
    n: int  # samples
    seg_offsets: np.ndarray  # int64 [n+1]: segments of sample i are seg_offsets[i]:seg_offsets[i+1]
    ids: np.ndarray  # int32 [total ids]
    values: np.ndarray  # float32 [total floats]
    seg_start: np.ndarray  # int64 [G]: first id (ids streams) or first float (values streams)
    seg_ntok: np.ndarray  # int64 [G]: tokens of the segment
    seg_stream: np.ndarray  # int16 [G]: index into `TokenIndex.streams`
    seg_base: np.ndarray  # int64 [G]: token placement, see module docstring
    seg_step: np.ndarray  # int64 [G]
    seg_stride: np.ndarray  # int64 [G]
    seg_role: np.ndarray  # int32 [G]: `role_code` of each segment's role
    sample_len: np.ndarray  # int64 [n]: tokens of each sample, separators included
    sample_steps: np.ndarray  # int64 [n]: timesteps T (0 when not a trajectory)
    sample_sep: np.ndarray  # int64 [n]: position of the first separator
    sample_step_len: np.ndarray  # int64 [n]: tokens per timestep, separator included
    labels: np.ndarray  # int64 [n], -1 when missing
    split: np.ndarray  # int8 [n]: position in `SPLITS` (train, validation, test), -1 for any other
    ref: remote.ShardRef | None = None  # where a remote shard comes from (None: a local file)


@dataclass
class Folder:
    """One preprocessed folder: its manifest and shards (`path` a str URL for a remote folder)."""

    path: Path | str
    manifest: dict[str, Any]
    shards: list[Shard]
    name: str

    @property
    def n(self) -> int:
        return sum(s.n for s in self.shards)


def _list_parts(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1], flat values) of a list array, zero-copy where Arrow allows."""
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    flat = arr.values.to_numpy(zero_copy_only=False)
    return offsets, flat


def _segment_tokens(struct: pa.StructArray) -> dict[str, np.ndarray]:
    """Where each segment's tokens are in the shard's flat buffers: `ids` and `values` (the flat
    buffers), and per segment [G] `has_ids`, `first_dim` and `last_dim` (its shape's leading and
    last entries), `ntok` (tokens) and `start` (first id, or first float)."""
    ids_off, ids = _list_parts(struct.field("ids"))
    val_off, values = _list_parts(struct.field("values"))
    shape_off, shape_flat = _list_parts(struct.field("shape"))
    has_ids = pc.is_valid(struct.field("ids")).to_numpy(zero_copy_only=False)  # [G]
    last_dim = shape_flat[shape_off[1:] - 1].astype(np.int64)  # [G] last shape entry
    first_dim = shape_flat[shape_off[:-1]].astype(np.int64)  # [G] leading shape entry
    ntok = np.where(has_ids, np.diff(ids_off), np.diff(val_off) // np.maximum(last_dim, 1))  # [G]
    start = np.where(has_ids, ids_off[:-1], val_off[:-1])  # [G]
    return {"ids": ids, "values": values, "has_ids": has_ids, "first_dim": first_dim, "last_dim": last_dim,
            "ntok": ntok, "start": start}


def _segment_roles(struct: pa.StructArray) -> tuple[np.ndarray, np.ndarray]:
    """(role of each segment [G] (object; read once per shard), int32 [G] its `role_code`)."""
    role = struct.field("role").to_numpy(zero_copy_only=False)  # [G] object; once per shard
    role_enc = pc.dictionary_encode(struct.field("role"))
    role_lookup = np.array([role_code(r) for r in role_enc.dictionary.to_pylist()] or [0], np.int32)
    seg_role = role_lookup[role_enc.indices.to_numpy(zero_copy_only=False)] if len(struct) \
        else np.zeros(0, np.int32)  # [G]
    return role, seg_role


def _labels(table: pa.Table) -> np.ndarray:
    """int64 [n] each sample's label, -1 when missing."""
    labels = table.column("label").to_numpy(zero_copy_only=False)
    return np.where(pc.is_valid(table.column("label")).to_numpy(zero_copy_only=False),
                    np.nan_to_num(labels.astype(np.float64), nan=-1), -1).astype(np.int64)


def _split_codes(column: pa.ChunkedArray) -> np.ndarray:
    """int8 [n] codes of a shard's `split` column into `SPLITS` (-1: null or any other name)."""
    enc = pc.dictionary_encode(column).combine_chunks()
    lookup = np.array([SPLITS.index(v) if v in SPLITS else -1
                       for v in enc.dictionary.to_pylist()] or [-1], np.int8)  # once per distinct name
    codes = enc.indices.fill_null(0).to_numpy(zero_copy_only=False)
    return np.where(pc.is_valid(enc.indices).to_numpy(zero_copy_only=False), lookup[codes], -1).astype(np.int8)


MAX_VOCAB = 1 << 24
"""Largest vocabulary a stream may declare (16.8M ids: far above any tokenizer mmtool ships)."""
MAX_DIM = 1 << 16
"""Largest vector size a stream may declare."""


def _check_sizes(folder: Any, key: str, conf: Any) -> None:
    """Refuses a tokenizer entry whose sizes would make the model allocate absurd tables (a manifest
    edited by hand, or written by another tool): the error names the folder and the entry."""
    if not isinstance(conf, dict) or not isinstance(conf.get("name"), str):
        raise MMToolError(f"{folder}/manifest.json: tokenizers[{key!r}] must be an object with a 'name'")
    for field_, limit in (("vocab_size", MAX_VOCAB), ("dim", MAX_DIM)):
        value = conf.get(field_)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 1 <= value <= limit):
            raise MMToolError(f"{folder}/manifest.json: tokenizers[{key!r}] {field_} {value!r} is not an "
                              f"integer in [1, {limit}]")


class TokenIndex:
    """Opens preprocessed folders, checks that they can be mixed, and indexes their tokens.

    Args:
        folders: preprocessed folders (each with `manifest.json`), local paths or URLs.
        verify: check every shard's sha256 against its manifest first (reads every byte once).
            Remote shards are verified once as they arrive in the cache, whatever `verify` says.
        cache: a factory of the `remote.ShardCache` that remote folders are read through, called
            only when a folder is remote (None: the default cache folder and limit).

    Raises:
        MMToolError: a missing folder or shard, a corrupt shard, a manifest from a newer schema, or
            folders whose tokenizers disagree.
    """

    def __init__(self, folders: list[str | Path], verify: bool = True, cache=None):
        if not folders:
            raise MMToolError("no data folders given (--data DIR)")
        folders = [remote.local_path(f) for f in folders]
        self.cache: remote.ShardCache | None = None
        if any(isinstance(f, str) for f in folders):
            self.cache = cache() if cache else remote.ShardCache(
                remote.DEFAULT_CACHE_DIR, store.parse_size(remote.DEFAULT_CACHE_LIMIT))
            self._open_lock = threading.Lock()
            self._by_sha: dict[str, list[Shard]] = {}
            self.cache.on_evict(self._close_evicted)
        manifests = []
        for path in folders:
            manifest = store.load_manifest(path)
            if verify:
                store.verify_shards(path, manifest)
            manifests.append(manifest)
        self.streams = self._merge_streams(folders, manifests)
        self.stream_ids = {s.key: i for i, s in enumerate(self.streams)}
        self.folders: list[Folder] = []
        names = [(f.rstrip("/").rsplit("/", 1)[-1] if isinstance(f, str) else f.name) or str(f)
                 for f in folders]
        for path, manifest, name in zip(folders, manifests, names):
            if not manifest["shards"]:
                raise MMToolError(f"{remote.redact(str(path))}: holds no samples (its manifest lists no "
                                  "shard: every record was rejected or the source was empty); leave it out "
                                  "of --data")
            opener = self._open_remote if isinstance(path, str) else \
                lambda folder, s: self._open_shard(folder / s["path"])
            shards = [opener(path, s) for s in manifest["shards"]]
            self.folders.append(Folder(path, manifest, shards, name))
        # Global sample numbering: folder-major, then shard, then row.
        self.shards = [s for f in self.folders for s in f.shards]
        self.shard_start = np.cumsum([0] + [s.n for s in self.shards])  # [n_shards+1]
        self.folder_start = np.cumsum([0] + [f.n for f in self.folders])  # [n_folders+1]
        self._build_global()

    def _build_global(self) -> None:
        """Concatenates per-shard sample and segment arrays into global ones (small: no tokens)."""
        cat = lambda name: np.concatenate([getattr(s, name) for s in self.shards])  # noqa: E731
        self.lengths = cat("sample_len")  # [N] tokens per sample, separators included
        self.steps = cat("sample_steps")  # [N]
        self.sep = cat("sample_sep")  # [N]
        self.step_len = cat("sample_step_len")  # [N]
        self.labels = cat("labels")  # [N]
        self.split = cat("split")  # [N] int8 code into SPLITS (-1: other)
        seg_counts = np.concatenate([np.diff(s.seg_offsets) for s in self.shards])  # [N]
        self.seg_offsets = np.zeros(len(seg_counts) + 1, np.int64)  # [N+1]
        np.cumsum(seg_counts, out=self.seg_offsets[1:])
        self.seg_start = cat("seg_start")  # [G] into the owning shard's ids or values
        self.seg_ntok = cat("seg_ntok")  # [G]
        self.seg_stream = cat("seg_stream").astype(np.int64)  # [G]
        self.seg_base = cat("seg_base")  # [G]
        self.seg_step = cat("seg_step")  # [G]
        self.seg_stride = cat("seg_stride")  # [G]
        self.seg_role = cat("seg_role")  # [G] int32 role codes
        self.seg_shard = np.repeat(np.arange(len(self.shards)),
                                   [len(s.seg_start) for s in self.shards])  # [G]
        self.sample_folder = np.repeat(np.arange(len(self.folders)), self.folder_sizes())  # [N]
        # Which streams each sample uses, as a bitmask (its "modality signature").
        sample_of_seg = np.repeat(np.arange(len(seg_counts)), seg_counts)  # [G]
        self.signature = np.zeros(len(seg_counts), np.int64)  # [N]
        np.bitwise_or.at(self.signature, sample_of_seg, 1 << self.seg_stream)
        self.signature |= np.where(self.steps > 0, 1 << self.stream_ids[SEPARATOR], 0)

    # -- remote shards ---------------------------------------------------------------------------
    def _open_remote(self, folder: str, entry: dict[str, Any]) -> Shard:
        """Fetches (or finds in the cache) one remote shard and indexes it; its token buffers stay
        open until the cache evicts its file."""
        ref = remote.ShardRef(store.shard_path(folder, entry), entry["sha256"], entry["bytes"])
        path = self.cache.acquire(ref)
        try:
            shard = self._open_shard(path)
            shard.ref = ref
            with self._open_lock:
                self._by_sha.setdefault(ref.sha256, []).append(shard)
        finally:
            self.cache.release(ref)
        return shard

    def _close_evicted(self, sha256: str) -> None:
        """Drops the memory maps of a shard whose cached file is being deleted (never a pinned one)."""
        for shard in self._by_sha.get(sha256, ()):
            shard.table, shard.ids, shard.values = None, None, None

    def _reopen(self, shard: Shard, path: Path) -> None:
        table = store.read_shard(path)
        if len(table.to_batches()) != 1:
            table = table.combine_chunks()
        struct = table.column("segments").chunk(0).values
        shard.ids = np.asarray(_list_parts(struct.field("ids"))[1], np.int32)
        shard.values = np.asarray(_list_parts(struct.field("values"))[1], np.float32)
        shard.table = table

    def _remote_shards(self, samples: np.ndarray) -> list[Shard]:
        shards = self.shards
        return [shards[i] for i in np.unique(self.locate(np.asarray(samples))[0]).tolist()
                if shards[i].ref is not None]

    @contextlib.contextmanager
    def _pinned(self, samples: np.ndarray):
        needed = self._remote_shards(samples)
        held = []
        try:
            for shard in needed:
                path = self.cache.acquire(shard.ref)
                held.append(shard)
                with self._open_lock:
                    if shard.table is None:
                        self._reopen(shard, path)
            yield
        finally:
            for shard in held:
                self.cache.release(shard.ref)

    def using(self, samples: np.ndarray):
        """A context in which the shards holding `samples` (global numbers) are open and pinned in
        the cache. A no-op for local folders (they are memory-mapped for good)."""
        return self._pinned(samples) if self.cache is not None else contextlib.nullcontext()

    def prefetch(self, samples: np.ndarray) -> None:
        """Starts fetching, in the background, the remote shards that hold `samples`."""
        if self.cache is not None:
            self.cache.prefetch(s.ref for s in self._remote_shards(samples) if s.table is None)

    # -- opening ---------------------------------------------------------------------------------
    def _merge_streams(self, folders, manifests) -> list[Stream]:
        streams: dict[str, Stream] = {}
        owner: dict[str, str] = {}
        for folder, manifest in zip(folders, manifests):
            for key, conf in manifest.get("tokenizers", {}).items():
                _check_sizes(folder, key, conf)
                modality = key.split("/")[0]
                skey = f"{modality}:{conf['name']}"
                semantic = {k: v for k, v in conf.items() if k not in NON_SEMANTIC}
                kind = "ids" if "vocab_size" in conf else "values"
                if skey not in streams:
                    streams[skey] = Stream(skey, modality, kind, conf.get("vocab_size"),
                                           conf.get("dim"), semantic)
                    owner[skey] = str(folder)
                    continue
                s = streams[skey]
                if s.config != semantic:
                    diff = sorted(k for k in set(s.config) | set(semantic)
                                  if s.config.get(k) != semantic.get(k))
                    raise MMToolError(
                        f"{folder} and {owner[skey]} tokenize {modality} with incompatible "
                        f"{conf['name']} settings ({', '.join(diff)} differ); preprocess them with "
                        "the same --tokenizer options")
                if conf.get("vocab_size") is not None:
                    s.vocab_size = max(s.vocab_size or 0, conf["vocab_size"])
        ordered = sorted(streams.values(), key=lambda s: s.key)
        return ordered + [Stream(SEPARATOR, SEPARATOR, "none", vocab_size=1)]

    def _open_shard(self, path: Path) -> Shard:
        table = store.read_shard(path)
        batches = table.to_batches()
        if len(batches) != 1:  # older writers: fall back to one copy into a single chunk
            table = table.combine_chunks()
        n = table.num_rows
        segs = table.column("segments").chunk(0) if n else None
        if segs is None:
            raise MMToolError(f"{path}: empty shard")
        seg_offsets, _ = _list_parts(segs)
        seg_offsets = seg_offsets - seg_offsets[0]
        struct = segs.values  # [G] structs (already offset-sliced by Arrow)
        tok = _segment_tokens(struct)
        seg_stream = self._segment_streams(path, struct)
        self._check_dims(path, seg_stream, tok["has_ids"], tok["last_dim"])
        role, seg_role = _segment_roles(struct)
        place = placement(seg_offsets, role, tok["first_dim"], tok["ntok"], n)
        return Shard(path=path, table=table, n=n, seg_offsets=seg_offsets.astype(np.int64),
                     ids=np.asarray(tok["ids"], np.int32), values=np.asarray(tok["values"], np.float32),
                     seg_start=tok["start"].astype(np.int64), seg_ntok=tok["ntok"].astype(np.int64),
                     seg_stream=seg_stream, seg_base=place.seg_base, seg_step=place.seg_step,
                     seg_stride=place.seg_stride, seg_role=seg_role.astype(np.int32),
                     sample_len=place.sample_len, sample_steps=place.sample_steps,
                     sample_sep=place.sample_sep, sample_step_len=place.sample_step_len,
                     labels=_labels(table), split=_split_codes(table.column("split")))

    def _segment_streams(self, path: Path, struct: pa.StructArray) -> np.ndarray:
        """int16 [G] each segment's stream (its "modality:tokenizer" key in `stream_ids`).

        Raises:
            MMToolError: a key the manifests do not describe.
        """
        keys = pc.binary_join_element_wise(struct.field("modality"), struct.field("tokenizer"), ":")
        enc = pc.dictionary_encode(keys).combine_chunks() if isinstance(keys, pa.ChunkedArray) \
            else pc.dictionary_encode(keys)
        codes = enc.indices.to_numpy(zero_copy_only=False)
        lookup = []
        for key in enc.dictionary.to_pylist():
            if key not in self.stream_ids:
                raise MMToolError(f"{path}: segments of {key!r} are not described in its manifest")
            lookup.append(self.stream_ids[key])
        return np.asarray(lookup, np.int16)[codes] if len(struct) else np.zeros(0, np.int16)

    def _check_dims(self, path: Path, seg_stream: np.ndarray, has_ids: np.ndarray,
                    last_dim: np.ndarray) -> None:
        """Fills each values stream's `dim` from the data and refuses mixed vector sizes."""
        for code in np.unique(seg_stream):
            stream = self.streams[code]
            mine = seg_stream == code
            if stream.kind == "ids":
                if not has_ids[mine].all():
                    raise MMToolError(f"{path}: stream {stream.key} mixes ids and values")
                continue
            dims = np.unique(last_dim[mine])
            if stream.dim is None and len(dims) == 1:
                stream.dim = int(dims[0])
            if len(dims) != 1 or dims[0] != stream.dim:
                found = sorted({int(d) for d in dims} | {stream.dim or 0} - {0})
                raise MMToolError(
                    f"{path}: {stream.key} vectors have sizes {found} across the data; fix the "
                    f"size with --tokenizer options (e.g. image=patches:channels=3) when preprocessing")

    # -- lookup ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.shard_start[-1])

    def folder_sizes(self) -> list[int]:
        """Samples per folder, in the order given."""
        return [f.n for f in self.folders]

    def folder_streams(self, f: int) -> list[Stream]:
        """The streams folder `f`'s samples use: its tokenizers' streams, and the separator when
        it holds trajectories."""
        conf = self.folders[f].manifest.get("tokenizers", {})
        keys = {f"{key.split('/')[0]}:{c['name']}" for key, c in conf.items()}
        start, end = self.folder_start[f], self.folder_start[f + 1]
        keys |= {SEPARATOR} if (self.steps[start:end] > 0).any() else set()
        return [s for s in self.streams if s.key in keys]

    def split_mask(self, splits: list[str] | tuple[str, ...]) -> np.ndarray:
        """bool [N]: samples whose `split` column is one of `splits` (names from `SPLITS`)."""
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise MMToolError(f"--splits {','.join(unknown)}: expected some of {', '.join(SPLITS)}")
        return np.isin(self.split, [SPLITS.index(s) for s in splits])

    def global_index(self, folder: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Global sample numbers of (folder, index-within-folder) pairs."""
        return self.folder_start[folder] + local

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row within shard) of global sample numbers."""
        shard = np.searchsorted(self.shard_start, index, side="right") - 1
        return shard, index - self.shard_start[shard]

    def folder_of(self, index: np.ndarray) -> np.ndarray:
        """Folder number of global sample numbers."""
        return np.searchsorted(self.folder_start, index, side="right") - 1

    def sample_ids(self, index: np.ndarray) -> list[str]:
        """String ids of samples (slow path: for reports and tests)."""
        shard, row = self.locate(np.asarray(index))
        with self.using(np.asarray(index)):
            return [self.shards[s].table.column("id")[int(r)].as_py() for s, r in zip(shard, row)]

    def describe(self) -> dict[str, Any]:
        """Folders, sizes and streams, JSON-ready."""
        return {"folders": [{"path": remote.redact(str(f.path)), "samples": f.n} for f in self.folders],
                "streams": [json.loads(json.dumps(s.__dict__, default=str)) for s in self.streams]}


class RunStreamIndex(TokenIndex):
    """A `TokenIndex` over other folders whose stream list is a trained model's (same numbers, so
    stream k means the model's encoder k), refusing a stream the model never saw or saw tokenized
    differently. Subclasses word the two refusals for their command (`unknown_stream`, `retokenized`).

    Args:
        folders: preprocessed folders (not sha256-verified: they are read for evaluation).
        streams: the model's streams (`UnifiedModel.streams`, `streams.json`).
    """

    def __init__(self, folders: list[str | Path], streams: list[Stream], cache=None):
        self._run_streams = list(streams)
        super().__init__(folders, verify=False, cache=cache)

    def unknown_stream(self, stream: Stream, known: str) -> str:
        """The error for a stream of the folders that the model never saw (`known`: its streams)."""
        return f"stream {stream.key} is one the model never trained on (it knows {known})"

    def retokenized(self, stream: Stream, trained: Stream) -> str:
        """The error for a stream the model saw with other tokenizer settings."""
        return f"{stream.key} is tokenized with other settings than the model's"

    def _merge_streams(self, folders, manifests) -> list[Stream]:
        known = {s.key: s for s in self._run_streams}
        for s in super()._merge_streams(folders, manifests):
            if s.key == SEPARATOR:
                continue
            if s.key not in known:
                raise MMToolError(self.unknown_stream(s, ", ".join(k for k in known if k != SEPARATOR)))
            if known[s.key].config != s.config:
                raise MMToolError(self.retokenized(s, known[s.key]))
        return [copy.copy(s) for s in self._run_streams]
