"""Content keys of a preprocessing job: what its source reads, and whether that changed.

Two levels, both built on the source API (`Source.input_files`, `record_key`, `record_files`,
`content_version`):

* **The input table** `{path: {"size", "mtime_ns", "sha256"}}` of every file the source reads
  (a missing file is `{"missing": True}`). It is stored in `manifest.json` ("inputs") and in
  `.partial/plan.json`. A rerun stats every input and hashes only files whose size or mtime_ns
  differ from the stored table — like make and rsync, the fast path trusts size+mtime_ns; a file
  replaced by one of the same size with its mtime_ns restored is seen only with `--rehash`.
  A touched but unchanged file keeps its sha256 (and the table records its new mtime).
  The table plus the source's `content_version()` hash to the folder's `inputs` digest.
* **Part keys**: each part's digest covers, for each of its records, the index, the source's
  `record_key(index)` (e.g. the raw JSONL line) and the sha256 of each file in
  `record_files(index)` (e.g. the images the line names), plus `content_version()`. A finished part
  whose stored key differs from the current one read changed inputs and is redone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mmtool.data.sources.base import Source
from mmtool.io import sha256_file

MISSING = {"missing": True}


def file_table(paths: list[Path], previous: dict[str, dict[str, Any]] | None = None,
               rehash: bool = False) -> dict[str, dict[str, Any]]:
    """Stats every file; hashes those whose size/mtime_ns differ from `previous` (all if `rehash`).

    Args:
        paths: the files the source reads (duplicates are fine).
        previous: the table stored by an earlier run, or None.
        rehash: hash every file, trusting nothing.

    Returns:
        `{path: {"size", "mtime_ns", "sha256"}}` sorted by path; `{"missing": True}` for absent files.
    """
    previous = previous or {}
    table: dict[str, dict[str, Any]] = {}
    for key in sorted({str(p) for p in paths}):
        try:
            st = os.stat(key)
        except OSError:
            table[key] = dict(MISSING)
            continue
        old = previous.get(key, {})
        same = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        digest = old["sha256"] if same and not rehash and "sha256" in old else sha256_file(key)
        table[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return table


def changed_inputs(old: dict[str, dict[str, Any]] | None, new: dict[str, dict[str, Any]]) -> list[str]:
    """Paths whose content differs between two tables: edited, added, removed, or now missing."""
    old = old or {}
    return [p for p in sorted(set(old) | set(new))
            if old.get(p, MISSING).get("sha256") != new.get(p, MISSING).get("sha256")]


def inputs_block(source: Source, previous: dict[str, Any] | None, rehash: bool = False) -> dict[str, Any]:
    """The `inputs` block of a manifest or plan: version, file table and their digest."""
    files = file_table(source.input_files(), (previous or {}).get("files"), rehash)
    version = source.content_version()
    h = hashlib.sha256(version.encode())
    for path, entry in files.items():
        h.update(f"\0{path}\0{entry.get('sha256', 'missing')}".encode())
    return {"version": version, "digest": h.hexdigest(), "files": files}


def describe_changes(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 3) -> str:
    """A short sentence naming what changed between two `inputs` blocks."""
    if not old or "files" not in old:
        return "the folder predates content keys"
    words = []
    if old.get("version") != new["version"]:
        words.append(f"source data version {old.get('version')} → {new['version']}")
    paths = changed_inputs(old.get("files"), new["files"])
    if paths:
        shown = ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
        words.append(f"{len(paths)} input file{'s' if len(paths) != 1 else ''} changed ({shown})")
    return "; ".join(words) or "inputs changed"


def part_key(source: Source, indices: list[int], files: dict[str, dict[str, Any]]) -> str:
    """The digest of one part's records: index, record key and the sha256 of each file it reads."""
    h = hashlib.sha256(source.content_version().encode())
    for index in indices:
        h.update(f"\0{index}\0".encode())
        h.update(source.record_key(index))
        for path in source.record_files(index):
            h.update(f"\0{files.get(str(path), MISSING).get('sha256', 'missing')}".encode())
    return h.hexdigest()[:32]
