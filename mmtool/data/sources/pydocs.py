"""`pydocs`: an English text corpus of the Python standard library's docstrings, read offline.

The corpus is whatever Python runs mmtool: the `.py` files under `sysconfig.get_paths()["stdlib"]`,
parsed with `ast` (never imported: importing `antigravity` opens a browser, `this` prints) for the
docstrings of modules, classes and functions/methods, cleaned with `ast.get_docstring(clean=True)`.
Excluded: test suites (`test/`, `tests/`, `idle_test/`), `idlelib/`, `turtledemo/`, `lib2to3/`,
`site-packages/`, `ensurepip/`, `pydoc_data/` (one generated dict), `encodings/` (a hundred generated
codec tables with the same boilerplate docstring), `config-*/` and `_sysconfigdata_*.py`.
Functions defined inside functions are skipped (they are implementation detail); definitions under
`if`/`try`/`with` at module or class level are kept.

Ids are `pydocs/{module}.{qualname}` (`pydocs/{module}` for a module docstring), e.g.
`pydocs/json.dumps`, `pydocs/collections.OrderedDict.popitem`; when a module defines the same
qualname twice (platform branches, `try`/`except ImportError` fallbacks) the later ones get `#2`, `#3`
in source order. Ids and order are stable for one Python version; another version is another corpus.

The index (module, qualname, file, line, text for every docstring) is built once per process and
also cached as JSON in `$XDG_CACHE_HOME/mmtool` (default `~/.cache/mmtool`), keyed by the Python
version and the stdlib path; parsing the stdlib takes a few seconds, loading the cache a fraction.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SOURCES, Source
from mmtool.errors import MMToolError

INDEX_VERSION = 1
"""Bumped whenever what goes into the index changes (invalidates the JSON caches)."""

SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages",
    "ensurepip", "pydoc_data", "encodings", "__pycache__", "lib-dynload", "__phello__",
})
SKIP_FILE_PREFIXES = ("_sysconfigdata_",)
_DEF_TYPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class DocEntry(NamedTuple):
    """One docstring of the index."""

    module: str  # dotted module name, e.g. "json.decoder"
    qualname: str  # "" for the module docstring, "JSONDecoder.decode" for a method
    file: str  # path relative to the stdlib folder, posix separators, e.g. "json/decoder.py"
    line: int  # line of the def/class (1 for a module docstring)
    text: str  # the cleaned docstring

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}" if self.qualname else self.module


def stdlib_root() -> Path:
    """The folder of the standard library's `.py` files."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, path) of every stdlib `.py` file kept, sorted by module name."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")
                             and "." not in d)  # a dotted folder is not an importable package
        rel = Path(dirpath).relative_to(root).parts
        for fn in filenames:
            if not fn.endswith(".py") or fn.startswith(SKIP_FILE_PREFIXES):
                continue
            stem = fn[:-3]
            parts = rel if stem == "__init__" else (*rel, stem)
            if parts:
                out.append((".".join(parts), Path(dirpath) / fn))
    return sorted(out)


def _docstrings(module: str, file: str, tree: ast.Module) -> list[DocEntry]:
    """Docstrings of the module, its classes and functions, and class members, in source order."""
    found = []
    text = ast.get_docstring(tree, clean=True)
    if text:
        found.append(DocEntry(module, "", file, 1, text))

    def walk(nodes: list[ast.AST], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, _DEF_TYPES):
                qualname = prefix + node.name
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    found.append(DocEntry(module, qualname, file, node.lineno, doc))
                if isinstance(node, ast.ClassDef):
                    walk(node.body, qualname + ".")
            elif isinstance(node, (ast.stmt, ast.excepthandler, ast.match_case)):
                # if/try/with/for/match blocks: defs inside still belong to this scope
                walk([c for c in ast.iter_child_nodes(node)
                      if isinstance(c, (ast.stmt, ast.excepthandler, ast.match_case))], prefix)

    walk(tree.body, "")
    return found


