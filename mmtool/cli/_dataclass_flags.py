"""Command-line flags generated from a config dataclass: the dataclass is the CLI (litgpt's way).

Every field of the config becomes a typer option whose help is the field's docstring (read from the
source with `ast`, as litgpt and simple-parsing do) and whose shown default is the dataclass's own,
so that defaults live in one place. Nested dataclasses are flattened with dots: `TrainConfig.model`'s
`size` is `--model.size`; its leaf name (`--size`) is an alias when no other field has it, and the
short names the CLI had before stay as aliases (`--model` for `model.size`, `-d` for `--data`).

The options carry `None` ("not given") as their click default: `mmtool.config.build_config` applies
only the flags that were given, on top of the defaults and a `--config` YAML file, so a flag never
overrides a YAML value with a default. Values are parsed by `build_config` (`_coerce`): lists and
tuples by comma, objectives by `parse_weights`, bools as flags (`--twin/--no-twin`).

The options are built when a command's parameters are first needed (its `--help` or its run), not
when `mmtool` starts: config modules that import torch stay out of `mmtool --help` and `mmtool ls`.

Usage (a command module)::

    @app.command("ablate", cls=config_command(ConfigFlags("mmtool.analysis.ablate:AblateConfig", positional=("run",))))
    def ablate_cmd(ctx: typer.Context, run: Path = typer.Argument(...), ...) -> None:
        cfg = build_config(AblateConfig, flags={"run": run, **given_flags(ctx)})
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, List, Optional

import click
import typer
import typer.core
import typer.main
from rich.markup import escape

from mmtool.errors import MMToolError

INTERNAL_FIELDS: dict[str, str] = {
    "TrainConfig.fault_nan_step": "testing aid (makes the loss NaN at a step); set it as an override, fault_nan_step=3",
    "ModelConfig.folder_objectives": "filled from the --data entries' `:objectives=` and mixture YAMLs",
    "ProtocolConfig.ks_given": "derived: true when --k was given",
    "ProfileConfig.step_fn": "a Python callable; --model SIZE builds it",
}
"""Config fields that are not flags, each with the reason (a test checks every other field is one)."""

_META = "mmtool.config_flags"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One generated option: the config key it sets and how it reads."""

    key: str
    """Dotted config key, e.g. `model.size`."""
    param: str
    """Python/click parameter name (`model__size`)."""
    decls: tuple[str, ...]
    """Option names, primary first (`--model.size`, `--model`)."""
    annotation: Any
    """The typer annotation: Optional[int/float/str/bool] or List[str] (repeatable)."""
    help: str
    """The field's docstring and its default, rich-escaped."""
    show_default: str | bool
    """The dataclass default as written on the command line (False: none shown)."""


@dataclasses.dataclass
class ConfigFlags:
    """How a command's flags come from its config dataclass.

    Args:
        target: `"module:ClassName"` of the config dataclass (imported when the flags are built).
        positional: Fields that the command takes as explicit arguments (not generated).
        aliases: Config key → extra option names (`{"model.size": ("--model",)}`); keys of fields
            that do not exist (yet) are skipped.
        repeatable: List fields read from repeated flags (`--data a --data b`) instead of commas.
        negatives: Bool field → the name of its off switch (default `--no-NAME`).
        parsers: Config key → a function applied to the flag's text before `build_config`.
        exclude: Extra fields this command sets itself (beyond `INTERNAL_FIELDS`).
    """

    target: str
    positional: tuple[str, ...] = ()
    aliases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    repeatable: tuple[str, ...] = ()
    negatives: dict[str, str] = dataclasses.field(default_factory=dict)
    parsers: dict[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()

    def config_class(self) -> type:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its docstring (the string literal right after the field), read with `ast`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # the class
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _strip_optional(annotation: Any) -> Any:
    """`int | None` → int; a union of several types (`str | int`) → str."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _flag_type(annotation: Any, repeatable: bool) -> Any:
    base = _strip_optional(annotation)
    origin = typing.get_origin(base)
    if repeatable:
        return List[str]
    if base in (bool, int, float):
        return Optional[base]
    if base in (str, Path) or origin in (list, tuple, dict):
        return Optional[str]
    raise MMToolError(f"no flag type for {annotation!r}: add the field to INTERNAL_FIELDS with a reason")


def show_value(value: Any) -> str | bool:
    """A default as it is written on the command line (lists by comma; False: not shown)."""
    if value is None:
        return False
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or False
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def walk_fields(cls: type, prefix: str = "") -> list[tuple[str, type, dataclasses.Field, Any]]:
    """(dotted key, owning dataclass, field, annotation) of every leaf field, nested ones flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += walk_fields(hint, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, cls, f, hint))
    return out


