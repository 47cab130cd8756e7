"""`mmtool inspect DIR`: a preprocessed folder's counts, column mapping and first samples, decoded.

The rendering of `mmtool.data.inspect`'s views, shared with `mmtool preprocess ... --dry-run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from mmtool.cli._render import human_bytes
from mmtool.cli.app import app
from mmtool.data.inspect import TEXT_PREVIEW, inspect_folder

_COLOURS = {"text": "green", "image": "magenta", "audio": "cyan", "observation": "yellow",
            "action": "yellow", "reward": "yellow", "label": "blue", "id": "bold", "meta": "dim",
            "ignored": "red", "task": "blue", "embedding": "cyan"}


def mapping_table(mapping: list[dict[str, Any]]) -> Table:
    """Input column → what it became (modality/role, id, label, meta, ignored), with the why."""
    table = Table(title="how the input is read", title_justify="left", show_edge=False)
    for col in ("input", "becomes", "role", "why"):
        table.add_column(col)
    for row in mapping:
        colour = _COLOURS.get(row["target"], "white")
        table.add_row(escape(row["input"]), f"[{colour}]{row['target']}[/]", escape(row.get("role", "")),
                      f"[dim]{escape(row.get('note', ''))}[/]")
    if not mapping:
        table.add_row("[dim](the source reports no mapping)[/]", "", "", "")
    return table


def summary_panel(summary: dict[str, Any], title: str) -> Panel:
    """Counts, splits, chunking, cuts, skips and rejects by reason; tokenizers per role."""
    s = summary
    lines = [f"[bold]{escape(str(s.get('source')))}[/] {escape(' '.join(s.get('options') or []))}",
             f"records [bold]{s['records']:,}[/] = written {s['written']:,} + rejected "
             f"[{'red' if s['rejected'] else 'green'}]{s['rejected']:,}[/] · samples (rows) "
             f"[bold]{s['rows']:,}[/]"]
    chunk = s.get("chunking") or {}
    caps = sorted({c["max_tokens"] for k, c in (s.get("tokenizers") or {}).items()
                   if k.startswith("text/") and c.get("max_tokens")})
    cap = chunk.get("max_tokens") or "/".join(map(str, caps)) or "the tokenizer cap of"
    lines.append(f"long text: {chunk.get('long_text', 'chunk')} at {cap} tokens, overlap "
                 f"{chunk.get('overlap', 0)} · {s['chunked']:,} record(s) chunked"
                 + (f" into {s['chunks']:,} rows" if s.get("chunks") else "")
                 + f" · [{'yellow' if s['truncated'] else 'green'}]{s['truncated']:,} cut[/]")
    if s.get("skipped"):
        lines.append("skipped (not records): " + ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()))
    if s.get("splits"):
        lines.append("splits: " + ", ".join(f"{k} {v:,}" for k, v in s["splits"].items()))
    if "shards" in s:
        lines.append(f"{s['shards']} shard(s), {human_bytes(s['bytes'])}")
    if any(c.get("name") == "wordpiece" for c in (s.get("tokenizers") or {}).values()):
        lines.append("[dim]wordpiece text is lowercased, accent-stripped and loses newlines and "
                     "extra spaces (decoded below as stored); --tokenizer text=bytes keeps it exactly[/]")
    parts: list[Any] = ["\n".join(lines)]
    if s.get("tokenizers"):
        tok = Table(show_edge=False, box=None, padding=(0, 2))
        tok.add_column("modality/role", style="bold")
        tok.add_column("tokenizer")
        for key, conf in s["tokenizers"].items():
            opts = ", ".join(f"{k}={v}" for k, v in conf.items()
                             if k not in ("name", "mean", "std", "transform") and v is not None)
            tok.add_row(escape(key), f"{escape(conf.get('name', '?'))} [dim]{escape(opts)}[/]")
        parts += ["", tok]
    if s.get("rejected_by_reason"):
        rej = Table(show_edge=False, box=None, padding=(0, 2), title="rejected, by reason",
                    title_justify="left")
        rej.add_column("n", justify="right", style="red")
        rej.add_column("reason")
        for reason, n in s["rejected_by_reason"].items():
            rej.add_row(f"{n:,}", escape(reason))
        parts += ["", rej]
    return Panel(Group(*parts), title=title, title_align="left")


def sample_table(n: int, view: dict[str, Any]) -> Table:
    """One sample: a row per segment with where it came from, its tokens and its decoded content."""
    meta = {k: v for k, v in (view.get("meta") or {}).items()}
    head = f"[bold]#{n}[/] {escape(view['id'])} · {escape(view['task'])} · {view['split']}"
    if view.get("label") is not None:
        head += f" · label {view['label']}"
    if meta:
        head += f" · meta {escape(str(meta))[:120]}"
    table = Table(title=head, title_justify="left", show_lines=True, expand=True)
    table.add_column("segment", no_wrap=True)
    table.add_column("from", style="dim")
    table.add_column("tokens", justify="right")
    table.add_column("decoded", ratio=1)
    for seg in view["segments"]:
        colour = _COLOURS.get(seg["modality"], "white")
        name = f"[{colour}]{seg['modality']}[/]/{escape(seg['role'])}\n[dim]{seg['tokenizer']} {seg['shape']}[/]"
        table.add_row(name, escape(seg.get("from", "")), f"{seg['tokens']:,}", _content(seg))
    return table


def _content(seg: dict[str, Any]) -> str:
    if "text" in seg:
        text = seg["text"]
        shown = escape(text[:TEXT_PREVIEW])
        return shown + (f" [dim]… (+{len(text) - TEXT_PREVIEW:,} chars)[/]" if len(text) > TEXT_PREVIEW else "")
    if "image_size" in seg:
        w, h = seg["image_size"]
        return f"image {w}×{h}" + (f" → [link=file://{seg['file']}]{escape(seg['file'])}[/]" if "file" in seg else "")
    if "seconds" in seg:
        return f"audio {seg['seconds']} s" + (f" → {escape(seg['file'])} [dim](Griffin-Lim)[/]"
                                             if "file" in seg else "")
    if "array" in seg:
        a = seg["array"]
        head = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in a["head"])
        return (f"{a['dtype']} {a['shape']} · min {a['min']:.4g} max {a['max']:.4g} · [{head}"
                f"{', …' if len(a['head']) < _prod(a['shape']) else ''}]") if a["min"] is not None \
            else f"{a['dtype']} {a['shape']} (empty)"
    return escape(str(seg.get("decoded", "")))


def _prod(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def render_view(view: dict[str, Any], console: Console, title: str) -> None:
    """Prints a view from `inspect_folder` or `dry_run`."""
    console.print(summary_panel(view["summary"], title))
    console.print(mapping_table(view["mapping"]))
    for r in view.get("rejected", [])[:5]:
        console.print(f"[red]rejected[/] {escape(r['location'] or '')}: {escape(r['reason'])}")
    for n, sample in enumerate(view["samples"]):
        console.print(sample_table(n, sample))


@app.command("inspect")
def inspect_cmd(
    folder: Path = typer.Argument(..., help="A folder written by `mmtool preprocess`."),
    n: int = typer.Option(5, "-n", "--samples", help="How many samples to show, from the first shard on."),
    out: Path = typer.Option(None, "--out", "-o", help="Write each image as PNG and each audio "
                             "segment as WAV (decoded from the stored tokens) into this folder."),
) -> None:
    """Show a preprocessed folder: counts, column mapping, and the first samples decoded."""
    view = inspect_folder(folder, n, out)
    console = Console(highlight=False)
    render_view(view, console, f"{folder}")
    if out is not None:
        console.print(f"[dim]images (PNG) and audio (WAV) decoded from the stored tokens are in {out}[/]")