def build_index(root: Path | None = None) -> list[DocEntry]:
    """Parses every kept stdlib file; the entries sorted by (module, line, qualname)."""
    root = root or stdlib_root()
    entries: list[DocEntry] = []
    for module, path in _module_files(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old files
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. a file for another Python version: not part of this corpus
        file = path.relative_to(root).as_posix()
        entries += _docstrings(module, file, tree)
    entries.sort(key=lambda e: (e.module, e.line, e.qualname))
    return entries


def _cache_path(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmtool"
    version = ".".join(map(str, sys.version_info[:3]))
    key = hashlib.sha1(f"{INDEX_VERSION}:{root.resolve()}".encode()).hexdigest()[:10]
    return base / f"pydocs-{version}-{key}.json"


def _read_cache(path: Path, root: Path) -> list[DocEntry] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("index_version") != INDEX_VERSION or data.get("stdlib") != str(root.resolve()):
            return None
        return [DocEntry(*e) for e in data["entries"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing or damaged: rebuild


def _write_cache(path: Path, root: Path, entries: list[DocEntry]) -> None:
    """Writes the cache atomically (temp file + rename); a read-only home only costs the rebuild."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"index_version": INDEX_VERSION, "stdlib": str(root.resolve()),
                           "python": sys.version, "entries": [list(e) for e in entries]}, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


_INDEX: list[DocEntry] | None = None
_INDEX_LOCK = threading.Lock()


def load_index(use_cache: bool = True) -> list[DocEntry]:
    """The full index of this Python's stdlib: built once per process, cached on disk."""
    global _INDEX
    with _INDEX_LOCK:
        if _INDEX is None:
            root = stdlib_root()
            path = _cache_path(root)
            entries = _read_cache(path, root) if use_cache else None
            if entries is None:
                entries = build_index(root)
                if use_cache:
                    _write_cache(path, root, entries)
            _INDEX = entries
        return _INDEX


def _ids(entries: list[DocEntry]) -> list[str]:
    """Stable unique ids: a qualname seen again in the same module gets `#2`, `#3`, ..."""
    seen: dict[str, int] = {}
    out = []
    for e in entries:
        n = seen[e.name] = seen.get(e.name, 0) + 1
        out.append(f"pydocs/{e.name}" + (f"#{n}" if n > 1 else ""))
    return out


@dataclasses.dataclass
class PydocsOptions:
    """Options of the `pydocs` source."""

    min_chars: int = dataclasses.field(default=40, metadata={
        "help": "skip docstrings shorter than this many characters (one-liners like 'Return x.')"})
    max_chars: int = dataclasses.field(default=0, metadata={
        "help": "cut longer docstrings at the last whitespace before this many characters "
                "(0: keep whole and leave the length to the tokenizer)"})
    modules: str = dataclasses.field(default="", metadata={
        "help": "comma-separated module prefixes to keep, e.g. 'json,collections' (also keeps "
                "json.decoder, not jsonx); empty: all"})


@SOURCES.register("pydocs")
class PydocsSource(Source):
    """Docstrings of the Python standard library (parsed with ast, never imported): English text."""

    Options = PydocsOptions

    def __init__(self, options: PydocsOptions, split: str = "all"):
        super().__init__(options, split)
        if options.min_chars < 0:
            raise MMToolError(f"--opt min_chars={options.min_chars}: expected >= 0")
        if options.max_chars < 0:
            raise MMToolError(f"--opt max_chars={options.max_chars}: expected >= 0 (0: no limit)")
        prefixes = tuple(p.strip() for p in options.modules.split(",") if p.strip())
        index = load_index()
        ids = _ids(index)  # over the full index, so filtering never changes an id
        keep = [i for i, e in enumerate(index)
                if len(e.text) >= options.min_chars
                and (not prefixes or any(e.module == p or e.module.startswith(p + ".") for p in prefixes))]
        if not keep:
            raise MMToolError(
                f"--opt modules={options.modules!r} min_chars={options.min_chars}: no stdlib docstring "
                f"matches (under {stdlib_root()}); check the module names")
        self._entries = [index[i] for i in keep]
        self._ids = [ids[i] for i in keep]

    def __len__(self) -> int:
        return len(self._entries)

    def record_id(self, index: int) -> str:
        return self._ids[index]

    def record_key(self, index: int) -> bytes:
        return f"{self._ids[index]}\0{self._entries[index].text}".encode()

    def content_version(self) -> str:
        # The index is parsed from this Python's stdlib; its docstrings are the record keys.
        return f"pydocs:{INDEX_VERSION}:{sys.version.split()[0]}:{stdlib_root()}"

    def location(self, index: int) -> str:
        e = self._entries[index]
        return f"{stdlib_root() / e.file}:{e.line} ({e.name})"

    def read(self, index: int) -> Record:
        if not 0 <= index < len(self._entries):  # a negative index would wrap to another record
            raise IndexError(f"pydocs: record {index} out of range 0..{len(self._entries) - 1}")
        e = self._entries[index]
        text, limit = e.text, self.options.max_chars
        truncated = bool(limit) and len(text) > limit
        if truncated:
            cut = text[:limit]
            space = max(cut.rfind(" "), cut.rfind("\n"))
            text = (cut[:space] if space > limit // 2 else cut).rstrip()
        meta = {"module": e.module, "qualname": e.qualname, "file": e.file, "line": e.line}
        if truncated:
            meta["truncated_from"] = len(e.text)
        return Record(id=self._ids[index], task="text", fields=[Field("text", "document", text)],
                      meta=meta)
