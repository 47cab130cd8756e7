"""The shard store: Arrow IPC stream shards, their manifest, and atomic file writes.

A preprocessed folder looks like::

    DIR/manifest.json         what is here: rows, rejects, counts, tokenizers, shards with sha256
    DIR/shard-00000.arrow     Arrow IPC *stream* files of `schema.ARROW_SCHEMA`
    DIR/rejected.jsonl        one line per rejected record: index, id, location, reason

Shards are stream files (not the random-access "file" format) because both
`datasets.Dataset.from_file(path)` and `pyarrow.ipc.open_stream(pyarrow.memory_map(path))` read them,
without copying, so other tools can use mmtool's data directly.

Every file is written to a temporary name in the same folder and renamed into place (`mmtool.io`),
so a reader never sees half a file and an interrupted writer leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from mmtool.data import remote
from mmtool.data.schema import ARROW_SCHEMA, SCHEMA_VERSION
from mmtool.errors import MMToolError
from mmtool.io import atomic_write_json, atomic_write_text, publish, sha256_file, tmp_path

__all__ = ["MANIFEST", "REJECTED", "atomic_write_json", "atomic_write_text", "content_sha256", "load_manifest",
           "parse_size", "read_folder", "read_shard", "sha256_file", "shard_path", "verify_shards",
           "write_shard"]

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3,
          "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str | int, flag: str = "--shard-size") -> int:
    """Parses "64MB", "512KiB", "1e6" or 1000000 into bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise MMToolError(f"{flag} {text!r}: expected a size such as 64MB, 512KiB or 1000000")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MMToolError(f"{flag} {text!r}: must be positive")
    return size


def write_shard(path: str | Path, batches: Iterable[pa.RecordBatch],
                schema: pa.Schema = ARROW_SCHEMA) -> dict[str, Any]:
    """Writes record batches to an Arrow IPC stream file atomically.

    Returns:
        `{"path": file name, "rows", "bytes", "sha256"}` of the written file.
    """
    path = Path(path)
    tmp = tmp_path(path)
    rows = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": path.name, "rows": rows, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def read_shard(path: str | Path) -> pa.Table:
    """Memory-maps one stream shard as a table (zero-copy)."""
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise MMToolError(f"{path}: not a readable Arrow stream shard ({exc})") from exc


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Reads `folder/manifest.json` and checks its shape before anyone indexes into it.

    A manifest is a JSON object with an integer `schema_version` no newer than this mmtool's and a
    `shards` list of `{"path": str, "rows": int, "bytes": int, "sha256": str}`, each `path` a file
    inside `folder` (no absolute path, no `..`, no symlink out). `folder` may be a URL of any
    fsspec protocol (`mmtool.data.remote`); `file://` URLs are local folders.

    Raises:
        MMToolError: a missing or unreadable file, or the first thing wrong with its shape, in one
            line naming the file.
    """
    folder = remote.local_path(folder)
    path = _manifest_path(folder)
    try:
        manifest = json.loads(_read_manifest(folder))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MMToolError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(manifest, dict):
        raise MMToolError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MMToolError(f"{path}: schema_version must be an integer, got {version!r:.40}")
    if version > SCHEMA_VERSION:
        raise MMToolError(
            f"{path}: schema_version {version} is newer than this mmtool understands "
            f"({SCHEMA_VERSION}); upgrade mmtool or preprocess again"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise MMToolError(f"{path}: 'shards' must be a list of shard entries, "
                          f"got {'nothing' if shards is None else type(shards).__name__}")
    for n, shard in enumerate(shards):
        _check_shard_entry(path, n, shard)
        shard_path(folder, shard)
    return manifest


def _manifest_path(folder: str | Path) -> str | Path:
    """Where a folder's manifest is, as named in messages (a URL without credentials)."""
    return remote.redact(remote.join(folder, MANIFEST)) if isinstance(folder, str) else folder / MANIFEST


