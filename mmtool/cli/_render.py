"""Rich progress bars and summary tables shared by the subcommands (the library never prints)."""

from __future__ import annotations

from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mmtool.data.preprocess import PreprocessConfig, preprocess


def human_bytes(n: float) -> str:
    """1234567 → "1.2 MB"."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def run_preprocess(cfg: PreprocessConfig, console: Console,
                   on_mapping: Callable[[list[Any]], None] | None = None) -> dict[str, Any]:
    """Runs `preprocess` under a rich progress bar and returns its manifest; `on_mapping` gets the
    source's column mapping before anything is written."""
    with Progress(TextColumn(f"[bold]{cfg.source}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("records"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(cfg.source, total=None)
        return preprocess(cfg, progress=lambda n: bar.advance(task, n), on_mapping=on_mapping,
                          on_start=lambda total: bar.update(task, total=total),
                          notify=lambda msg: console.print(msg, style="yellow", markup=False,
                                                           soft_wrap=True))


def print_finished(console: Console, manifest: dict[str, Any], out: str,
                   summary: Callable[[dict[str, Any], str], Any]) -> None:
    """Prints a finished dataset job's `summary` under its URL when --out was one, then, for a URL,
    where it was uploaded from (`remote.publish_dataset`)."""
    console.print(summary(manifest, manifest.get("url") or out))
    if manifest.get("url"):
        console.print(f"uploaded to {manifest['url']} (shards, then manifest.json; staged in "
                      f"{manifest['staging']})", soft_wrap=True, markup=False)


def preprocess_summary(manifest: dict[str, Any], out: str) -> Table:
    """A table of rows and tokens per source and modality, with rejects, shards and bytes."""
    status = "up to date" if manifest.get("up_to_date") else (
        f"resumed ({manifest['resumed_parts']} parts reused)" if manifest.get("resumed_parts") else "done")
    seconds = manifest.get("seconds")
    rate = f", {manifest['records'] / seconds:,.0f} records/s" if seconds else ""
    table = Table(title=f"{out}: {status}{rate}", title_justify="left", show_edge=False)
    for col in ("source / modality", "rows", "segments", "tokens"):
        table.add_column(col, justify="left" if col.startswith("source") else "right")
    for name, c in manifest["sources"].items():
        table.add_row(f"[bold]{name}[/]", f"{c['rows']:,}", "", f"{c['tokens']:,}")
    for name, c in manifest["modalities"].items():
        table.add_row(f"  {name}", f"{c['rows']:,}", f"{c['segments']:,}", f"{c['tokens']:,}")
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    written = manifest.get("written", manifest["records"] - manifest["rejected"])
    table.caption = (f"records {manifest['records']:,} = written {written:,} + rejected "
                     f"{manifest['rejected']:,} · rows {manifest['rows']:,} · splits {manifest['splits']} · "
                     f"{len(manifest['shards'])} shard(s), {human_bytes(shard_bytes)}")
    if manifest.get("chunked"):
        table.caption += (f" · {manifest['chunked']:,} long record(s) chunked into "
                          f"{manifest['chunks']:,} rows")
    truncated = sum(c.get("truncated", 0) for c in manifest["sources"].values())
    if truncated:
        table.caption += f" · {truncated:,} record(s) with text cut (see --opt max_chunks)"
    for reason, n in (manifest.get("skipped") or {}).items():
        table.caption += f" · skipped {n:,} {reason}"
    table.caption_justify = "left"
    return table


def slice_summary(doc: dict[str, Any], out: str) -> str:
    """One slice's outcome: its parts, counts, and how to merge the slices."""
    status = "up to date" if doc.get("up_to_date") else (
        f"resumed ({doc['resumed_parts']} parts reused)" if doc.get("resumed_parts") else "done")
    a, b = doc["part_range"]
    parts = {0: f"no part (the job has {doc['parts_total']})",
             1: f"part {a} of {doc['parts_total']}"}.get(b - a, f"parts {a}-{b - 1} of {doc['parts_total']}")
    return (f"{out}: slice {doc['slice']} of {doc['num_slices']} {status}: {parts} · records "
            f"{doc['records']:,} = written {doc['written']:,} + rejected {doc['rejected']:,} · rows "
            f"{doc['rows']:,}\nwhen every slice is done: mmtool merge OUT SLICE_DIRS...")
