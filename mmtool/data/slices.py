"""Slices: one `mmtool preprocess` or `mmtool embed` job split across machines, any launcher.

A job run with `--num-slices K --slice I --out DIR` plans exactly what a one-machine run plans (the
same records, the same *parts*: their size depends only on the plan), then runs only slice I's
parts: a contiguous block (`slice_parts`), so that the slices in order are every part in order. Its
parts go to `DIR/.partial/` as in any run (a slice killed with `kill -9` resumes from its finished
parts, touching no other slice), and last its slice manifest `DIR/slice-IIIII-of-KKKKK.json`
(`write_slice`): the kind, K and I, the plan fingerprint, counts (`records == written + rejected`)
and every part's summary (key, counts, rejects, file with its sha256), plus what the kind needs to
write the dataset's manifest. A folder without that file holds an unfinished slice. Slices may
share one `--out` (each holds only its own lock, `slice_writer`) or use a folder each.

`find_slices` and `check_slices` read and vet the slices that `mmtool.data.merge` joins.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mmtool import __version__, folders
from mmtool.data.inputs import describe_changes
from mmtool.data.schema import SCHEMA_VERSION
from mmtool.errors import MMToolError
from mmtool.io import atomic_write_json, read_json_object, sha256_file

PARTIAL = folders.PARTIAL
SLICE_GLOB = "slice-*-of-*.json"


def slice_parts(n_parts: int, num_slices: int, index: int) -> range:
    """The parts slice `index` of `num_slices` owns: a contiguous block, sizes differing by at most
    one (a slice owns none when there are fewer parts than slices)."""
    return range(n_parts * index // num_slices, n_parts * (index + 1) // num_slices)


def slice_file(index: int, num_slices: int) -> str:
    """The name of a finished slice's manifest, e.g. `slice-00002-of-00004.json`."""
    return f"slice-{index:05d}-of-{num_slices:05d}.json"


def check_slice_flags(num_slices: int | None, index: int | None) -> None:
    """Refuses `--num-slices`/`--slice` values that name no slice, naming the flag."""
    if num_slices is None and index is not None:
        raise MMToolError(f"--slice {index}: needs --num-slices (how many slices in all)")
    if num_slices is not None:
        if num_slices < 1:
            raise MMToolError(f"--num-slices {num_slices}: must be at least 1")
        if index is None:
            raise MMToolError(f"--num-slices {num_slices}: needs --slice (which slice this "
                              f"process runs, 0 to {num_slices - 1})")
        if not 0 <= index < num_slices:
            raise MMToolError(f"--slice {index}: must be in 0..{num_slices - 1} "
                              f"(--num-slices {num_slices})")


@contextlib.contextmanager
def slice_writer(out: str | Path, kind: str, overwrite: bool, num_slices: int | None,
                 index: int | None) -> Iterator[folders.Claim]:
    """Claims and locks `out`: the whole folder for a one-machine run (or a slice that starts over
    with --overwrite, which clears the folder); for a slice, only that slice's lock, so that the
    slices of one job may share one `--out`."""
    if num_slices is None or overwrite:
        with folders.writer(out, kind, overwrite=overwrite) as claim:
            yield claim
        return
    claim = folders.claim_shared(out, kind)
    with folders.lock(out, name=f".mmtool.{slice_file(index, num_slices)[:-5]}.lock"):
        yield claim


def write_slice(out: str | Path, kind: str, index: int, num_slices: int, parts_total: int,
                owned: range, fingerprint: str, parts: list[dict[str, Any]],
                **extra: Any) -> dict[str, Any]:
    """Writes the slice manifest `out/slice-IIIII-of-KKKKK.json` (last: without it the slice is
    unfinished) unless the same one is there already.

    Args:
        out: the slice's folder (its parts are in `out/.partial`).
        kind: the folder kind ("preprocess", "embed"): which `mmtool.data.merge` joiner joins it.
        index, num_slices: I and K.
        parts_total: how many parts the whole job has.
        owned: this slice's parts (`slice_parts`).
        fingerprint: the job's plan fingerprint: slices join only with slices of the same one.
        parts: the summaries of the owned parts, in order.
        extra: what the kind needs to write the dataset's manifest (plan, inputs, mapping, ...).

    Returns:
        The slice manifest, with `unchanged`: True when the same one was there (nothing rewritten).
    """
    rejected = sum(len(p["rejected"]) for p in parts)
    records = sum(p["records"] for p in parts)
    doc = {"kind": kind, "schema_version": SCHEMA_VERSION, "mmtool_version": __version__,
           "slice": index, "num_slices": num_slices, "parts_total": parts_total,
           "part_range": [owned.start, owned.stop], "records": records,
           "written": records - rejected, "rejected": rejected,
           "rows": sum(p["rows"] for p in parts), "fingerprint": fingerprint, **extra, "parts": parts}
    path = Path(out) / slice_file(index, num_slices)
    unchanged = path.is_file() and read_json_object(path) == json.loads(json.dumps(doc))
    if not unchanged:
        atomic_write_json(path, doc)
    return {**doc, "unchanged": unchanged}


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
            why = ("an unfinished slice: rerun its `--slice I` command to finish it"
                   if (d / PARTIAL / "plan.json").is_file() else "not a slice folder")
            raise MMToolError(f"{d}: holds no finished slice (no slice-IIIII-of-KKKKK.json); {why}")
        for path in paths:
            doc = read_json_object(path)
            if doc is None or not all(isinstance(doc.get(k), int) for k in ("slice", "num_slices")) \
                    or not isinstance(doc.get("parts"), list) or not isinstance(doc.get("kind"), str):
                raise MMToolError(f"{path}: not a slice manifest of mmtool")
            found.append(Slice(doc, d, path))
    return found


def check_slices(found: list[Slice], verify: bool = True) -> list[Slice]:
    """Checks that `found` are all the slices of one job, each once; returns them in order.

    Args:
        found: from `find_slices`.
        verify: also check every part file's sha256 (its size is always checked).

    Raises:
        MMToolError: one line naming the offending folder: slices of another kind, other settings
            (plan fingerprint), another K or other inputs; a slice given twice or missing; parts
            that are not the slice's block, or a part file missing or changed since it was written.
    """
    ref = found[0]
    k = ref.doc["num_slices"]
    by_index: dict[int, Slice] = {}
    for s in found:
        if s.doc["kind"] != ref.doc["kind"] or s.doc["fingerprint"] != ref.doc["fingerprint"]:
            raise MMToolError(f"{s.folder}: {s.name} was made with other settings than {ref.folder} "
                              f"({s.doc['kind']} fingerprint {s.doc['fingerprint']}, not "
                              f"{ref.doc['kind']} {ref.doc['fingerprint']}); every slice needs the "
                              "same source, options and flags")
        if s.doc["num_slices"] != k:
            raise MMToolError(f"{s.folder}: holds {s.name}, but {ref.folder} holds {ref.name}; "
                              "every slice needs the same --num-slices")
        if (s.doc.get("inputs") or {}).get("digest") != (ref.doc.get("inputs") or {}).get("digest"):
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
    """A slice's parts are its block of the job's parts, and their files are the ones it wrote."""
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
                (verify and sha256_file(path) != part["file"]["sha256"]):
            raise MMToolError(f"{s.folder}: part file {PARTIAL}/{path.name} changed since {s.name} "
                              "finished (size or sha256 differs); rerun that slice's command")