def build_flags(spec: ConfigFlags) -> list[Flag]:
    """The options of `spec`'s config class, in field order."""
    cls = spec.config_class()
    leaves = [(key, owner, f, hint) for key, owner, f, hint in walk_fields(cls)
              if key not in spec.positional and key not in spec.exclude
              and f"{owner.__name__}.{f.name}" not in INTERNAL_FIELDS]
    taken = {"--" + key.replace("_", "-") for key, *_ in leaves if "." not in key}
    taken |= {name for names in spec.aliases.values() for name in names}
    leaf_names = [("--" + key.rpartition(".")[2].replace("_", "-")) for key, *_ in leaves]
    flags = []
    for (key, owner, f, hint), leaf in zip(leaves, leaf_names):
        decls = ["--" + key.replace("_", "-")]
        if ("." in key and key not in spec.aliases and leaf not in taken
                and leaf_names.count(leaf) == 1):
            decls.append(leaf)
        decls += [a for a in spec.aliases.get(key, ()) if a not in decls]
        kind = _flag_type(str if key in spec.parsers else hint, key in spec.repeatable)
        default = _default(f)
        if kind is Optional[bool]:
            off = spec.negatives.get(key, "--no-" + decls[0][2:])
            default = (decls[0] if default else off)[2:] if isinstance(default, bool) else default
            decls = [f"{decls[0]}/{off}"]
        doc = field_docs(owner).get(f.name, "")
        shown = False if default is dataclasses.MISSING else show_value(default)
        text = " ".join(filter(None, [doc, f"[default: {shown}]" if shown is not False else ""]))
        flags.append(Flag(key=key, param=key.replace(".", "__"), decls=tuple(decls), annotation=kind,
                          help=escape(text), show_default=shown))
    return flags


def _click_options(flags: list[Flag], required: set[str]) -> list[click.Parameter]:
    """TyperOptions for `flags`, made by typer itself from a generated signature."""
    params = []
    for fl in flags:
        default = ... if fl.key in required else ([] if fl.annotation is List[str] else None)
        option = typer.Option(default, *fl.decls, help=fl.help, show_default=False)
        params.append(inspect.Parameter(fl.param, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=fl.annotation))

    def generated(**kwargs: Any) -> None:
        """(flags only)"""

    generated.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    generated.__annotations__ = {p.name: p.annotation for p in params}
    scratch = typer.Typer(add_completion=False)
    scratch.command()(generated)
    return list(typer.main.get_command(scratch).params)


def config_command(spec: ConfigFlags) -> type:
    """A typer command class whose options are `spec`'s generated flags plus the function's own.

    The generated values are taken out of the call (the function does not declare them) and kept
    for `given_flags(ctx)`.
    """

    class ConfigCommand(typer.core.TyperCommand):
        config_flags = spec
        _generated: list[Flag] | None = None

        def get_params(self, ctx: click.Context) -> list[click.Parameter]:
            if self._generated is None:
                cls = spec.config_class()
                required = {key for key, _, f, _ in walk_fields(cls)
                            if _default(f) is dataclasses.MISSING and key not in spec.positional}
                self._generated = build_flags(spec)
                self.params[:0] = _click_options(self._generated, required)
            return super().get_params(ctx)

        def invoke(self, ctx: click.Context) -> Any:
            given = {}
            for fl in self._generated or []:
                value = ctx.params.pop(fl.param, None)
                if value is None or value == []:
                    continue
                parse = spec.parsers.get(fl.key)
                given[fl.key] = parse(value) if parse else value
            ctx.meta[_META] = given
            return super().invoke(ctx)

    return ConfigCommand


def given_flags(ctx: click.Context) -> dict[str, Any]:
    """The generated flags given on the command line: dotted config key → value (parsed)."""
    return dict(ctx.meta.get(_META, {}))


def command_flags(command: click.Command, ctx: click.Context | None = None) -> list[str]:
    """Every option name of a click command (primary, aliases and off switches)."""
    ctx = ctx or click.Context(command)
    names = []
    for p in command.get_params(ctx):
        names += list(getattr(p, "opts", [])) + list(getattr(p, "secondary_opts", []))
    return names
