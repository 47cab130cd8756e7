"""Parsing `--opt` key maps (`map=text:json.caption,label:json.label`) and listing input files
(`urls=shards/part-{000..003}.tar`, globs), shared by the `webdataset`, `episodes` and `jsonl`
sources."""

from __future__ import annotations

import glob
import re
from pathlib import Path

from mmtool.errors import MMToolError

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")


def parse_key_map(spec: str, option: str, targets: tuple[str, ...]) -> dict[str, str]:
    """Parses `TARGET:NAME,TARGET:NAME` into `{target: name}`.

    Args:
        spec: the option's value; "" gives {}.
        option: the option's name, for error messages (`--opt OPTION=...`).
        targets: the allowed targets.

    Raises:
        MMToolError: a pair without ":", an unknown or repeated target, or an empty name.
    """
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        target, sep, name = (s.strip() for s in pair.partition(":"))
        if not sep or not name:
            raise MMToolError(f"--opt {option}={spec}: expected TARGET:NAME pairs separated by "
                              f"commas, got {pair!r}")
        if target not in targets:
            raise MMToolError(f"--opt {option}={spec}: unknown target {target!r} "
                              f"(targets: {', '.join(targets)})")
        if target in out:
            raise MMToolError(f"--opt {option}={spec}: target {target!r} given twice")
        out[target] = name
    return out


def expand_braces(pattern: str) -> list[str]:
    """Expands `{000..003}` ranges (zero padding kept) and `{a,b}` alternatives, as bash does."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    if match.group(3) is not None:
        items = match.group(3).split(",")
    else:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    return [out for item in items for out in expand_braces(head + item + tail)]


def list_files(spec: str, option: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """The files named by `spec`: paths, folders (their files with `suffixes`), globs and brace
    patterns, separated by `::` (WebDataset's separator), in order, without duplicates.

    Raises:
        MMToolError: a pattern matches nothing, naming it.
    """
    if not spec.strip():
        raise MMToolError(f"--opt {option}: required (a file, folder, glob or {{000..009}} pattern)")
    files: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split("::"))):
        for pattern in expand_braces(part):
            path = Path(pattern).expanduser()
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes)) \
                    if suffixes else []
            elif any(c in pattern for c in "*?["):
                found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            else:
                found = [path] if path.is_file() else []
            if not found:
                what = f"no {'/'.join(suffixes)} files in folder" if path.is_dir() else "no such file"
                raise MMToolError(f"--opt {option}={spec}: {what}: {pattern}")
            files += found
    return list(dict.fromkeys(files))
