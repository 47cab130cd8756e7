"""Parts: the unit of work of `preprocess` and `embed`, and how finished parts become a folder.

A job's records are cut into parts; each finished part is `DIR/.partial/part-NNNNN.arrow` plus
`part-NNNNN.json` (counts, rejects, content key). This module finds the finished parts, adds up
their counts, joins them into shards, and checks the result (unique ids, the reject budget). A
one-machine run, its slices (`mmtool.data.slices`) and `mmtool merge` all use these same functions,
which is why a merged folder is byte-identical to a one-machine run's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mmtool import folders
from mmtool.data import shards as store
from mmtool.errors import MMToolError

PARTIAL = folders.PARTIAL
PLAN = "plan.json"

def finished_parts(partial: Path, keys: list[str] | dict[int, str]) -> tuple[dict[int, dict[str, Any]], int]:
    """(finished parts whose key is `keys[k]`, how many finished parts read other inputs); `keys` is
    a list of every part's key, or `{part: key}` of the parts to look at (a slice's)."""
    done, stale = {}, 0
    for k, key in (keys.items() if isinstance(keys, dict) else enumerate(keys)):
        meta = partial / f"part-{k:05d}.json"
        data = partial / f"part-{k:05d}.arrow"
        if meta.is_file() and data.is_file():
            stats = json.loads(meta.read_text())
            if data.stat().st_size != stats["file"]["bytes"]:
                continue
            if stats.get("key", "") == key:
                done[k] = stats
            else:
                stale += 1
    return done, stale


def merge_counts(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts of several parts (records, rows, per source/modality/split, tokenizers) added up."""
    total: dict[str, Any] = {"records": 0, "rows": 0, "sources": {}, "modalities": {}, "splits": {},
                             "tokenizers": {}}
    for s in stats:
        total["records"] += s["records"]
        total["rows"] += s["rows"]
        for key in ("sources", "modalities"):
            for name, counts in s[key].items():
                into = total[key].setdefault(name, defaultdict(int))
                for k, v in counts.items():
                    into[k] += v
        for split, n in s["splits"].items():
            total["splits"][split] = total["splits"].get(split, 0) + n
        for key, conf in s["tokenizers"].items():
            total["tokenizers"].setdefault(key, conf)
    for key in ("sources", "modalities"):
        total[key] = {k: dict(v) for k, v in sorted(total[key].items())}
    total["splits"] = dict(sorted(total["splits"].items()))
    return total


def assemble(out: Path, partial: Path | list[Path], parts: list[dict[str, Any]],
              shard_bytes: int) -> list[dict]:
    """Joins consecutive parts into shards of about `shard_bytes` each; `partial` is the folder
    that holds every part file, or one folder per part (`mmtool merge`: each slice's)."""
    where = partial if isinstance(partial, list) else [partial] * len(parts)
    parts = [{**p, "dir": d} for p, d in zip(parts, where)]
    groups: list[list[dict[str, Any]]] = []
    size = 0
    for part in parts:
        if part["rows"] == 0:
            continue
        if not groups or size + part["file"]["bytes"] > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += part["file"]["bytes"]
    shards = []
    for j, group in enumerate(groups):
        # One record batch per shard: every column is one contiguous buffer, so a reader can
        # gather any sample's tokens with numpy straight from the memory map.
        table = pa.concat_tables(store.read_shard(p["dir"] / p["file"]["path"]) for p in group)
        shards.append(store.write_shard(out / f"shard-{j:05d}.arrow",
                                        table.combine_chunks().to_batches(max_chunksize=None)))
    for stale in out.glob("shard-*.arrow"):
        if int(stale.stem.split("-")[1]) >= len(groups):
            stale.unlink()
    return shards


def by_reason(rejected: list[dict[str, Any]]) -> dict[str, int]:
    """Rejects counted by reason (its first 120 characters; locations are not part of it), most
    frequent first."""
    counts: dict[str, int] = defaultdict(int)
    for r in rejected:
        counts[str(r["reason"])[:120]] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_unique_ids(out: Path, shards: list[dict]) -> None:
    """Refuses a folder whose shards hold a sample id twice, naming one."""
    ids = pa.chunked_array([store.read_shard(out / s["path"]).column("id") for s in shards]) \
        if shards else pa.chunked_array([], pa.string())
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise MMToolError(f"{out}: {len(dup)} sample ids occur more than once "
                          f"(e.g. {dup[0]['values'].as_py()!r}); ids must be unique within a source")


def check_rejected(max_rejected: float, out: Path, rejected: list[dict[str, Any]], records: int) -> None:
    """Writes the rejects file; refuses the job when more than `max_rejected` of the records failed."""
    store.atomic_write_text(out / store.REJECTED, "".join(json.dumps(r) + "\n" for r in rejected))
    if len(rejected) > max_rejected * records:
        first = rejected[0]
        raise MMToolError(
            f"{len(rejected)} of {records} records ({len(rejected) / records:.1%}) "
            f"were rejected, more than --max-rejected {max_rejected:g}; first: {first['location']}: "
            f"{first['reason']} (all in {out / store.REJECTED}; finished parts are kept, so raising "
            "--max-rejected and rerunning completes the job)"
        )

