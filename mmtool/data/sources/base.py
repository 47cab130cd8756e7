"""The source interface, its registry, and `--opt key=value` parsing."""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from mmtool.data.schema import SPLITS, Record, assign_split
from mmtool.errors import MMToolError
from mmtool.registry import Registry

SOURCES: Registry[type["Source"]] = Registry(
    "sources", "dataset adapters that read raw records for `mmtool preprocess`",
    builtins="mmtool.data.sources",
)

REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_DATA = REPO_ROOT / "sample_data"
"""The bundled `sample_data/` folder (sources read it by default)."""


MAPPING_TARGETS = ("image", "audio", "text", "observation", "action", "reward", "label", "id", "task",
                   "order", "meta", "ignored")
"""What an input column/field can become (`MappingRow.target`)."""


@dataclasses.dataclass(frozen=True)
class MappingRow:
    """How one input column or field is read (`Source.mapping`).

    Attributes:
        input: the column, key or field name in the user's data (or a description for generated
            data, e.g. "(generated) image").
        target: one of `MAPPING_TARGETS`: a modality, the record's `id`/`label`/`task`, `order`
            (sorts or groups rows, e.g. an episode's step index; not stored), `meta` (copied, not
            trained on) or `ignored`.
        role: the segment role for modalities (caption, document, ...), else "".
        note: why, in a few words (e.g. "path-like strings: not text unless mapped").
    """

    input: str
    target: str
    role: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        """The row as a JSON object (the manifest's `mapping` list)."""
        return dataclasses.asdict(self)

    def line(self) -> str:
        """The row as one line, `INPUT → TARGET [role]: note`."""
        return (f"{self.input} → {self.target}" + (f" [{self.role}]" if self.role else "")
                + (f": {self.note}" if self.note else ""))


@dataclasses.dataclass
class NoOptions:
    """A source without options."""


class Source(ABC):
    """Reads raw records by index: random access makes parallel and resumed runs exact.

    Subclasses set `Options` to a dataclass whose fields (with defaults and a `help` metadata entry)
    are the source's `--opt key=value` options, and implement `__len__`, `record_id` and `read`.
    Construction may load an index (file list, dataset handle), but should not decode every record.

    Args:
        options: an instance of `Options`.
        split: "all" or one of train/validation/test; see `indices`.
    """

    Options: ClassVar[type] = NoOptions
    registry_name: ClassVar[str] = ""

    def __init__(self, options: Any, split: str = "all"):
        self.options = options
        self.split = split

    @property
    def name(self) -> str:
        """The registered name of this source."""
        return self.registry_name

    @abstractmethod
    def __len__(self) -> int:
        """Number of records before split selection."""

    @abstractmethod
    def record_id(self, index: int) -> str:
        """The stable id of record `index`, cheap (no decoding): splits are assigned from it."""

    @abstractmethod
    def read(self, index: int) -> Record:
        """Reads and decodes record `index`.

        Raises:
            RecordError: the record is bad (undecodable, missing file, NaN, ...).
        """

    def location(self, index: int) -> str:
        """Where record `index` lives, for error messages and `rejected.jsonl`."""
        return f"{self.name} record {index}"

    def split_of(self, index: int) -> str:
        """The split of record `index`: a stable hash of its id (80/10/10) unless overridden."""
        return assign_split(self.name, self.record_id(index))

    # -- content keys (see mmtool.data.inputs): what the records read -----------------------------
    data_version: ClassVar[str] = "1"
    """Bumped when the records a source generates change for the same options and files."""

    def input_files(self) -> list[Path]:
        """Every file the source reads (manifest, media, bundled data); default: none.

        Preprocessing stores their size, mtime_ns and sha256, and rebuilds when one changes.
        """
        return []

    def record_files(self, index: int) -> list[Path]:
        """The files among `input_files()` that record `index` reads (default: none)."""
        return []

    def record_key(self, index: int) -> bytes:
        """Bytes that change whenever record `index` does, apart from `record_files(index)`'s
        contents (which the caller adds). Default: the record id (for sources whose records follow
        from their options, seed and `content_version()`)."""
        return self.record_id(index).encode()

    def content_version(self) -> str:
        """What else the records depend on, as a string: default `NAME:data_version`."""
        return f"{self.name}:{self.data_version}"

    # -- nothing silent: what is read, and what is skipped ----------------------------------------
    def mapping(self) -> list[MappingRow]:
        """Which input column/field becomes which modality/role, id, label or meta, and which are
        ignored, known before anything is written (preprocess prints it and stores it in the
        manifest as `mapping`).

        The default suits sources whose fields are fixed (built-in data): it reads the first record
        of the split and reports its fields, id, label and meta keys. Sources that read user data
        (`jsonl`, `hf`) override it with the columns they find.
        """
        for index in self.indices()[:1]:
            try:
                record = self.read(index)
            except Exception:  # noqa: BLE001 - a bad first record is reported when it is written
                return []
            rows = [MappingRow(f"{f.modality} field", f.modality, f.role, "fixed by the source")
                    for f in record.fields]
            rows.append(MappingRow("record id", "id", "", "fixed by the source"))
            if record.label is not None:
                rows.append(MappingRow("label", "label", "", "fixed by the source"))
            rows += [MappingRow(k, "meta") for k in sorted(record.meta)]
            return rows
        return []

    def describe_mapping(self) -> list[str]:
        """`mapping()` as lines `INPUT → TARGET [role]: note` (see `MappingRow.line`)."""
        return [row.line() for row in self.mapping()]

    def skipped(self) -> dict[str, int]:
        """Inputs that are not records and were passed over, by reason (e.g. blank lines); counted
        in the manifest's `skipped`, never in `records`. Default: none."""
        return {}

    def indices(self) -> list[int]:
        """Record indices that belong to `self.split`, in reading order."""
        if self.split == "all":
            return list(range(len(self)))
        return [i for i in range(len(self)) if self.split_of(i) == self.split]