def _read_manifest(folder: str | Path) -> str:
    """The text of `folder`'s manifest, local or remote."""
    hint = f"{folder}: no {MANIFEST}; run `mmtool preprocess SOURCE --out {folder}` first"
    if isinstance(folder, str):
        try:
            return remote.read_bytes(remote.join(folder, MANIFEST)).decode("utf-8")
        except FileNotFoundError:
            raise MMToolError(hint.replace(folder, remote.redact(folder))) from None
    if not (folder / MANIFEST).is_file():
        raise MMToolError(hint)
    return (folder / MANIFEST).read_text(encoding="utf-8")


_SHARD_KEYS = {"path": str, "rows": int, "bytes": int, "sha256": str}


def _check_shard_entry(manifest_path: Path, n: int, shard: Any) -> None:
    if not isinstance(shard, dict):
        raise MMToolError(f"{manifest_path}: shards[{n}] must be an object with "
                          f"{', '.join(_SHARD_KEYS)}, got {type(shard).__name__}")
    for key, kind in _SHARD_KEYS.items():
        value = shard.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            want = "a non-negative integer" if kind is int else "a string"
            raise MMToolError(f"{manifest_path}: shards[{n}].{key} must be {want}, got {value!r:.60}")


def shard_path(folder: str | Path, shard: dict[str, Any]) -> Path | str:
    """The file of one manifest shard entry, refused unless it lies inside `folder` (a URL for a
    remote folder).

    Raises:
        MMToolError: an absolute path, a `..` that climbs out, or a symlink that leads out of
            `folder` (a manifest must never make mmtool read files elsewhere).
    """
    folder = remote.local_path(folder)
    rel = Path(shard["path"])
    if isinstance(folder, str):
        if rel.is_absolute() or ".." in rel.parts or "://" in shard["path"] or "\\" in shard["path"]:
            raise MMToolError(f"{_manifest_path(folder)}: shard path {shard['path']!r} leaves the folder; "
                              "shard paths must be inside the folder")
        return remote.join(folder, rel.as_posix())
    path = folder / rel
    where = f"{folder / MANIFEST}: shard path {shard['path']!r}"
    if rel.is_absolute():
        raise MMToolError(f"{where} is absolute; shard paths must be inside the folder")
    if len(rel.parts) == 1 and rel.parts[0] != ".." and not path.is_symlink():
        return path  # a plain file name, not a link: inside (one lstat, not two resolves per shard)
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        how = "a symlink leads" if ".." not in rel.parts else "'..' climbs"
        raise MMToolError(f"{where}: {how} outside {folder}; shard paths must stay inside the folder")
    return path


def content_sha256(manifest: dict[str, Any]) -> str:
    """A preprocessed folder's identity: the sha256 of its manifest (every shard's sha256, the
    tokenizers, counts and plan; canonical JSON) without the `inputs` block, whose mtimes change
    when a raw input is merely touched. Embedding caches and training checkpoints record it."""
    body = {k: v for k, v in manifest.items() if k != "inputs"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def verify_shards(folder: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Checks that every shard of the manifest lies in `folder`, exists and matches its size and
    sha256. A remote folder's shards are verified as they arrive in the cache
    (`remote.ShardCache`), not here: this checks only its manifest."""
    folder = remote.local_path(folder)
    manifest = manifest or load_manifest(folder)
    if isinstance(folder, str):
        return
    for shard in manifest["shards"]:
        path = shard_path(folder, shard)
        if not path.is_file():
            raise MMToolError(f"{path}: shard listed in {MANIFEST} is missing")
        if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            raise MMToolError(f"{path}: shard is corrupt (sha256 differs from {MANIFEST})")


def read_folder(folder: str | Path, verify: bool = False) -> pa.Table:
    """Reads every shard of a preprocessed folder into one (memory-mapped) table."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if verify:
        verify_shards(folder, manifest)
    tables = [read_shard(shard_path(folder, s)) for s in manifest["shards"]]
    return pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()
