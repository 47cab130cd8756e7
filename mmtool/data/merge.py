"""`mmtool merge OUT SLICE_DIRS...`: the slices of one job (`mmtool.data.slices`) joined into one
dataset whose shards and manifest are the bytes a one-machine run writes.

`merge` reads the slice manifests, refuses (`slices.check_slices`, one line naming the folder)
anything that would not add up to the one-machine job, then hands the slices, in order, to the
joiner of their kind (`SLICE_KINDS`): `preprocess` here, `embed` in `mmtool.embed.job`. A joiner
concatenates the parts with the one-machine run's own code (`assemble`, `build_manifest`), so the
shards, `rejected.jsonl` and `manifest.json` are the same bytes. `--max-rejected` is checked here on
the whole job (a slice does not fail on its share of bad records: a split run must not refuse what
one run accepts).

What may legitimately differ from a one-machine run's manifest: only `inputs.files[*].mtime_ns`,
when the slices ran on machines whose copies of the inputs have other mtimes (their sha256 are
checked equal; the merged manifest takes slice 0's block). `mmtool embed` identifies a dataset by
its manifest without `inputs`, so a merged folder and a one-machine folder are the same source to
it. The merge only reads the slice folders (unless OUT is one of them: that folder then becomes the
dataset and its slice files and parts are removed), so it can be rerun.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmtool import folders
from mmtool.data import remote
from mmtool.data import shards as store
from mmtool.data.parts import PARTIAL, PLAN, assemble, check_rejected, check_unique_ids
from mmtool.data.preprocess import build_manifest
from mmtool.data.slices import Slice, check_slices, find_slices
from mmtool.errors import MMToolError
from mmtool.io import read_json_object


@dataclass(frozen=True)
class SliceKind:
    """How the slices of one kind of job are joined.

    Args:
        name: the slice manifests' `kind`, and the folder kind `merge` writes (`mmtool.folders`).
        join: `join(out, slices, max_rejected)` writes the shards and the manifest into `out` (claimed
            and locked) from the slices (checked, in order) and returns the manifest.
        fingerprint: the plan fingerprint of a finished manifest of this kind (None: not one).
    """

    name: str
    join: Callable[[Path, list[Slice], float], dict[str, Any]]
    fingerprint: Callable[[dict[str, Any]], str | None]


SLICE_KINDS: dict[str, SliceKind] = {}
"""Registry of the jobs that run in slices, by kind."""


def register_slice_kind(kind: SliceKind) -> SliceKind:
    """Adds a kind to `SLICE_KINDS`."""
    SLICE_KINDS[kind.name] = kind
    return kind


def parts_and_folders(slices: list[Slice]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every part's summary in job order, and the folder holding each part's file."""
    parts = [p for s in slices for p in s.doc["parts"]]
    where = [s.folder / PARTIAL for s in slices for _ in s.doc["parts"]]
    return parts, where


def _join_preprocess(out: Path, slices: list[Slice], max_rejected: float) -> dict[str, Any]:
    """The end of a one-machine preprocess run, over the slices' parts."""
    ref = slices[0].doc
    plan = ref["plan"]
    parts, where = parts_and_folders(slices)
    rejected = [r for p in parts for r in p["rejected"]]
    check_rejected(max_rejected, out, rejected, sum(p["records"] for p in parts))
    shards = assemble(out, where, parts, plan["shard_size"])
    check_unique_ids(out, shards)
    manifest = build_manifest(plan, parts, shards, ref["mapping"], ref["skipped"], ref["inputs"])
    store.atomic_write_json(out / store.MANIFEST, manifest)
    return manifest


register_slice_kind(SliceKind("preprocess", _join_preprocess,
                              lambda m: (m.get("plan") or {}).get("fingerprint")))


def merge(out: str | Path, dirs: list[str | Path], overwrite: bool = False,
          max_rejected: float = 0.01) -> dict[str, Any]:
    """Joins the slices in `dirs` into the dataset folder `out` and returns its manifest.

    Args:
        out: the folder to write (new, a dataset of the same job, or one of `dirs`), or an
            fsspec URL: merged in `remote.staging_dir(out)`, then uploaded (`remote.publish_dataset`).
        dirs: folders holding the finished slices (every slice of one job, each once).
        overwrite: replace a dataset of other settings in `out` (never one of `dirs`).
        max_rejected: refuse when more than this fraction of all records was rejected.

    Returns:
        The manifest, plus `slices` (K), `folders` (the slice folders) and `seconds`.

    Raises:
        MMToolError: see `slices.find_slices` and `slices.check_slices`; an `out` that holds another
            dataset or is being written; too many rejected records; duplicate sample ids.
    """
    start = time.perf_counter()
    if remote.is_remote(out):  # merged in a local staging folder, then uploaded, manifest last
        staging = remote.staging_dir(str(out))
        manifest = merge(staging, dirs, overwrite=overwrite, max_rejected=max_rejected)
        return remote.publish_dataset(staging, str(out), manifest)
    if not dirs:
        raise MMToolError("mmtool merge OUT SLICE_DIRS...: give at least one slice folder")
    if not 0 <= max_rejected <= 1:
        raise MMToolError(f"--max-rejected {max_rejected}: expected a fraction in [0, 1] (e.g. 0.01)")
    slices = check_slices(find_slices(dirs))
    kind = SLICE_KINDS.get(slices[0].doc["kind"])
    if kind is None:
        raise MMToolError(f"{slices[0].path}: slices of kind {slices[0].doc['kind']!r}, which this "
                          f"mmtool cannot merge (it merges {', '.join(sorted(SLICE_KINDS))})")
    out = Path(out)
    in_place = any(out.resolve() == s.folder.resolve() for s in slices)
    if in_place and overwrite:
        raise MMToolError(f"--overwrite: {out} holds slices being merged; --overwrite would delete them")
    with folders.writer(out, kind.name, overwrite=overwrite):
        _check_out(out, kind, slices[0].doc["fingerprint"], in_place)
        manifest = kind.join(out, slices, max_rejected)
        if in_place:  # the folder is a finished dataset now, not slices
            for s in slices:
                if s.folder.resolve() == out.resolve():
                    s.path.unlink(missing_ok=True)
            shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return {**manifest, "slices": len(slices), "folders": sorted({str(s.folder) for s in slices}),
            "seconds": time.perf_counter() - start}


def _check_out(out: Path, kind: SliceKind, fingerprint: str, in_place: bool) -> None:
    """Refuses an `out` that holds a dataset, or an unfinished run, of other settings."""
    old = read_json_object(out / store.MANIFEST)
    if old is not None and kind.fingerprint(old) != fingerprint:
        raise MMToolError(f"{out}: already holds a dataset made with other settings; pass "
                          "--overwrite to replace it")
    plan = read_json_object(out / PARTIAL / PLAN)
    if not in_place and plan is not None and plan.get("fingerprint") != fingerprint:
        raise MMToolError(f"{out}: holds an unfinished run with other settings; pass --overwrite "
                          "to replace it")
