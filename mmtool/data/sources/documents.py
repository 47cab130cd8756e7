"""`documents`: a folder (or glob, or list) of plain-text files, one record per file.

The usual shape of a corpus of notes, papers converted to text, or book chapters:
`--opt path=docs/` reads every `.txt`/`.md` file under `docs/` (recursively, in sorted order);
`--opt path='docs/**/*.rst::more/*.txt'` takes globs and `::`-separated lists. Each file becomes a
text segment (role `document`), its id the path relative to the common folder (`ch01/intro.txt`),
its meta the file name and size. Files are decoded as UTF-8 (`--opt encoding=`); a file that does
not decode, or is empty, is rejected as `FILE` with the reason, and the job goes on.

Long documents are not cut: preprocessing splits them into chunks of `--opt max_tokens` tokens
with `--opt overlap` tokens shared (ids `ID#k`), see `mmtool.data.chunking`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SOURCES, MappingRow, Source
from mmtool.data.sources.keymap import list_files
from mmtool.errors import MMToolError, RecordError

SUFFIXES = (".txt", ".md", ".rst", ".text")
"""Files a folder contributes (globs and explicit paths take any name)."""

MAX_FILE_BYTES = 256 * 2**20
"""A larger file is rejected unread (chunking bounds the tokens, not the bytes read)."""


@dataclasses.dataclass
class DocumentsOptions:
    """Options of the `documents` source."""

    path: str = dataclasses.field(default="", metadata={
        "help": "a folder (its .txt/.md/.rst files, recursively), file, glob or {000..009} pattern; "
                "several separated by '::'"})
    encoding: str = dataclasses.field(default="utf-8", metadata={
        "help": "the files' text encoding (a file that does not decode is rejected)"})
    role: str = dataclasses.field(default="document", metadata={
        "help": "the text segment's role"})


@SOURCES.register("documents")
class DocumentsSource(Source):
    """Plain-text files (`--opt path=FOLDER|GLOB`), one record per file, id its relative path."""

    Options = DocumentsOptions

    def __init__(self, options: DocumentsOptions, split: str = "all"):
        super().__init__(options, split)
        try:
            "".encode(options.encoding)
        except LookupError:
            raise MMToolError(f"--opt encoding={options.encoding}: unknown encoding") from None
        self.files = list_files(options.path, "path", SUFFIXES)
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in self.files]))
        self._ids = [p.resolve().relative_to(root).as_posix() for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def record_id(self, index: int) -> str:
        return self._ids[index]

    def location(self, index: int) -> str:
        return str(self.files[index])

    def input_files(self) -> list[Path]:
        return list(self.files)

    def record_files(self, index: int) -> list[Path]:
        return [self.files[index]]

    def mapping(self) -> list[MappingRow]:
        suffixes = sorted({p.suffix or "(no suffix)" for p in self.files})
        return [MappingRow(f"file contents ({len(self.files)} files: {', '.join(suffixes)})", "text",
                           self.options.role, f"decoded as {self.options.encoding}; long files chunked"),
                MappingRow("relative path", "id"),
                MappingRow("file name, bytes", "meta")]

    def read(self, index: int) -> Record:
        path = self.files[index]
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise RecordError(f"{size} bytes, more than {MAX_FILE_BYTES} (split the file)")
            text = path.read_bytes().decode(self.options.encoding)
        except UnicodeDecodeError as exc:
            raise RecordError(f"not {self.options.encoding} text: byte {exc.start} "
                              f"({exc.object[exc.start:exc.start + 1]!r}) does not decode") from None
        except OSError as exc:
            raise RecordError(f"cannot read: {exc.strerror or exc}") from None
        if not text.strip():
            raise RecordError("empty document")
        return Record(id=self._ids[index], task="document",
                      fields=[Field("text", self.options.role, text)],
                      meta={"file": path.name, "bytes": size})