def _coerce(value: str, annotation: Any, key: str, source: str) -> Any:
    """Converts an `--opt` string to the option's annotated type."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str, "Path": Path}.get(
            annotation.replace("| None", "").replace("None |", "").strip(), str)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if args else str
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, Path, str):
            return annotation(value)
    except ValueError:
        raise MMToolError(
            f"--opt {key}={value}: source {source!r} expects {getattr(annotation, '__name__', annotation)}"
        ) from None
    return value


def parse_options(source_cls: type[Source], pairs: list[str] | dict[str, Any] | None) -> Any:
    """Builds `source_cls.Options` from `key=value` strings (or a dict), naming bad keys clearly."""
    fields = {f.name: f for f in dataclasses.fields(source_cls.Options)}
    items = pairs.items() if isinstance(pairs, dict) else [
        (p.split("=", 1) if "=" in p else (p, None)) for p in (pairs or [])
    ]
    kwargs = {}
    for key, value in items:
        if value is None:
            raise MMToolError(f"--opt {key!r}: expected key=value")
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise MMToolError(
                f"--opt {key}: source {source_cls.registry_name!r} has no option {key!r} (options: {known})"
            )
        kwargs[key] = _coerce(value, fields[key].type, key, source_cls.registry_name) \
            if isinstance(value, str) else value
    return source_cls.Options(**kwargs)


def build_source(name: str, options: list[str] | dict[str, Any] | None = None,
                 split: str = "all") -> Source:
    """Builds the registered source `name` from `--opt` strings or a dict of options."""
    if split != "all" and split not in SPLITS:
        raise MMToolError(f"--split {split}: expected all, {', '.join(SPLITS)}")
    cls = SOURCES.get(name)
    return cls(parse_options(cls, options), split=split)


def option_help(source_cls: type[Source]) -> list[tuple[str, str, str]]:
    """(name, default, help) for each option of a source, for `mmtool ls sources -v`."""
    out = []
    for f in dataclasses.fields(source_cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        out.append((f.name, str(default), f.metadata.get("help", "")))
    return out
