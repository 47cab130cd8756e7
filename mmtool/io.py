"""Files written whole or not at all, and their hashes: the one place mmtool writes atomically.

Every file goes to a temporary name in the same folder, is flushed to disk, and is renamed over
its destination: a reader never sees half a file, and an interrupted writer leaves nothing that
looks finished (only a hidden `.NAME.*.tmp` that the next write ignores).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; read once, as os.umask is process-wide


def tmp_path(path: Path) -> Path:
    """A fresh temporary file next to `path` (same folder, so the final rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, _FILE_MODE)  # mkstemp makes 0600: shards and manifests must stay shareable
    return Path(name)


def publish(tmp: Path, path: Path) -> None:
    """Renames `tmp` over `path` after flushing it, so the rename publishes complete data."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Returns the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing, unreadable, not JSON, or holds
    something other than an object (so callers never trip over a torn or foreign file)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
