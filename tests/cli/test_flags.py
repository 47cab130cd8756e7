"""Flags generated from the config dataclasses: every field reachable from its command's `--help`,
with its docstring as help and the dataclass default; error messages name only flags that exist."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import typer
import typer.main

from mmtool.cli._dataclass_flags import (INTERNAL_FIELDS, ConfigFlags, command_flags, config_command,
                                         field_docs, given_flags)
from mmtool.config import build_config

REPO = Path(__file__).resolve().parents[2]

CONFIGS = {
    "mmtool.train:TrainConfig": ("train", ()),
    "mmtool.transfer.evaluate:TransferConfig": ("eval-transfer", ("run",)),
    "mmtool.analysis.ablate:AblateConfig": ("ablate", ("run",)),
    "mmtool.analysis.sanity:SanityConfig": ("sanity", ()),
    "mmtool.data.preprocess:PreprocessConfig": ("preprocess", ("source",)),
    "mmtool.analysis.profile:ProfileConfig": ("profile", ()),
    "mmtool.embed:EmbedConfig": ("embed", ("data",)),
    "mmtool.experiments:ExperimentConfig": ("experiment", ()),
}
"""Config dataclass → (its command, fields taken as positional arguments). Nested configs
(`ModelConfig` in train, `ProtocolConfig` in eval-transfer) are walked from their parents."""

NOT_A_COMMAND_CONFIG = {
    "LoaderConfig": "built by TrainConfig.loader_config and ProfileConfig from their own fields",
    "SweepSpec": "read from a sweep YAML; its flags are checked by test_sweep_spec_fields_reach_mmtool_sweep",
    "DataSpec": "one --data entry, parsed from its text (DIR=WEIGHT:key=value)",
    "FieldSpec": "the layout of a batch field, not a setting",
}
"""Config-like dataclasses that no command takes field by field, with the reason."""

SWEEP_FLAGS = {"train": "--set", "grid": "--grid", "seeds": "--seeds", "scale": "--scale"}
SWEEP_FILE_ONLY = {"labels", "name", "baseline", "evaluate", "origin"}
"""SweepSpec fields only the sweep YAML sets (structured values; `origin` names the file)."""

EXTERNAL_FLAGS: set[str] = {"--nproc-per-node", "--nproc_per_node", "--standalone"}
"""Flags of other tools (torchrun) that messages may name."""


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, type, str]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, cls, f.name))
    return out


def _load(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _config_dataclasses() -> set[str]:
    """Names of every `@dataclass class *Config` / `*Spec` in mmtool/."""
    names = set()
    for path in (REPO / "mmtool").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.ClassDef) and re.search(r"(Config|Spec)$", node.name)
                    and any("dataclass" in ast.unparse(d) for d in node.decorator_list)):
                names.add(node.name)
    return names


def test_every_config_dataclass_has_a_command_or_a_reason():
    nested = {"ModelConfig", "ProtocolConfig"}
    listed = {t.partition(":")[2] for t in CONFIGS} | nested | set(NOT_A_COMMAND_CONFIG)
    assert _config_dataclasses() == listed


def _normalise(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("target", sorted(CONFIGS))
def test_every_field_is_a_flag_of_its_command_with_its_docstring(target, cli):
    command, positional = CONFIGS[target]
    help_text = cli(command, "--help", env={"COLUMNS": "600"}).stdout
    flat = _normalise(help_text)
    options = set(re.findall(r"--[a-z][a-z0-9.-]*", help_text))
    usage = help_text[help_text.index("Usage"):].splitlines()[0].lower()
    for key, owner, name in _leaves(_load(target)):
        if f"{owner.__name__}.{name}" in INTERNAL_FIELDS:
            continue
        if key in positional:
            assert name in usage, (key, usage)
            continue
        flag = "--" + key.replace("_", "-")
        assert flag in options, f"{owner.__name__}.{name}: {flag} missing from `mmtool {command} --help`"
        doc = field_docs(owner).get(name)
        assert doc, f"{owner.__name__}.{name} has no docstring (its --help text)"
        assert " ".join(doc.split()[:6]) in flat, (flag, doc)


def test_internal_fields_exist_and_say_why():
    fields = {f"{owner.__name__}.{name}" for target in CONFIGS for _, owner, name in _leaves(_load(target))}
    for ident, reason in INTERNAL_FIELDS.items():
        assert ident in fields, ident
        assert len(reason) > 20, ident


def test_sweep_spec_fields_reach_mmtool_sweep(cli):
    from mmtool.experiments.sweep import SweepSpec

    help_text = cli("sweep", "--help", env={"COLUMNS": "600"}).stdout
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    assert names == set(SWEEP_FLAGS) | SWEEP_FILE_ONLY
    for flag in SWEEP_FLAGS.values():
        assert flag in help_text


def test_defaults_shown_are_the_dataclass_defaults(cli):
    from mmtool.train import TrainConfig

    flat = _normalise(cli("train", "--help", env={"COLUMNS": "600"}).stdout)
    cfg = TrainConfig()
    assert f"[default: {cfg.max_steps}]" in flat and f"[default: {cfg.model.size}]" in flat
    assert "[default: next-token=1,masked-patch=1]" in flat
    assert "--model.size, --model" in flat.replace(",--", ", --")  # the old name stays an alias


def _message_flags() -> dict[str, list[str]]:
    """`--flag` → where MMToolError messages in mmtool/ name it (string constants in the call)."""
    found: dict[str, list[str]] = {}
    for path in (REPO / "mmtool").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = getattr(node, "func", None)
            if not (isinstance(node, ast.Call) and getattr(name, "id", getattr(name, "attr", None)) == "MMToolError"):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9.-]*[a-z0-9]", sub.value):
                        found.setdefault(flag, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_messages_name_only_flags_that_exist():
    from mmtool.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    flags = set(EXTERNAL_FLAGS)
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        flags |= set(command_flags(sub, click.Context(sub, parent=ctx)))
    found = _message_flags()
    assert len(found) > 30  # the scan sees the messages
    missing = {flag: where for flag, where in found.items() if flag not in flags}
    assert not missing, f"messages name flags no command has: {missing}"


# -- the generator on a config it has never seen ---------------------------------------------------
@dataclass
class _Inner:
    size: str = "tiny"
    """Inner size."""
    ratio: float = 0.5
    """Inner ratio."""


@dataclass
class _Outer:
    name: str
    """Required name."""
    data: list[str] = field(default_factory=list)
    """Repeatable entries."""
    tags: list[str] = field(default_factory=lambda: ["a"])
    """Comma tags."""
    weights: dict[str, float] = field(default_factory=lambda: {"x": 1.0})
    """Weights."""
    twin: bool = True
    """A switch."""
    steps: int = 3
    """Steps."""
    inner: _Inner = field(default_factory=_Inner)
    """Nested."""


def _command(spec: ConfigFlags) -> click.Command:
    app = typer.Typer(add_completion=False)

    @app.command(cls=config_command(spec))
    def run(ctx: typer.Context, config: Path = typer.Option(None, "--config")) -> None:
        ctx.obj = build_config(_Outer, config, given_flags(ctx))
        click.echo(repr(ctx.obj))

    return typer.main.get_command(app)


def _run(spec: ConfigFlags, *args: str) -> str:
    from click.testing import CliRunner

    result = CliRunner().invoke(_command(spec), list(args))
    assert result.exit_code == 0, result.output
    return result.output


SPEC = ConfigFlags(f"{__name__}:_Outer", aliases={"inner.size": ("--model",)}, repeatable=("data",),
                   negatives={"twin": "--alone"})


def test_a_new_dataclass_gets_its_flags_with_dotted_names_and_aliases():
    names = command_flags(_command(SPEC))
    for flag in ("--name", "--data", "--tags", "--weights", "--twin", "--alone", "--steps",
                 "--inner.size", "--model", "--inner.ratio", "--ratio"):
        assert flag in names, flag
    assert "--size" not in names  # an explicit alias replaces the leaf alias


def test_flag_values_are_parsed_like_config_values(tmp_path):
    out = _run(SPEC, "--name", "n", "--data", "a=1,b", "--data", "c", "--tags", "p,q", "--weights",
               "x=2,y", "--alone", "--model", "small", "--ratio", "0.25")
    assert ("name='n', data=['a=1,b', 'c'], tags=['p', 'q'], weights={'x': 2.0, 'y': 1.0}, twin=False, "
            "steps=3, inner=_Inner(size='small', ratio=0.25)") in out


def test_flags_not_given_leave_the_config_file_alone(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\ninner: {size: base}\ntwin: false\n")
    out = _run(SPEC, "--config", str(path), "--name", "n", "--ratio", "0.1")
    assert "twin=False, steps=7, inner=_Inner(size='base', ratio=0.1)" in out
    out = _run(SPEC, "--config", str(path), "--name", "n", "--steps", "9", "--twin")
    assert "twin=True, steps=9" in out


def test_a_required_field_is_a_required_flag():
    from click.testing import CliRunner

    result = CliRunner().invoke(_command(SPEC), ["--steps", "2"])
    assert result.exit_code == 2 and "--name" in result.output
