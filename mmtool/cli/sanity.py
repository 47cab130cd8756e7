"""`mmtool sanity`: the known-answer check of the importance tools (thin layer over `mmtool.analysis.sanity`)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from mmtool.cli._dataclass_flags import ConfigFlags, config_command, given_flags
from mmtool.cli.app import app
from mmtool.config import build_config
from mmtool.errors import MMToolError


SANITY_FLAGS = ConfigFlags("mmtool.analysis.sanity:SanityConfig")
"""`mmtool sanity`'s flags: every `SanityConfig` field."""


@app.command("sanity", cls=config_command(SANITY_FLAGS))
def sanity_cmd(ctx: typer.Context) -> None:
    """Known-answer check: only one modality carries the label; ablation (over the untrained twin) and
    probes must find it. --steps 0 checks the untrained model, which must fail (exit 2)."""
    from mmtool.analysis.sanity import SanityConfig, known_answer_check

    cfg = build_config(SanityConfig, flags=given_flags(ctx))
    workdir, steps = cfg.workdir, cfg.steps
    console = Console(highlight=False)
    with console.status("known-answer check") as status:
        out = known_answer_check(cfg, say=lambda m: status.update(m))
    table = Table(title=f"known-answer check: {out['informative']} carries the label, {out['noise']} is noise "
                        f"({out['steps']} steps)", title_justify="left", show_edge=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("numbers")
    for c in out["checks"]:
        result = "[green]pass[/]" if c["passed"] else "[red]FAIL[/]"
        if not c.get("required", True):
            result = ("pass" if c["passed"] else "fail") + " [dim](info)[/]"
        table.add_row(c["check"], result, c["detail"])
    console.print(table)
    console.print(f"details: {workdir / 'sanity.json'}; ablation: {out['ablation']}")
    if not out["passed"] and steps == 0:
        raise MMToolError("the known-answer check failed on the untrained model, as it must: its importance "
                          "over its own untrained twin is 0 (train with --steps > 0 to pass)")
    if not out["passed"]:
        raise MMToolError("the known-answer check failed: the tools did not single out the informative "
                          "modality (see the table); try more --steps before suspecting a bug")
