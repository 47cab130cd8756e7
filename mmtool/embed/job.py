"""`mmtool embed`: run a frozen encoder once over a preprocessed folder; the result is an embedding folder.

**An embedding folder is a preprocessed folder.** It has the same Arrow schema, shards and manifest
as its source, row for row and id for id (the join is by sample id and is checked when the folder is
written), with the chosen modality's segments replaced (default) or followed (`keep_original`) by
`embedding` segments: `tokenizer` = the encoder's slug, `values` of shape `[1, dim]` (`pool="mean"`)
or `[n, dim]` (`pool="tokens"`). So `mmtool train --data EMBED_DIR`, `mmtool profile` and every other
reader use it with no new code path: the model's `values` encoder projects the vectors to its width,
as a stream `embedding:<slug>` (e.g. `embedding:minilm-l6`). Why not separate embedding-only shards
joined at load time: a join per batch costs the loader time and a second set of memory maps, and the
folder would not stand on its own; the price is that the other modalities are stored twice.

**The cache.** The manifest's `embedding` block records the encoder, the sha256 of its weights, a
sha256 of everything between a stored segment and its vector (tokenization, truncation, pooling), the
modality, pool and `keep_original`, and the source folder's identity (`content_sha256`: the sha256 of
its manifest without the `inputs` block — the manifest lists every shard's sha256, and the shards are
verified against it on every run; the `inputs` block is left out because a touched but unchanged
raw input rewrites its mtimes there). Their hash is the folder's `fingerprint`. Rerunning with the same
inputs finds the same fingerprint: "up to date", nothing is loaded. A changed encoder, weights,
settings or source changes it: the job says what changed (`notify`) and recomputes — the folder is a
cache of its inputs, so replacing it is always right; `--out` holding anything else (a preprocessed
dataset, the source itself) is refused.

**Resume** works as in `mmtool preprocess` (whose helpers it reuses): rows are embedded in parts of
`part_rows`, each written atomically to `.partial/`; a rerun after an interrupt (even `kill -9`)
reuses finished parts, and shards and the manifest are written last.

**Slices** (`--num-slices K --slice I`): a slice embeds only its block of parts and writes a slice
manifest instead of shards; `mmtool merge` joins the slices with this job's own ending (`_finish`),
so the folder is the one a single run writes (`mmtool.data.slices`, `mmtool.data.merge`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from mmtool import __version__, folders
from mmtool.data import remote
from mmtool.data import shards as store
from mmtool.data.merge import SliceKind, parts_and_folders, register_slice_kind
from mmtool.data.mixture import split_entry
from mmtool.data.parts import PARTIAL, PLAN, assemble, check_unique_ids, finished_parts, merge_counts
from mmtool.data.preprocess import count_sample
from mmtool.data.schema import SCHEMA_VERSION, Sample, Segment, rows_to_samples, samples_to_batch
from mmtool.data.slices import check_slice_flags, slice_parts, slice_writer, write_slice
from mmtool.errors import MMToolError
from mmtool.embed.frozen import POOLS, FrozenEncoder, default_device, resolve_encoder


@dataclass
class EmbedConfig:
    """Everything `mmtool embed` needs; the CLI flags map one to one onto these fields."""

    data: Path
    """Source: a preprocessed folder (`mmtool preprocess`)."""
    encoder: str
    """Frozen encoder (`mmtool ls frozen-encoders`): minilm-l6, hf:PATH, checkpoint:RUN[:MODALITY]."""
    out: Path
    """Output folder: the embedding folder (a preprocessed folder with embedding segments), or an
    fsspec URL (s3://, gs://, memory://, ...): built in --staging, then uploaded, manifest last."""
    modality: str | None = None
    """Modality to embed; default: the one modality of the source that the encoder serves."""
    pool: str = "mean"
    """mean: one vector per segment; tokens: one vector per token."""
    keep_original: bool = False
    """Keep the original segments next to their embeddings (default: replace them)."""
    batch_size: int = 64
    """Segments per encoder forward pass."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    part_rows: int = 512
    """Rows per resumable part (part of the plan: changing it restarts an unfinished run)."""
    overwrite: bool = False
    """Start over: remove what an earlier embed wrote in --out (never other files; a folder of
    another kind, or one mmtool did not make, is refused)."""
    num_slices: int | None = None
    """Split the job into this many slices, one per machine or array task (with --slice); join
    them with `mmtool merge` (same hardware and software: the vectors are then the same bytes)."""
    slice: int | None = None
    """Which slice this process embeds, 0 to --num-slices - 1."""
    staging: Path | None = None
    """With a URL --out: the local folder the embeddings are built in before the upload (default:
    ~/.cache/mmtool/staging named by the URL's hash). Kept, so a rerun resumes and re-uploads."""


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _pick_modality(cfg: EmbedConfig, enc: FrozenEncoder, present: list[str]) -> str | None:
    if enc.modalities == ("*",):
        if cfg.modality is not None:
            raise MMToolError(f"--encoder {cfg.encoder} embeds whole samples; to embed only "
                              f"{cfg.modality}, use --encoder {cfg.encoder}:{cfg.modality}")
        return None
    if cfg.modality is not None:
        if cfg.modality not in enc.modalities:
            raise MMToolError(f"--encoder {cfg.encoder} serves {', '.join(enc.modalities)}, not "
                              f"{cfg.modality} (--modality {cfg.modality})")
        if cfg.modality not in present:
            raise MMToolError(f"{cfg.data} has no {cfg.modality} segments (it has "
                              f"{', '.join(present)}); nothing to embed")
        return cfg.modality
    served = [m for m in enc.modalities if m in present]
    if not served:
        raise MMToolError(f"--encoder {cfg.encoder} serves {', '.join(enc.modalities)}, but {cfg.data} "
                          f"has only {', '.join(present)}; pick another encoder")
    if len(served) > 1:
        raise MMToolError(f"{cfg.data} has several modalities that --encoder {cfg.encoder} serves "
                          f"({', '.join(served)}); choose one with --modality")
    return served[0]


def _out_tokenizers(src: dict[str, Any], modality: str | None, keep: bool,
                    stream_conf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the embedding folder's tokenizer configs, source role key → embedding role key)."""
    out = {k: v for k, v in src.items() if keep or (modality is not None and k.split("/")[0] != modality)}
    mapping = {}
    roles = sorted(k for k in src if modality is None or k.split("/")[0] == modality)
    if modality is None:
        roles = ["*/sample"]
    for key in roles:
        role = key.split("/", 1)[1].split(":")[0]
        new = f"embedding/{role}"
        if new in out and out[new].get("name") != stream_conf["name"]:
            new = f"{new}:{stream_conf['name']}"
        out[new] = dict(stream_conf)
        mapping[key] = new
    return dict(sorted(out.items())), mapping


def _embed_samples(samples: list[Sample], vectors: list[list[np.ndarray]], modality: str | None,
                   keep: bool, slug: str) -> list[Sample]:
    """New samples: the modality's segments replaced (or followed) by their embedding segments."""
    out = []
    for s, vecs in zip(samples, vectors):
        if modality is None:  # whole-sample encoder: one vector for the sample
            emb = Segment("embedding", "sample", slug, vecs[0].shape, values=vecs[0])
            segs = [*s.segments, emb] if keep else [emb]
        else:
            segs, it = [], iter(vecs)
            for seg in s.segments:
                if seg.modality != modality:
                    segs.append(seg)
                    continue
                if keep:
                    segs.append(seg)
                v = next(it)
                if v is not None:
                    segs.append(Segment("embedding", seg.role, slug, v.shape, values=v))
        out.append(Sample(s.id, s.source, s.task, s.split, segs, s.label, s.meta))
    return out


def _same_source(folder: Path, recorded: dict[str, Any]) -> bool:
    """Whether `folder` is the source recorded in an embedding block (by content, or by the manifest
    file's sha256 for blocks written before content keys)."""
    if "content_sha256" in recorded:
        return store.content_sha256(store.load_manifest(folder)) == recorded["content_sha256"]
    return store.sha256_file(folder / store.MANIFEST) == recorded.get("manifest_sha256")


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two `embedding` blocks, in words."""
    words = []
    if old.get("encoder") != new["encoder"]:
        words.append(f"encoder {old.get('encoder')} → {new['encoder']}")
    elif old.get("weights_sha256") != new["weights_sha256"]:
        words.append(f"encoder weights changed (sha256 {str(old.get('weights_sha256'))[:12]} → "
                     f"{new['weights_sha256'][:12]})")
    then = old.get("source", {}).get("content_sha256")
    if then is None:
        words.append("made by an older mmtool (source identity by manifest file)")
    elif then != new["source"]["content_sha256"]:
        words.append(f"source {new['source']['path']} changed (content sha256 {then[:12]} → "
                     f"{new['source']['content_sha256'][:12]})")
    if old.get("preprocessing_sha256") != new["preprocessing_sha256"]:
        words.append("tokenization/preprocessing settings changed")
    for key in ("modality", "pool", "keep_original", "part_rows"):
        if old.get(key) != new[key]:
            words.append(f"{key} {old.get(key)} → {new[key]}")
    return words or ["settings changed"]


def _prepare(cfg: EmbedConfig, block: dict[str, Any], notify: Callable[[str], None]) -> dict | None:
    """Returns the finished manifest on a cache hit; otherwise clears what is stale and returns None."""
    out = Path(cfg.out)
    manifest_path, partial = out / store.MANIFEST, out / PARTIAL
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if "embedding" not in old and not cfg.overwrite:
            raise MMToolError(f"--out {out}: holds a dataset that is not an embedding folder; choose "
                              "another --out, or pass --overwrite to replace it")
        if old.get("embedding", {}).get("fingerprint") == block["fingerprint"]:
            try:
                store.verify_shards(out, old)
                return old
            except MMToolError as exc:
                notify(f"cache damaged ({exc}); recomputing")
        elif "embedding" in old:
            notify(f"cache in {out} is stale: {'; '.join(_changes(old['embedding'], block))}; recomputing")
        for path in [manifest_path, out / store.REJECTED, *out.glob("shard-*.arrow")]:
            path.unlink(missing_ok=True)
    if (partial / PLAN).is_file():
        old_plan = json.loads((partial / PLAN).read_text())
        if old_plan.get("fingerprint") != block["fingerprint"]:
            notify(f"discarding an unfinished run in {out} made with other inputs "
                   f"({'; '.join(_changes(old_plan, block))})")
            shutil.rmtree(partial)
            for stale in out.glob("slice-*-of-*.json"):  # its slices' manifests name those parts
                stale.unlink()
    partial.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(partial / PLAN, block)
    return None


def embed(cfg: EmbedConfig, progress: Callable[[int], None] | None = None,
          on_start: Callable[[int], None] | None = None,
          notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Writes (or resumes, or confirms) the embedding folder `cfg.out` and returns its manifest.

    Args:
        cfg: the job.
        progress: called with the number of rows just embedded.
        on_start: called once with the number of rows still to embed.
        notify: called with a sentence when a cache is invalidated or a stale run discarded.

    Returns:
        The manifest, plus `up_to_date` (a cache hit), `resumed_parts` and `seconds`.

    Raises:
        MMToolError: a missing or corrupt source, an unknown encoder or missing model folder, an
            encoder that does not serve the modality, bad flags, a join that loses ids, or an --out
            that mmtool did not make, holds another kind of folder or is being written by another
            process (`mmtool.folders`).
    """
    if remote.is_remote(cfg.out):
        if cfg.num_slices is not None:
            raise MMToolError(f"--out {remote.redact(str(cfg.out))}: a slice is written to a local "
                              "(or shared) folder; `mmtool merge` joins the slices, and may upload")
        staging = remote.staging_dir(str(cfg.out), cfg.staging)
        manifest = embed(dataclasses.replace(cfg, out=staging, staging=None), progress, on_start, notify)
        return remote.publish_dataset(staging, str(cfg.out), manifest)
    notify = notify or (lambda _msg: None)
    start = time.perf_counter()
    if cfg.pool not in POOLS:
        raise MMToolError(f"--pool {cfg.pool!r}: expected one of {', '.join(POOLS)}")
    if cfg.batch_size < 1 or cfg.part_rows < 1:
        raise MMToolError("--batch-size must be at least 1")
    check_slice_flags(cfg.num_slices, cfg.slice)
    src_dir, out = Path(cfg.data), Path(cfg.out)
    if src_dir.resolve() == out.resolve():
        raise MMToolError(f"--out {out} is the source folder; embeddings go to a folder of their own")
    folders.inspect(cfg.out, "embed")  # refuse a foreign --out before loading anything
    source = store.load_manifest(src_dir)
    store.verify_shards(src_dir, source)
    enc = resolve_encoder(cfg.encoder)
    modality = _pick_modality(cfg, enc, list(source.get("modalities", {})))
    ident = enc.identity(modality, source.get("tokenizers", {}))
    stream_conf = {"name": enc.slug, "encoder": cfg.encoder, "dim": enc.dim, "pool": cfg.pool,
                   "weights_sha256": ident["weights_sha256"]}
    block = {"encoder": cfg.encoder, "slug": enc.slug, "dim": enc.dim, "modality": modality,
             "pool": cfg.pool, "keep_original": cfg.keep_original, "part_rows": cfg.part_rows,
             "weights_sha256": ident["weights_sha256"],
             "preprocessing_sha256": _sha(ident["preprocessing"]),
             "preprocessing": ident["preprocessing"],
             "source": {"path": str(src_dir.resolve()), "rows": source["rows"],
                        "content_sha256": store.content_sha256(source)}}
    # The path is recorded, not hashed: a moved but identical source is still a cache hit.
    block["fingerprint"] = _sha({**{k: v for k, v in block.items() if k != "source"},
                                 "source": block["source"]["content_sha256"],
                                 "schema_version": SCHEMA_VERSION})[:16]
    with slice_writer(cfg.out, "embed", cfg.overwrite, cfg.num_slices, cfg.slice) as claim:
        if claim.foreign:
            notify(f"kept {len(claim.foreign)} file(s) in {cfg.out} that mmtool did not write: "
                   f"{', '.join(claim.foreign[:5])}")
        return _write(cfg, block, source, src_dir, enc, modality, stream_conf, start, progress,
                      on_start, notify)


def _write(cfg: EmbedConfig, block: dict[str, Any], source: dict[str, Any], src_dir: Path,
           enc: Any, modality: str | None, stream_conf: dict[str, Any], start: float,
           progress: Callable[[int], None] | None, on_start: Callable[[int], None] | None,
           notify: Callable[[str], None]) -> dict[str, Any]:
    """The job inside its claimed, locked folder: confirm the cache or embed the missing parts
    (all, or one slice's), then assemble (or, for a slice, write its slice manifest)."""
    out = Path(cfg.out)
    if cfg.num_slices is not None and (out / store.MANIFEST).is_file():
        raise MMToolError(f"--out {out}: holds a finished embedding folder, not slices; choose "
                          f"another --out for --slice {cfg.slice}")
    done = _prepare(cfg, block, notify)
    if done is not None:
        return {**done, "up_to_date": True, "resumed_parts": 0, "seconds": time.perf_counter() - start}

    partial = out / PARTIAL
    table = store.read_folder(src_dir)
    n = table.num_rows
    bounds = [(a, min(a + cfg.part_rows, n)) for a in range(0, n, cfg.part_rows)]
    owned = range(len(bounds)) if cfg.num_slices is None else \
        slice_parts(len(bounds), cfg.num_slices, cfg.slice)
    finished, _ = finished_parts(partial, {k: "" for k in owned})  # no part keys: the fingerprint covers all
    todo = [k for k in owned if k not in finished]
    if on_start:
        on_start(sum(b - a for k, (a, b) in enumerate(bounds) if k in todo))
    tokenizers, _ = _out_tokenizers(source.get("tokenizers", {}), modality, cfg.keep_original, stream_conf)
    if todo:
        enc.load(default_device() if cfg.device == "auto" else cfg.device)
    for k in todo:
        a, b = bounds[k]
        samples = rows_to_samples(table.slice(a, b - a))
        vectors = enc.encode(samples, modality, cfg.pool, source.get("tokenizers", {}), cfg.batch_size)
        rows = _embed_samples(samples, vectors, modality, cfg.keep_original, enc.slug)
        stats: dict[str, Any] = {"part": k, "records": len(rows), "rows": len(rows), "rejected": [],
                                 "sources": {}, "modalities": {}, "splits": {},
                                 "tokenizers": tokenizers, "first_id": rows[0].id, "last_id": rows[-1].id}
        for s in rows:
            count_sample(stats, s)
        base = partial / f"part-{k:05d}"
        stats["file"] = store.write_shard(base.with_suffix(".arrow"), [samples_to_batch(rows)])
        store.atomic_write_json(base.with_suffix(".json"), stats)
        finished[k] = stats
        if progress:
            progress(b - a)

    parts = [finished[k] for k in owned]
    resumed = len(owned) - len(todo)
    if cfg.num_slices is not None:
        doc = write_slice(out, "embed", cfg.slice, cfg.num_slices, len(bounds), owned,
                          block["fingerprint"], parts, embedding=block, source=source.get("source"),
                          tokenizers=tokenizers)
        unchanged = doc.pop("unchanged")
        return {**doc, "up_to_date": unchanged and not todo, "resumed_parts": resumed,
                "seconds": time.perf_counter() - start}
    manifest = _finish(out, [partial] * len(parts), parts, block, source.get("source"), tokenizers,
                       src_dir, table)
    shutil.rmtree(partial, ignore_errors=True)
    return {**manifest, "up_to_date": False, "resumed_parts": resumed,
            "seconds": time.perf_counter() - start}


def _finish(out: Path, where: list[Path], parts: list[dict[str, Any]], block: dict[str, Any],
            source_block: Any, tokenizers: dict[str, Any], src_dir: Path,
            table: pa.Table | None = None) -> dict[str, Any]:
    """Joins every part (the files in `where`) into shards, checks the join with the source and
    writes the manifest: the end of a one-machine run and of `mmtool merge`."""
    totals = merge_counts(parts)
    shards = assemble(out, where, parts, store.parse_size("64MB"))
    check_unique_ids(out, shards)
    check_join(out, src_dir, shards=shards, table=table)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "mmtool_version": __version__,
        "source": source_block,
        "records": totals["records"],
        "rows": totals["rows"],
        "rejected": 0,
        "sources": totals["sources"],
        "modalities": totals["modalities"],
        "splits": totals["splits"],
        "tokenizers": tokenizers,
        "shards": shards,
        "embedding": block,
    }
    store.atomic_write_json(out / store.MANIFEST, manifest)
    return manifest


def _join_slices(out: Path, slices: list[Any], _max_rejected: float) -> dict[str, Any]:
    """`mmtool merge` of embedding slices: the end of a one-machine run over their parts (the
    source folder must be where the slices found it: the join with it is checked)."""
    ref = slices[0].doc
    src_dir = Path(ref["embedding"]["source"]["path"])
    if not (src_dir / store.MANIFEST).is_file():
        raise MMToolError(f"{slices[0].folder}: its source {src_dir} is missing (no {store.MANIFEST}); "
                          "merge where the embedded folder is, to check the join")
    parts, where = parts_and_folders(slices)
    return _finish(out, where, parts, ref["embedding"], ref["source"], ref["tokenizers"], src_dir)


register_slice_kind(SliceKind("embed", _join_slices,
                              lambda m: (m.get("embedding") or {}).get("fingerprint")))


def check_join(embed_dir: str | Path, source_dir: str | Path, shards: list[dict] | None = None,
               table: pa.Table | None = None) -> None:
    """Refuses an embedding folder whose sample ids are not its source's, in the same order."""
    embed_dir = Path(embed_dir)
    shards = shards if shards is not None else store.load_manifest(embed_dir)["shards"]
    mine = pa.chunked_array([store.read_shard(embed_dir / s["path"]).column("id") for s in shards],
                            pa.string())
    theirs = (table if table is not None else store.read_folder(source_dir)).column("id")
    if len(mine) == len(theirs) and mine.equals(theirs):
        return
    a, b = set(mine.to_pylist()), set(theirs.to_pylist())
    missing, extra = sorted(b - a), sorted(a - b)
    detail = []
    if missing:
        detail.append(f"{len(missing)} source ids have no embedding (e.g. {missing[0]!r})")
    if extra:
        detail.append(f"{len(extra)} embedding ids are not in the source (e.g. {extra[0]!r})")
    if not detail:
        detail.append("the same ids in another order")
    raise MMToolError(f"{embed_dir} does not match its source {source_dir}: {'; '.join(detail)}; "
                      f"rerun `mmtool embed {source_dir} --out {embed_dir} ...`")


def embedding_block(folder: str | Path) -> dict[str, Any]:
    """The `embedding` block of an embedding folder's manifest (refusing other folders)."""
    manifest = store.load_manifest(folder)
    if "embedding" not in manifest:
        raise MMToolError(f"{folder} is not an embedding folder (no `embedding` block in its "
                          "manifest); make one with `mmtool embed DATA --encoder NAME --out DIR`")
    return manifest["embedding"]


def verify_embedding(embed_dir: str | Path, source_dir: str | Path | None = None) -> dict[str, Any]:
    """Checks an embedding folder against its source: same manifest sha256, same ids.

    Args:
        embed_dir: the embedding folder.
        source_dir: its source (default: the path recorded when it was made).

    Raises:
        MMToolError: not an embedding folder, a missing source, a source changed since embedding
            (sha256 mismatch), or ids that do not join.
    """
    block = embedding_block(embed_dir)
    source_dir = Path(source_dir or block["source"]["path"])
    if not (source_dir / store.MANIFEST).is_file():
        raise MMToolError(f"{embed_dir}: its source {source_dir} is missing (no {store.MANIFEST})")
    key = "content_sha256" if "content_sha256" in block["source"] else "manifest_sha256"
    now = store.content_sha256(store.load_manifest(source_dir)) if key == "content_sha256" \
        else store.sha256_file(source_dir / store.MANIFEST)
    if now != block["source"][key]:
        raise MMToolError(
            f"{source_dir} changed since {embed_dir} was embedded from it ({key.replace('_', ' ')} "
            f"{block['source'][key][:12]} then, {now[:12]} now); rerun "
            f"`mmtool embed {source_dir} --encoder {block['encoder']} --out {embed_dir}`")
    check_join(embed_dir, source_dir)
    return block


# ---------------------------------------------------------------------------------------------
# Training on embeddings: `mmtool train --embeddings DIR` and `--text-encoder frozen:NAME`


def resolve_training_data(data: list[str], embeddings: list[str] | None = None,
                          text_encoder: str | None = None, cache: str | Path = "embeddings",
                          progress_factory: Callable[[str], dict] | None = None,
                          notify: Callable[[str], None] | None = None) -> list[str]:
    """The `--data` list with embedding folders in place of the folders they were made from.

    * `embeddings`: each folder replaces the `--data` folder it was embedded from (matched by path
      or by manifest sha256, keeping its weight), after `verify_embedding` (a changed source or
      ids that do not join are errors); one whose source is not in `--data` is added.
    * `text_encoder`: "learned" (default: no change) or "frozen:NAME" — every `--data` folder with
      text is embedded with NAME into `cache/<folder>-<slug>` (a cache hit when already there) and
      replaced by it.
    """
    out = list(data)
    notify = notify or (lambda _msg: None)
    for emb in embeddings or []:
        block = embedding_block(emb)
        recorded = Path(block["source"]["path"])
        match = None
        for i, entry in enumerate(out):
            path, _ = split_entry(entry)
            p = Path(path)
            if not (p / store.MANIFEST).is_file():
                continue
            if p.resolve() == recorded or _same_source(p, block["source"]):
                match = i
                break
        if match is None:
            out.append(str(emb))
            continue
        path, weight = split_entry(out[match])
        verify_embedding(emb, path)
        out[match] = f"{emb}{weight}"
    if text_encoder and text_encoder != "learned":
        kind, _, name = text_encoder.partition(":")
        if kind != "frozen" or not name:
            raise MMToolError(f"--text-encoder {text_encoder!r}: expected learned or frozen:NAME "
                              "(e.g. frozen:minilm-l6; `mmtool ls frozen-encoders`)")
        enc = resolve_encoder(name)
        for i, entry in enumerate(out):
            path, weight = split_entry(entry)
            p = Path(path)
            if not (p / store.MANIFEST).is_file():
                continue
            manifest = store.load_manifest(p)
            if "text" not in manifest.get("modalities", {}):
                continue
            target = Path(cache) / f"{p.resolve().name}-{enc.slug}"
            cb = progress_factory(str(p)) if progress_factory else {}
            embed(EmbedConfig(data=p, encoder=name, out=target, modality="text"), notify=notify, **cb)
            out[i] = f"{target}{weight}"
    return out
