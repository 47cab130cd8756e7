"""Registries: named collections of swappable parts (sources, tokenizers, models, ...).

Every extensible thing in mmtool is looked up by name in a `Registry`. Entries arrive three ways:

* a decorator in mmtool itself: `@SOURCES.register("digits")`;
* a third-party package that declares an entry point in the registry's group, e.g. in its
  `pyproject.toml`: `[project.entry-points."mmtool.sources"] mydata = "mypkg.sources:MySource"`;
* a direct call `REGISTRY.add(name, obj)` (tests, notebooks).

`mmtool ls` prints every registry from `all_registries()`, so listings never drift from code.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from mmtool.errors import MMToolError

T = TypeVar("T")

_ALL: dict[str, "Registry"] = {}


class UnknownNameError(MMToolError, KeyError):
    """A name that no entry of a registry has."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise.
        return str(self.args[0])


def first_doc_line(obj: object) -> str:
    """Returns the first non-empty line of `obj`'s docstring, or "" when it has none."""
    for line in (getattr(obj, "__doc__", None) or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class Registry(Generic[T]):
    """A named dict of entries filled by decorators and by Python entry points.

    Args:
        kind: the registry's plural name as shown by `mmtool ls` (e.g. "sources").
        description: one line saying what the entries are.
        entry_point_group: the entry-point group that third-party packages use; defaults to
            `mmtool.<kind>`.
        builtins: a package whose submodules register the built-in entries; imported on first use,
            so that importing the registry itself stays cheap.
    """

    def __init__(self, kind: str, description: str, entry_point_group: str | None = None,
                 builtins: str | None = None):
        self.kind = kind
        self.description = description
        self.entry_point_group = entry_point_group or f"mmtool.{kind}"
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}
        self._loaded = False
        _ALL[kind] = self

    # -- filling ---------------------------------------------------------------------------
    def add(self, name: str, obj: T, description: str | None = None) -> T:
        """Adds `obj` under `name`; a second entry with the same name is an error."""
        if name in self._entries and self._entries[name] is not obj:
            raise MMToolError(f"{self.kind}: {name!r} is registered twice")
        self._entries[name] = obj
        self._descriptions[name] = description or first_doc_line(obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type(importlib)):
            try:
                setattr(obj, "registry_name", name)
            except (AttributeError, TypeError):
                pass
        return obj

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        """Decorator form of `add`: `@REG.register("name")`."""

        def decorate(obj: T) -> T:
            return self.add(name, obj, description)

        return decorate

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._builtins:
            import_submodules(self._builtins)
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not break mmtool
                raise MMToolError(
                    f"{self.kind}: entry point {ep.name!r} ({ep.value}) failed to load: {exc}"
                ) from exc
            if ep.name not in self._entries:  # loading may have registered it already
                self.add(ep.name, obj)

    # -- lookup ----------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """Returns the entry `name`, or raises `UnknownNameError` listing close matches."""
        self._ensure_loaded()
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown {_singular(self.kind)} {name!r}{hint} "
            f"(known: {', '.join(sorted(self._entries))}; `mmtool ls {self.kind}` describes them)"
        )

    def describe(self, name: str) -> str:
        """Returns the one-line description of entry `name`."""
        self.get(name)
        return self._descriptions[name]

    def names(self) -> list[str]:
        """Returns the entry names, sorted."""
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _singular(kind: str) -> str:
    """"sources" → "source", "strategies" → "strategy"."""
    if kind.endswith("ies"):
        return kind[:-3] + "y"
    return kind[:-1] if kind.endswith("s") else kind


def import_submodules(package: str) -> None:
    """Imports every submodule of `package`, so that their decorators register entries."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, prefix=package + "."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)


# Packages whose import creates registries; `all_registries` imports them so that `mmtool ls`
# sees every registry even before anything else touched it.
REGISTRY_HOMES = ["mmtool.data.sources", "mmtool.data.tokenizers", "mmtool.data.batching",
                  "mmtool.models.attention", "mmtool.models.encoders", "mmtool.models.fusion",
                  "mmtool.models.objectives", "mmtool.models.tasks", "mmtool.models.builders", "mmtool.embed.frozen",
                  "mmtool.transfer.tasks", "mmtool.transfer.protocols",
                  "mmtool.train.probes", "mmtool.analysis.ablated_batches", "mmtool.experiments", "mmtool.experiments.sweep_evals",
                  "mmtool.train.loggers"]


def all_registries() -> dict[str, Registry]:
    """Returns every registry by kind, with its built-in entries and entry points loaded."""
    for home in REGISTRY_HOMES:
        importlib.import_module(home)
    for reg in _ALL.values():
        reg._ensure_loaded()
    return dict(sorted(_ALL.items()))
