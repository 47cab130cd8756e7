"""Config dataclasses from defaults, a YAML file, flags, and `key=value` overrides (in that order).

`mmtool train --config run.yaml --data d1 lr=3e-4 model.size=small` builds the `TrainConfig` from
its defaults, then the YAML file, then the flags given, then each override. Nested dataclasses
(`model.size`) are addressed with dots. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import typing
import re
from pathlib import Path
from typing import Any

import yaml

from mmtool.errors import MMToolError


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts a YAML/CLI value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                         and type(None) in typing.get_args(annotation)):
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        annotation, origin = args[0], typing.get_origin(args[0])
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            return annotation(value)
        if annotation is Path:  # a URL (s3://, memory://, ...) stays text: Path would fold its "//"
            return value if isinstance(value, str) and _URL.match(value) else Path(value)
        if origin in (list, tuple):
            return _coerce_items(value, annotation, key)
        if origin is dict:
            if isinstance(value, dict):
                return {str(k): float(v) for k, v in value.items()}
            return parse_weights(str(value), key)
    except (TypeError, ValueError):
        raise MMToolError(f"{_label(key, value)}: expected {getattr(annotation, '__name__', annotation)}") from None
    return value


def _label(key: str, value: Any) -> str:
    """`--flag 'value'` for a flag, `origin key='value'` for a file or override setting."""
    return f"{key} {value!r}" if key.startswith("--") else f"{key}={value!r}"


def _coerce_items(value: Any, annotation: Any, key: str) -> list | tuple:
    """A list/tuple field: a YAML list, or text split at commas (`1,5,10`)."""
    origin = typing.get_origin(annotation)
    inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
    if isinstance(value, (list, tuple)):
        return origin(_coerce(v, inner, key) for v in value)
    try:
        return origin(_coerce(v.strip(), inner, key) for v in str(value).split(",") if v.strip())
    except MMToolError:
        name = getattr(inner, "__name__", str(inner))
        raise MMToolError(f"{_label(key, value)}: expected comma-separated {name}s") from None


def parse_value(text: str) -> Any:
    """`key=value` option values: ints, floats, true/false/none, `a+b` lists, else strings."""
    if "+" in text:
        return [parse_value(t) for t in text.split("+") if t]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_weights(text: str, key: str) -> dict[str, float]:
    """"next-token=1,masked-patch:mask_ratio=0.75=0.5" (weights optional, default 1) → {name: weight}.

    The weight is what follows the last "=", when that is a number; a name may carry options
    (`name:key=value`) of its own.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, w = part.rpartition("=")
        if not eq:
            out[part] = 1.0
            continue
        try:
            out[name] = float(w)
        except ValueError:
            if ":" not in part:
                raise MMToolError(f"{key}: weight of {name!r} must be a number, got {w!r}") from None
            out[part] = 1.0  # the last "=" belonged to an option, not a weight
    return out


def set_value(obj: Any, dotted: str, value: Any, origin: str, _prefix: str = "") -> None:
    """Sets `a.b.c` on nested dataclasses, coercing to the field's type."""
    head, _, rest = dotted.partition(".")
    types = _field_types(type(obj))
    full = _prefix + dotted
    if head not in types:
        valid = ", ".join(_prefix + t for t in types)
        raise MMToolError(f"{origin}: unknown setting {full!r} (settings: {valid})")
    if rest:
        child = getattr(obj, head)
        if not dataclasses.is_dataclass(child):
            raise MMToolError(f"{origin}: {_prefix + head!r} has no sub-settings")
        set_value(child, rest, value, origin, f"{_prefix}{head}.")
    else:
        label = origin if origin == "--" + full.replace("_", "-") else f"{origin} {full}"
        setattr(obj, head, _coerce(value, types[head], label))


def _flatten(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in doc.items():
        if isinstance(v, dict) and k not in ("objectives",):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _instantiate(cls: type, flags: dict[str, Any]) -> Any:
    """`cls()` with its required fields (no default) taken from `flags`."""
    types = _field_types(cls)
    required = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            flag = "--" + f.name.replace("_", "-")
            if flags.get(f.name) is None:
                raise MMToolError(f"{flag}: required")
            required[f.name] = _coerce(flags[f.name], types[f.name], flag)
    return cls(**required)


def read_yaml(path: str | Path, where: str | None = None) -> Any:
    """The document in YAML file `path`.

    Raises:
        MMToolError: one line, "WHERE: not valid YAML (PROBLEM at line L, column C)" or
            "WHERE: cannot read (REASON)".
    """
    where = where or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MMToolError(f"{where}: cannot read ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise MMToolError(f"{where}: not valid YAML ({problem}{at})") from None


def load_yaml_mapping(path: str | Path, where: str, expected: str) -> dict[str, Any]:
    """The mapping in YAML file `path` (an empty file is {}).

    Raises:
        MMToolError: one line naming WHERE when the file cannot be read or parsed (`read_yaml`), or
            "WHERE: expected EXPECTED" when it holds something other than a mapping.
    """
    doc = read_yaml(path, where) or {}
    if not isinstance(doc, dict):
        raise MMToolError(f"{where}: expected {expected}")
    return doc


def build_config(cls: type, yaml_path: Path | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> Any:
    """Defaults → YAML file → flags that were given (not None) → `key=value` overrides.

    Args:
        cls: The config dataclass. Its fields without a default must be among `flags`.
        yaml_path: A `--config` file: a mapping of settings (nested mappings for nested configs).
        flags: Dotted key → value of the flags given on the command line (None and [] are skipped).
        overrides: `key=value` strings (`model.size=small`).

    Returns:
        The config.

    Raises:
        MMToolError: Unknown keys, values of the wrong type, a missing required flag, a bad file.
    """
    cfg = _instantiate(cls, flags or {})
    if yaml_path is not None:
        doc = load_yaml_mapping(yaml_path, f"--config {yaml_path}", "a mapping of settings")
        for key, value in _flatten(doc):
            set_value(cfg, key, value, f"--config {yaml_path}")
    for key, value in (flags or {}).items():
        if value is not None and value != []:
            set_value(cfg, key, value, "--" + key.replace("_", "-"))
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise MMToolError(f"override {item!r}: expected key=value (e.g. model.size=small)")
        set_value(cfg, key.strip(), value.strip(), "override")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as JSON-ready nested dicts."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(cls: type, doc: dict[str, Any]) -> Any:
    """Rebuilds a config saved by `to_dict`."""
    cfg = cls()
    for key, value in _flatten(doc):
        set_value(cfg, key, value, "config.json")
    return cfg
