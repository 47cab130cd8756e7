"""What a folder holds, byte for byte: the check behind "nothing outside mmtool's files changed".

`snapshot(folder)` maps every file below `folder` (relative path) to its sha256; two snapshots are
compared with `changed(before, after)`. Tests of refusals and bad input take one before and one
after running the real CLI and assert that the user's files are untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(folder: str | Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every regular file below `folder` (symlinks by their target
    text), leaving out paths whose first component is in `ignore`."""
    folder = Path(folder)
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in ignore:
            continue
        if path.is_symlink():
            state[str(rel)] = "symlink:" + str(path.readlink())
        elif path.is_file():
            state[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Paths added, removed or modified between two snapshots, sorted."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
