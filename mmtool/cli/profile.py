"""`mmtool profile --data DIR ... --strategies ...`: what each batching strategy costs, measured.

`mmtool.analysis.profile` (and with it torch) is imported when the command runs, not when `mmtool` starts:
`mmtool --help`, `ls` and `preprocess` stay free of torch's second of import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.cli._render import human_bytes
from mmtool.cli.app import app
from mmtool.config import build_config
from mmtool.io import atomic_write_json

if TYPE_CHECKING:
    from mmtool.analysis.profile import ProfileConfig

def _rate(x: float) -> str:
    return f"{x / 1e6:,.2f}M" if x >= 1e6 else f"{x:,.0f}"


def _h2d_cell(h2d: dict[str, Any], path: str) -> str:
    p = h2d[path]
    cell = f"{p['copies_per_batch']:,.1f} × {human_bytes(p['bytes_per_batch'])}"
    return cell if p["seconds_per_batch"] is None else f"{cell} · {p['seconds_per_batch'] * 1e6:,.0f} µs"


def profile_table(result: dict[str, Any]) -> Group:
    """Two tables, one row per strategy each (so that an 80-column terminal shows them whole):
    throughput and padding (and the model step's); host-to-device traffic, slot fields, memory."""
    rows = result["strategies"]
    with_step = any(r["step"] for r in rows.values())
    cfg, machine = result["config"], result["machine"]
    size = (f"--batch-tokens {cfg['batch_tokens']:,}" if cfg["batch_tokens"] else
            f"--batch-samples {cfg['batch_samples']}")
    speed = Table(title=f"batching strategies: {size}, {cfg['steps']} batches each "
                        f"(after {cfg['warmup']} warm-up), {cfg['num_workers']} {cfg['worker_type']} workers",
                  title_justify="left", show_edge=False)
    cols = ["strategy", "samples/batch", "samples/s", "real tok/s", "batches/s", "padding"]
    if with_step:
        cols += ["step real tok/s", "data wait"]
    for col in cols:
        speed.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=col == "strategy")
    first = next(iter(rows.values()))
    timed = first["h2d"]["timing"]
    traffic = Table(title="per batch: host-to-device copies × bytes (one buffer; one per field)" +
                          ("" if first["h2d"]["one_buffer"]["seconds_per_batch"] is None else " · time") +
                          f", slot fields computed on {cfg['device']}, memory",
                    title_justify="left", show_edge=False)
    for col in ("strategy", "one buffer", "per field", "slot fields", "RSS now/peak"):
        traffic.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    for name, r in rows.items():
        cells = [f"[bold]{name}[/]", f"{r['mean_batch_samples']:,.1f}", _rate(r["samples_per_s"]),
                 _rate(r["real_tokens_per_s"]), f"{r['batches_per_s']:,.1f}",
                 f"{100 * r['padding_fraction']:.1f}%"]
        if with_step:
            st = r["step"]
            cells += [_rate(st["real_tokens_per_s"]) if st else "", f"{100 * st['data_wait_fraction']:.1f}%" if st else ""]
        speed.add_row(*cells)
        traffic.add_row(f"[bold]{name}[/]", _h2d_cell(r["h2d"], "one_buffer"), _h2d_cell(r["h2d"], "per_field"),
                        f"{1e3 * r['slot_fields_seconds_per_batch']:.2f} ms",
                        f"{r['rss_mb']['after']:,.0f}/{r['rss_mb']['peak_so_far']:,.0f} MB")
    data = result["data"]
    speed.caption = (f"{data['samples']:,} samples in {len(data['folders'])} folder(s), longest "
                     f"{data['longest_sample_tokens']:,} tokens, seed {cfg['seed']} · torch {machine['torch']}, "
                     f"{machine['cpu_count']} CPUs" + (f", {machine['accelerator']}" if machine["accelerator"] else ""))
    firsts = {name: r["step"] for name, r in rows.items() if r["step"] and r["step"].get("first_step_seconds")}
    if firsts:  # what the warm-up steps cost (compiling, with --compile)
        speed.caption += "\nfirst model step (warm-up): " + ", ".join(
            f"{name} {st['first_step_seconds']:.2f} s" + (f" ({st['compile_graphs']} graphs compiled)"
                                                         if st.get("compile_graphs") is not None else "")
            for name, st in firsts.items())
    mix = result["mixture"]
    shares = Table(title=f"mixture: requested share of {mix['mix_by']} vs realised (epoch 0; "
                         f"measured batches per strategy), splits {','.join(mix['splits'])}",
                   title_justify="left", show_edge=False)
    for col in ["folder", "requested", "epoch tokens", "epoch samples", *rows]:
        shares.add_column(col, justify="left" if col == "folder" else "right", no_wrap=col == "folder")
    for folder, f in mix["folders"].items():
        shares.add_row(folder, f"{f['requested']:.1%}", f"{f['tokens']:.1%}", f"{f['samples']:.1%}",
                       *(f"{r['token_share'].get(folder, 0.0):.1%}" for r in rows.values()))
    shares.add_row("[dim]one-folder batches[/]", "", "", "",
                   *(f"{r['single_source_fraction']:.0%}" for r in rows.values()))
    shares.caption = "strategy columns: each folder's share of the real tokens of the measured batches"
    traffic.caption = (f"H2D time: {timed} · slot fields: the per-slot index fields computed from the "
                       "batch's segment table where it is read, not counted in samples/s")
    for t in (speed, traffic, shares):
        t.caption_justify = "left"
    warnings = [Text(f"warning ({name}): {w}", style="yellow") for name, r in rows.items()
                for w in r["warnings"]]
    return Group(speed, Text(""), traffic, Text(""), shares, *warnings)


def run_profile(cfg: "ProfileConfig", console: Console, json_path: Path | None = None,
                plot_path: Path | None = None) -> dict[str, Any]:
    """Checks the output paths, profiles, prints the table and writes the JSON and the plot."""
    from mmtool.analysis.profile import check_plot_path, plot_profile, profile_strategies

    if plot_path is not None:
        check_plot_path(plot_path)  # before minutes of measuring, not after
    with console.status(f"profiling {', '.join(cfg.strategies)} ({cfg.steps} batches each)"):
        result = profile_strategies(cfg)
    console.print(profile_table(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, result)
        console.print(f"wrote {json_path}")
    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_profile(result, plot_path)
        console.print(f"wrote {plot_path}")
    return result


PROFILE_FLAGS = ConfigFlags("mmtool.analysis.profile:ProfileConfig", aliases={"data": ("-d",)},
                           repeatable=("data",))
"""`mmtool profile`'s flags: every `ProfileConfig` field."""


@app.command("profile", cls=config_command(PROFILE_FLAGS))
def profile_cmd(
    ctx: typer.Context,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every measurement to this JSON file."),
    plot: Optional[Path] = typer.Option(None, help="Write a bar chart comparing the strategies (.png, .svg, .pdf)."),
    model: Optional[str] = typer.Option(None, help="Also run a training step of this model size (tiny, small, base) on each batch: step tokens/s and data-wait fraction."),
) -> None:
    """Measure each batching strategy: samples/s, real tokens/s, padding, H2D copies, memory."""
    from mmtool.analysis.profile import ProfileConfig, model_step

    cfg = build_config(ProfileConfig, flags=given_flags(ctx))
    if model is not None:
        cfg.step_fn = model_step(cfg, model)
    run_profile(cfg, Console(highlight=False), json_out, plot)
