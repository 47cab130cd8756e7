"""`mmtool preprocess`: a source's raw records → tokenized Arrow shards with a manifest.

How a run is organised, and why:

1. The selected record indices (split, then `max_samples`) are cut into fixed-size *parts*. The part
   size depends only on the plan (source, options, tokenizers, shard size), never on `num_proc`, so a
   parallel run writes exactly what a serial one does.
2. Each part is tokenized (in a worker process when `num_proc > 1`) and written atomically to
   `DIR/.partial/part-NNNNN.arrow`, followed by `part-NNNNN.json` with its counts, rejects and *key*:
   the digest of its records' content (`mmtool.data.inputs.part_key`: each record's raw bytes and
   the sha256 of the files it reads). A part with its JSON and the current key is finished; a rerun
   of the same command skips it and redoes the parts whose records changed. After `kill -9`, no
   finished part of unchanged inputs is redone, no unfinished or stale one is trusted.
3. When every part is done, consecutive parts are joined into shards of about `shard_size` bytes,
   then `rejected.jsonl` and finally `manifest.json` are written (each atomically) and `.partial`
   is removed. A folder with a manifest is complete; its `inputs` block (size, mtime_ns, sha256 of
   every file the source reads) is checked on a rerun, which rebuilds when the content changed.

4. `--num-slices K --slice I` runs only slice I's parts, a contiguous block, and writes a slice
   manifest instead of shards; `mmtool merge` joins the K slices into the shards this run would
   write, byte for byte (`mmtool.data.slices`, `mmtool.data.merge`).

Counts always add up: `records == written + rejected` (records read = records that became samples +
records rejected), and `rows >= written`: a long document becomes several samples (`chunked`
records → `chunks` rows, see `mmtool.data.chunking`); text still cut is counted as `truncated`
(records), blank inputs passed over as `skipped` (not records). Before anything is written, the
source's `mapping()` (which column became what, which are ignored) goes into the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmtool import __version__
from mmtool.data import remote
from mmtool.data.parts import (PARTIAL, PLAN, assemble, by_reason, check_rejected, check_unique_ids,
                               finished_parts, merge_counts)
from mmtool.data import shards as store
from mmtool.data.chunking import Chunking, split_options
from mmtool.data.chunking import check as check_chunking
from mmtool.data.inputs import describe_changes, inputs_block, part_key
from mmtool.data.schema import SCHEMA_VERSION, Sample, samples_to_batch
from mmtool.data.slices import check_slice_flags, slice_parts, slice_writer, write_slice
from mmtool.data.sources import build_source
from mmtool.data.sources.base import Source
from mmtool.data.tokenizing import TokenizerSet, parse_tokenizer_overrides, to_samples
from mmtool.errors import MMToolError, RecordError
from mmtool.io import read_json_object

ON_ERROR = ("skip", "raise")


@dataclass
class PreprocessConfig:
    """Everything `mmtool preprocess` needs; the CLI flags map one to one onto these fields."""

    source: str
    """Registered source name (`mmtool ls sources`)."""
    out: Path
    """Output folder for shards, `manifest.json` and `rejected.jsonl`; or a URL of any fsspec
    protocol (s3://, gs://, hf://, ...): written in `staging`, then uploaded, manifest last."""
    staging: Path | None = None
    """Local folder a URL `--out` is written in before its upload (None: a folder under
    ~/.cache/mmtool/staging named by the URL's hash). Kept, so a rerun resumes and re-uploads."""
    options: list[str] = field(default_factory=list)
    """Source options as `key=value` strings (`--opt`)."""
    split: str = "all"
    """Which split to write: all, train, validation or test."""
    max_samples: int | None = None
    """Read at most this many records of the split (rejected records count)."""
    shard_size: str | int = "64MB"
    """Target bytes per shard, e.g. "64MB"."""
    num_proc: int = 1
    """Worker processes; the output is identical for every value."""
    overwrite: bool = False
    """Replace a folder that holds a different or finished dataset (only the files mmtool wrote
    there are removed; a folder mmtool did not make is refused even with --overwrite)."""
    on_error: str = "skip"
    """"skip": log bad records to rejected.jsonl; "raise": stop at the first one."""
    max_rejected: float = 0.01
    """Fail when more than this fraction of records is rejected (on the command line also a
    percentage: `--max-rejected 1%`)."""
    tokenizers: list[str] = field(default_factory=list)
    """Tokenizer overrides, `MODALITY=NAME[:key=value,...]` (`--tokenizer`)."""
    rehash: bool = False
    """Hash every input file instead of trusting unchanged size and mtime_ns."""
    dry_run: bool = False
    """Map and tokenize the first records (`--max-samples`, default 8) and show them; write nothing."""
    num_slices: int | None = None
    """Split the job into this many slices, one per machine or array task (with --slice); each
    writes its parts and a slice manifest, and `mmtool merge` joins them into shards identical to
    a one-machine run's."""
    slice: int | None = None
    """Which slice this process runs, 0 to --num-slices - 1 (e.g. $SLURM_ARRAY_TASK_ID)."""


# ---------------------------------------------------------------------------------------------
# Work on one part (runs in the parent or in a worker process)

_WORKER_CACHE: dict[str, tuple[Source, TokenizerSet, Chunking]] = {}


def _runtime(plan: dict[str, Any]) -> tuple[Source, TokenizerSet, Chunking]:
    key = plan["fingerprint"]
    if key not in _WORKER_CACHE:
        options, chunking = split_options(plan["options"])
        source = build_source(plan["source"], options, split=plan["split"])
        overrides = {m: (n, o) for m, (n, o) in plan["tokenizers"].items()}
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = (source, TokenizerSet(overrides), chunking)
    return _WORKER_CACHE[key]


def _count_record(stats: dict[str, Any], samples: list[Sample], cut: bool) -> None:
    """Counts one written record: its samples, and whether it was chunked or cut."""
    src = stats["sources"].setdefault(samples[0].source, _source_counts())
    src["written"] += 1
    src["truncated"] += cut
    if len(samples) > 1:
        src["chunked"] += 1
        src["chunks"] += len(samples)
    for sample in samples:
        count_sample(stats, sample)


def _source_counts() -> dict[str, int]:
    return {"written": 0, "rows": 0, "tokens": 0, "chunked": 0, "chunks": 0, "truncated": 0}


def count_sample(stats: dict[str, Any], sample: Sample) -> None:
    """Counts one sample (row): its tokens, split and modalities (`embed` counts with it too)."""
    src = stats["sources"].setdefault(sample.source, _source_counts())
    src["rows"] += 1
    src["tokens"] += sample.n_tokens
    stats["splits"][sample.split] = stats["splits"].get(sample.split, 0) + 1
    seen = set()
    for seg in sample.segments:
        mod = stats["modalities"].setdefault(seg.modality, {"rows": 0, "segments": 0, "tokens": 0})
        mod["segments"] += 1
        mod["tokens"] += seg.n_tokens
        if seg.modality not in seen:
            mod["rows"] += 1
            seen.add(seg.modality)


def run_part(plan: dict[str, Any], part: int, indices: list[int], partial_dir: str,
             on_error: str, progress: Callable[[int], None] | None = None,
             key: str = "") -> dict[str, Any]:
    """Tokenizes one part's records and writes `part-NNNNN.arrow` then `part-NNNNN.json` (which
    stores `key`, the digest of the part's records, see `mmtool.data.inputs.part_key`)."""
    source, tokenizers, chunking = _runtime(plan)
    stats: dict[str, Any] = {"part": part, "key": key, "records": len(indices), "rows": 0,
                             "rejected": [], "sources": {}, "modalities": {}, "splits": {}}
    samples: list[Sample] = []
    for n, index in enumerate(indices, 1):
        try:
            record_samples, cut = to_samples(source, tokenizers, index, chunking)
        except RecordError as exc:
            if on_error == "raise":
                raise
            stats["rejected"].append({"index": index, "location": exc.location, "reason": exc.reason})
        else:
            samples += record_samples
            _count_record(stats, record_samples, cut)
        if progress and n % 64 == 0:
            progress(64)
    if progress:
        progress(len(indices) % 64)
    stats["rows"] = len(samples)
    stats["tokenizers"] = tokenizers.configs
    base = Path(partial_dir) / f"part-{part:05d}"
    batches = [samples_to_batch(samples[i:i + 1024]) for i in range(0, len(samples), 1024)]
    stats["file"] = store.write_shard(base.with_suffix(".arrow"), batches)
    store.atomic_write_json(base.with_suffix(".json"), stats)
    return stats


def _worker_init() -> None:
    # Workers are the parallelism: one thread each (read by torch/numpy when first imported).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _pool(num_proc: int) -> ProcessPoolExecutor:
    """A pool of `num_proc` workers forked from a forkserver.

    forkserver: one clean process imports mmtool once, before any thread pool exists, and forks each
    worker from it — safer than fork (torch and OpenMP dislike forking a threaded parent), and much
    cheaper than spawn. On an error, queued parts are cancelled; finished ones stay on disk.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mmtool.data.preprocess"])
    return _CancellingPool(num_proc, mp_context=ctx, initializer=_worker_init)


class _CancellingPool(ProcessPoolExecutor):
    def __exit__(self, *exc_info):
        self.shutdown(wait=True, cancel_futures=True)
        return False


# ---------------------------------------------------------------------------------------------
# Planning, resuming, assembling


def _plan(cfg: PreprocessConfig, source: Source, n_records: int,
          overrides: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The parameters that determine the output; equal plans produce identical folders."""
    plan = {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "options": sorted(cfg.options),
        "resolved_options": json.loads(json.dumps(dataclasses.asdict(source.options), default=str)),
        "split": cfg.split,
        "max_samples": cfg.max_samples,
        "records": n_records,
        "shard_size": store.parse_size(cfg.shard_size),
        "tokenizers": {m: [n, o] for m, (n, o) in sorted(overrides.items())},
        "chunking": split_options(cfg.options)[1].as_dict(),
    }
    plan["fingerprint"] = __import__("hashlib").sha256(
        json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def _part_rows(source: Source, indices: list[int], tokenizers: TokenizerSet, shard_bytes: int,
               chunking: Chunking) -> int:
    """Records per part: about an eighth of a shard, estimated from the first records."""
    sizes = []
    for index in indices[:16]:
        try:
            sizes.append(sum(s.nbytes + 64 for sample in to_samples(source, tokenizers, index, chunking)[0]
                             for s in sample.segments))
        except RecordError:
            continue
    avg = max(float(np.mean(sizes)) if sizes else 1024.0, 1.0)
    return int(min(max(shard_bytes / 8 / avg, 16), 2048))


def _prepare_folder(cfg: PreprocessConfig, plan: dict[str, Any], source: Source,
                    notify: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Resumes, rebuilds or refuses the output folder (claimed and locked already; `--overwrite`
    has removed what an earlier run wrote).

    Returns:
        (the manifest if the folder is complete and its inputs unchanged, else None; the current
        `inputs` block).
    """
    out = Path(cfg.out)
    manifest_path, partial = out / store.MANIFEST, out / PARTIAL
    if manifest_path.is_file():
        old = read_json_object(manifest_path) or {}
        if (old.get("plan") or {}).get("fingerprint") != plan["fingerprint"]:
            raise MMToolError(f"--out {out}: already holds a dataset made with other settings "
                              f"({(old.get('source') or {}).get('name')}); pass --overwrite to replace it")
        inputs = inputs_block(source, old.get("inputs"), cfg.rehash)
        if (old.get("inputs") or {}).get("digest") == inputs["digest"]:
            if old["inputs"] != inputs:  # touched, not changed: record the new mtimes
                old["inputs"] = inputs
                store.atomic_write_json(manifest_path, old)
            return old, inputs
        notify(f"{out}: inputs changed since it was made: "
               f"{describe_changes(old.get('inputs'), inputs)}; rebuilding every part")
        for path in [manifest_path, out / store.REJECTED]:
            path.unlink(missing_ok=True)
    old_plan = read_json_object(partial / PLAN) if (partial / PLAN).is_file() else None
    if old_plan is not None and old_plan.get("fingerprint") != plan["fingerprint"]:
        raise MMToolError(f"--out {out}: holds an unfinished run with other settings; rerun that "
                          "command to finish it, or pass --overwrite to start over")
    inputs = inputs_block(source, (old_plan or {}).get("inputs"), cfg.rehash)
    if old_plan is not None and (old_plan.get("inputs") or {}).get("digest") != inputs["digest"]:
        notify(f"{out}: resuming an unfinished run whose inputs changed: "
               f"{describe_changes(old_plan.get('inputs'), inputs)}")
    partial.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(partial / PLAN, {**plan, "inputs": inputs})
    return None, inputs


def _check_flags(cfg: PreprocessConfig) -> None:
    if cfg.on_error not in ON_ERROR:
        raise MMToolError(f"--on-error {cfg.on_error!r}: expected one of {', '.join(ON_ERROR)}")
    if not 0 <= cfg.max_rejected <= 1:
        raise MMToolError(f"--max-rejected {cfg.max_rejected}: expected a fraction in [0, 1] (e.g. 0.01)")
    if cfg.num_proc < 1:
        raise MMToolError(f"--num-proc {cfg.num_proc}: must be at least 1")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise MMToolError(f"--max-samples {cfg.max_samples}: must be at least 1")
    check_slice_flags(cfg.num_slices, cfg.slice)


def _run_parts(cfg: PreprocessConfig, plan: dict[str, Any], chunks: list[list[int]], partial: Path,
               keys: dict[int, str], progress: Callable[[int], None] | None,
               on_start: Callable[[int], None] | None,
               notify: Callable[[str], None]) -> tuple[list[dict[str, Any]], int]:
    """Runs the parts of `keys` (all, or a slice's) not finished yet, or finished from other inputs
    (keys differ), in this process or a pool; returns (their summaries in order, how many an
    earlier run had finished)."""
    finished, stale = finished_parts(partial, keys)
    todo = [k for k in keys if k not in finished]
    if stale:
        notify(f"{stale} of {stale + len(finished)} finished parts read changed inputs; redoing "
               f"them ({len(finished)} kept)")
    if on_start:
        on_start(sum(len(chunks[k]) for k in todo))
    if cfg.num_proc == 1 or len(todo) <= 1:
        for k in todo:
            finished[k] = run_part(plan, k, chunks[k], str(partial), cfg.on_error, progress, keys[k])
    else:
        with _pool(cfg.num_proc) as pool:
            futures = {pool.submit(run_part, plan, k, chunks[k], str(partial), cfg.on_error, None,
                                   keys[k]): k for k in todo}
            for fut in futures:  # in submission order; results are small
                finished[futures[fut]] = fut.result()
                if progress:
                    progress(len(chunks[futures[fut]]))
    return [finished[k] for k in keys], len(keys) - len(todo)


def preprocess(cfg: PreprocessConfig, progress: Callable[[int], None] | None = None,
               on_start: Callable[[int], None] | None = None,
               notify: Callable[[str], None] | None = None,
               on_mapping: Callable[[list[Any]], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes, or confirms) a preprocessing job and returns its manifest.

    Phases: check the flags → plan (source, tokenizers, fingerprint) → claim and lock the folder
    (`mmtool.folders.writer`: refuses a folder mmtool did not make, and a second writer) → confirm
    an up-to-date folder or prepare it → run the unfinished parts → check the rejects → assemble
    the shards → manifest.

    Args:
        cfg: the job.
        progress: called with the number of records just finished.
        on_start: called once with the number of records still to process.
        notify: called with a sentence when inputs changed (which, and how many parts are redone).
        on_mapping: called with the source's `mapping()` (`MappingRow`s) before anything is written.

    Returns:
        The manifest; `manifest["resumed_parts"]` says how many parts an earlier run had finished
        and `manifest["up_to_date"]` is True when the folder was already complete;
        `manifest["kept_foreign"]` lists files in the folder that mmtool did not write and
        `--overwrite` therefore left in place.

    Raises:
        MMToolError: bad flags, an --out that is not mmtool's or is being written by another
            process, a folder made with other settings, too many rejected records, or
            (with `on_error="raise"`) the first bad record.
    """
    if remote.is_remote(cfg.out) and cfg.num_slices is not None:
        raise MMToolError(f"--out {remote.redact(str(cfg.out))}: a slice is written to a local (or "
                          "shared) folder; `mmtool merge` joins the slices")
    if remote.is_remote(cfg.out):
        return _preprocess_to_url(cfg, progress=progress, on_start=on_start, notify=notify,
                                  on_mapping=on_mapping)
    cfg = dataclasses.replace(cfg, out=remote.local_path(cfg.out))
    _check_flags(cfg)
    start = time.perf_counter()
    overrides = parse_tokenizer_overrides(cfg.tokenizers)
    source_options, chunking = split_options(cfg.options)
    check_chunking(chunking, overrides)
    source = build_source(cfg.source, source_options, split=cfg.split)
    indices = source.indices()[: cfg.max_samples]
    if not indices:
        raise MMToolError(f"source {cfg.source!r} has no records for --split {cfg.split}")
    plan = _plan(cfg, source, len(indices), overrides)
    if on_mapping:
        on_mapping(source.mapping())
    with slice_writer(cfg.out, "preprocess", cfg.overwrite, cfg.num_slices, cfg.slice) as claim:
        manifest = _write(cfg, plan, source, indices, overrides, progress, on_start,
                          notify or (lambda _msg: None))
    manifest["kept_foreign"] = claim.foreign
    if not manifest["up_to_date"]:
        manifest["seconds"] = time.perf_counter() - start
    return manifest


def _preprocess_to_url(cfg: PreprocessConfig, **callbacks: Any) -> dict[str, Any]:
    """`preprocess` into a local staging folder, then `remote.publish_dataset` to the URL (old
    manifest removed first, shards and rejected.jsonl, manifest last). Credentials: the fsspec
    backend's own environment and config files."""
    staging = remote.staging_dir(str(cfg.out), cfg.staging)
    manifest = preprocess(dataclasses.replace(cfg, out=staging, staging=None), **callbacks)
    return remote.publish_dataset(staging, str(cfg.out), manifest)


def _write(cfg: PreprocessConfig, plan: dict[str, Any], source: Source, indices: list[int],
           overrides: dict[str, tuple[str, dict[str, Any]]], progress: Callable[[int], None] | None,
           on_start: Callable[[int], None] | None, notify: Callable[[str], None]) -> dict[str, Any]:
    """The job inside its claimed, locked folder: confirm, resume or run the parts (all, or one
    slice's), then assemble (or, for a slice, write its slice manifest)."""
    out = Path(cfg.out)
    if cfg.num_slices is not None and (out / store.MANIFEST).is_file():
        raise MMToolError(f"--out {out}: holds a finished dataset (manifest.json), not slices; "
                          f"choose another --out for --slice {cfg.slice}")
    done_manifest, inputs = _prepare_folder(cfg, plan, source, notify)
    if done_manifest is not None:
        return {**done_manifest, "up_to_date": True, "resumed_parts": 0}
    partial = out / PARTIAL

    _WORKER_CACHE.clear()
    chunking = Chunking(**plan["chunking"])
    _WORKER_CACHE[plan["fingerprint"]] = (source, TokenizerSet(overrides), chunking)
    rows_per_part = _part_rows(source, indices, _WORKER_CACHE[plan["fingerprint"]][1],
                               plan["shard_size"], chunking)
    chunks = [indices[i:i + rows_per_part] for i in range(0, len(indices), rows_per_part)]
    owned = range(len(chunks)) if cfg.num_slices is None else \
        slice_parts(len(chunks), cfg.num_slices, cfg.slice)
    keys = {k: part_key(source, chunks[k], inputs["files"]) for k in owned}
    parts, resumed = _run_parts(cfg, plan, chunks, partial, keys, progress, on_start, notify)
    mapping, skipped = [row.as_dict() for row in source.mapping()], source.skipped()
    if cfg.num_slices is not None:
        doc = _write_slice(cfg, plan, parts, len(chunks), owned, inputs, mapping, skipped)
        unchanged = doc.pop("unchanged")
        return {**doc, "up_to_date": unchanged and resumed == len(owned), "resumed_parts": resumed}
    rejected = [r for p in parts for r in p["rejected"]]
    check_rejected(cfg.max_rejected, out, rejected, sum(p["records"] for p in parts))
    shards = assemble(out, partial, parts, plan["shard_size"])
    check_unique_ids(out, shards)
    manifest = build_manifest(plan, parts, shards, mapping, skipped, inputs)
    store.atomic_write_json(out / store.MANIFEST, manifest)
    for done in out.glob("slice-*-of-*.json"):  # slices run here are finished by this run
        done.unlink()
    shutil.rmtree(partial, ignore_errors=True)
    return {**manifest, "up_to_date": False, "resumed_parts": resumed}


def build_manifest(plan: dict[str, Any], parts: list[dict[str, Any]], shards: list[dict[str, Any]],
                   mapping: list[dict[str, str]], skipped: dict[str, int],
                   inputs: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a folder assembled from `parts` (every part of `plan`, in order) into
    `shards`: a one-machine run and `mmtool merge` both write exactly this."""
    totals = merge_counts(parts)
    rejected = [r for p in parts for r in p["rejected"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "mmtool_version": __version__,
        "source": {"name": plan["source"], "options": plan["resolved_options"], "split": plan["split"],
                   "max_samples": plan["max_samples"]},
        "records": totals["records"],
        "written": totals["records"] - len(rejected),
        "rows": totals["rows"],
        "rejected": len(rejected),
        "chunked": sum(c.get("chunked", 0) for c in totals["sources"].values()),
        "chunks": sum(c.get("chunks", 0) for c in totals["sources"].values()),
        "truncated": sum(c.get("truncated", 0) for c in totals["sources"].values()),
        "skipped": skipped,
        "rejected_by_reason": by_reason(rejected),
        "mapping": mapping,
        "chunking": plan["chunking"],
        "sources": totals["sources"],
        "modalities": totals["modalities"],
        "splits": totals["splits"],
        "tokenizers": dict(sorted(totals["tokenizers"].items())),
        "shards": shards,
        "plan": plan,
        "inputs": inputs,
    }


def _write_slice(cfg: PreprocessConfig, plan: dict[str, Any], parts: list[dict[str, Any]],
                 n_parts: int, owned: range, inputs: dict[str, Any], mapping: list[dict[str, str]],
                 skipped: dict[str, int]) -> dict[str, Any]:
    """Writes this slice's manifest, with what `build_manifest` will need at the merge."""
    return write_slice(cfg.out, "preprocess", cfg.slice, cfg.num_slices, n_parts, owned,
                       plan["fingerprint"], parts, plan=plan, inputs=inputs, mapping=mapping,
                       skipped=skipped)
