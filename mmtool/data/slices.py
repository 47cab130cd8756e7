"""`mmtool merge`: the slices of one preprocessing job, run on any machines, joined into one dataset.

How a job is split, and why it joins to the same bytes:

1. `mmtool preprocess SOURCE --num-slices K --slice I --out DIR_I` plans the job exactly as a
   one-machine run does (same records, same *parts*: their size depends only on the plan, see
   `mmtool.data.preprocess`), then runs only slice I's parts: a contiguous block
   (`preprocess.slice_parts`), so that concatenating the slices in order is concatenating every
   part in order. Its parts go to `DIR_I/.partial/` as in any run (a killed slice resumes from its
   finished parts), and last the slice manifest `DIR_I/slice-IIIII-of-KKKKK.json`: K and I, the
   plan with its fingerprint, the `inputs` block, the source's mapping and skipped counts, counts
   (`records == written + rejected`) and every part's summary (key, counts, rejects, file with its
   sha256). A folder without that file is an unfinished slice. Slices may share one `--out` (each
   holds only its own lock) or use one folder each.
2. `merge(OUT, DIRS)` reads the slice manifests in DIRS and refuses, in one line naming the folder,
   anything that would not add up to the one-machine job: a folder with no finished slice, slices
   of other settings (plan fingerprint), another K, other inputs (their content digest), a slice
   given twice, a slice missing, parts that are not the slice's block, a part file missing or
   changed since its slice finished (size and sha256). Then it joins the parts into shards with the
   one-machine run's own code (`_assemble`, `build_manifest`), so the shards, `rejected.jsonl` and
   `manifest.json` are the same bytes. `--max-rejected` is checked here, on the whole job (a slice
   does not fail on its share of bad records, or a split run could refuse what one run accepts).

What may legitimately differ from a one-machine run's manifest: only `inputs.files[*].mtime_ns`,
when the slices ran on machines whose copies of the inputs have other mtimes (their sha256 are
checked equal; the merged manifest takes slice 0's block). `mmtool embed` identifies a dataset by
its manifest without `inputs`, so a merged folder and a one-machine folder are the same source to it.
The merge only reads the slice folders (unless OUT is one of them: then that folder becomes the
dataset and its slice files are removed), so it can be rerun.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtool import folders
from mmtool.data import shards as store
from mmtool.data.inputs import describe_changes
from mmtool.data.preprocess import (PARTIAL, PLAN, _assemble, _check_unique_ids, build_manifest,
                                    check_rejected, slice_file, slice_parts)
from mmtool.errors import MMToolError
from mmtool.io import read_json_object

SLICE_GLOB = "slice-*-of-*.json"


@dataclass
class Slice:
    """One finished slice: its manifest, the folder that holds its parts, and the file."""

    doc: dict[str, Any]
    folder: Path
    path: Path

    @property
    def name(self) -> str:
        return f"slice {self.doc['slice']} of {self.doc['num_slices']}"


def find_slices(dirs: list[str | Path]) -> list[Slice]:
    """The finished slices in `dirs` (a folder may hold several: a shared `--out`).

    Raises:
        MMToolError: a folder given twice, missing, or holding no finished slice, or an unreadable
            slice manifest.
    """
    seen: dict[Path, Path] = {}
    found = []
    for d in map(Path, dirs):
        if d.resolve() in seen:
            raise MMToolError(f"{d}: given twice (as {seen[d.resolve()]} too)")
        seen[d.resolve()] = d
        if not d.is_dir():
            raise MMToolError(f"{d}: no such folder")
        paths = sorted(d.glob(SLICE_GLOB))
        if not paths:
            why = ("an unfinished slice: rerun its `mmtool preprocess ... --slice I` command to "
                   "finish it") if (d / PARTIAL / PLAN).is_file() else "not a slice folder"
            raise MMToolError(f"{d}: holds no finished slice (no slice-IIIII-of-KKKKK.json); {why}")
        for path in paths:
            doc = read_json_object(path)
            if doc is None or not all(isinstance(doc.get(k), int) for k in ("slice", "num_slices")) \
                    or not isinstance(doc.get("plan"), dict) or not isinstance(doc.get("parts"), list):
                raise MMToolError(f"{path}: not a slice manifest of mmtool preprocess")
            found.append(Slice(doc, d, path))
    return found


def check_slices(found: list[Slice], verify: bool = True) -> list[Slice]:
    """Checks that `found` are all the slices of one job, each once; returns them in order.

    Args:
        found: from `find_slices`.
        verify: also check every part file's size and sha256 against its slice manifest.

    Raises:
        MMToolError: one line naming the offending folder (see the module docstring).
    """
    ref = found[0]
    k = ref.doc["num_slices"]
    by_index: dict[int, Slice] = {}
    for s in found:
        if s.doc["fingerprint"] != ref.doc["fingerprint"]:
            raise MMToolError(f"{s.folder}: {s.name} was made with other settings than {ref.folder} "
                              f"(plan fingerprint {s.doc['fingerprint']}, not {ref.doc['fingerprint']}); "
                              "every slice needs the same source, options and flags")
        if s.doc["num_slices"] != k:
            raise MMToolError(f"{s.folder}: holds {s.name}, but {ref.folder} holds {ref.name}; "
                              "every slice needs the same --num-slices")
        if s.doc["inputs"]["digest"] != ref.doc["inputs"]["digest"]:
            raise MMToolError(f"{s.folder}: {s.name} read other inputs than {ref.folder} "
                              f"({describe_changes(ref.doc['inputs'], s.doc['inputs'])})")
        i = s.doc["slice"]
        if i in by_index:
            raise MMToolError(f"{s.folder}: holds slice {i} of {k}, which {by_index[i].folder} "
                              "holds too; give each slice once")
        by_index[i] = s
        _check_parts(s, verify)
    missing = [i for i in range(k) if i not in by_index]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", …" if len(missing) > 10 else "")
        raise MMToolError(f"slice{'s' if len(missing) > 1 else ''} {shown} of {k} missing: not in "
                          f"the folders given ({', '.join(str(s.folder) for s in found[:3])}"
                          f"{', …' if len(found) > 3 else ''}), or unfinished (rerun their commands)")
    return [by_index[i] for i in range(k)]


def _check_parts(s: Slice, verify: bool) -> None:
    """A slice's parts are its block of the plan's parts, and their files are the ones it wrote."""
    doc = s.doc
    owned = slice_parts(doc["parts_total"], doc["num_slices"], doc["slice"])
    if [p.get("part") for p in doc["parts"]] != list(owned):
        raise MMToolError(f"{s.path}: lists parts that are not {s.name}'s block ({owned.start} to "
                          f"{owned.stop - 1} of {doc['parts_total']})")
    for part in doc["parts"]:
        path = s.folder / PARTIAL / part["file"]["path"]
        if not path.is_file():
            raise MMToolError(f"{s.folder}: part file {PARTIAL}/{path.name} of {s.name} is missing; "
                              "rerun that slice's command")
        if path.stat().st_size != part["file"]["bytes"] or \
                (verify and store.sha256_file(path) != part["file"]["sha256"]):
            raise MMToolError(f"{s.folder}: part file {PARTIAL}/{path.name} changed since {s.name} "
                              "finished (size or sha256 differs); rerun that slice's command")


def merge(out: str | Path, dirs: list[str | Path], overwrite: bool = False,
          max_rejected: float = 0.01) -> dict[str, Any]:
    """Joins the slices in `dirs` into the dataset folder `out` and returns its manifest.

    Args:
        out: the dataset folder to write (new, or a dataset of the same job, or one of `dirs`).
        dirs: folders holding the finished slices (every slice of one job, each once).
        overwrite: replace a dataset of other settings in `out` (never one of `dirs`).
        max_rejected: refuse when more than this fraction of all records was rejected.

    Returns:
        The manifest, plus `slices` (K), `folders` (the slice folders) and `seconds`.

    Raises:
        MMToolError: see `find_slices` and `check_slices`; an `out` that holds another dataset or is
            being written; too many rejected records; duplicate sample ids.
    """
    start = time.perf_counter()
    if not dirs:
        raise MMToolError("mmtool merge OUT SLICE_DIRS...: give at least one slice folder")
    if not 0 <= max_rejected <= 1:
        raise MMToolError(f"--max-rejected {max_rejected}: expected a fraction in [0, 1] (e.g. 0.01)")
    slices = check_slices(find_slices(dirs))
    out = Path(out)
    in_place = any(out.resolve() == s.folder.resolve() for s in slices)
    if in_place and overwrite:
        raise MMToolError(f"--overwrite: {out} holds slices being merged; --overwrite would delete them")
    ref = slices[0].doc
    plan = ref["plan"]
    with folders.writer(out, "preprocess", overwrite=overwrite):
        _check_out(out, plan["fingerprint"], in_place)
        parts = [p for s in slices for p in s.doc["parts"]]
        where = [s.folder / PARTIAL for s in slices for _ in s.doc["parts"]]
        rejected = [r for p in parts for r in p["rejected"]]
        check_rejected(max_rejected, out, rejected, sum(p["records"] for p in parts))
        shards = _assemble(out, where, parts, plan["shard_size"])
        _check_unique_ids(out, shards)
        manifest = build_manifest(plan, parts, shards, ref["mapping"], ref["skipped"], ref["inputs"])
        store.atomic_write_json(out / store.MANIFEST, manifest)
        if in_place:  # the folder is a finished dataset now, not slices
            for s in slices:
                if s.folder.resolve() == out.resolve():
                    s.path.unlink(missing_ok=True)
            shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return {**manifest, "slices": len(slices), "folders": sorted({str(s.folder) for s in slices}),
            "seconds": time.perf_counter() - start}


def _check_out(out: Path, fingerprint: str, in_place: bool) -> None:
    """Refuses an `out` that holds a dataset, or an unfinished run, of other settings."""
    old = read_json_object(out / store.MANIFEST)
    if old is not None and (old.get("plan") or {}).get("fingerprint") != fingerprint:
        raise MMToolError(f"{out}: already holds a dataset made with other settings; pass "
                          "--overwrite to replace it")
    plan = read_json_object(out / PARTIAL / PLAN)
    if not in_place and plan is not None and plan.get("fingerprint") != fingerprint:
        raise MMToolError(f"{out}: holds an unfinished run with other settings; pass --overwrite "
                          "to replace it")


__all__ = ["SLICE_GLOB", "Slice", "check_slices", "find_slices", "merge", "slice_file", "slice_parts"]
