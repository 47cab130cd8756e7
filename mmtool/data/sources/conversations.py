"""`conversations`: LLaVA and ShareGPT chat records as role-tagged turns, images where `<image>` stands.

Two layouts, in a JSON array (`[{...}, {...}]`) or JSON lines (one object a line), detected from the
file's first non-blank character (`--opt format=array|jsonl` forces one):

    {"id": "vqa-1", "image": "coco/0001.jpg",                                           # LLaVA
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red cup."}]}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

* Turns: `conversations` (else `messages`), a non-empty list, kept in order. Each turn's speaker is
  `from` (else `role`), normalized: human/user → `user`; gpt/assistant/chatgpt/model/bard/bing →
  `assistant`; system → `system`; tool/function/ipython → `tool` (anything else rejects its record).
  Its text is `value` (else `content`): a string, or OpenAI-style parts `[{"type": "text", "text":
  ...}, {"type": "image"}]` whose image parts count as placeholders. Every text piece becomes a
  `text` segment whose *role* is the speaker's, so that `next-token:roles=assistant` (preset
  `chat`) trains on the assistant turns only while the others stay context.
* Images: `image` (else `images`), a path or a list of paths, relative to the file's folder and
  confined to `--opt image_root=DIR` (default: that folder) as `jsonl` confines media. Each `<image>`
  placeholder is replaced by the next image's segment, between the text before and after it; one
  newline touching the placeholder is dropped with it (LLaVA writes `<image>\\n`), all other text is
  kept as written, case and newlines included. A record with images but no placeholder gets them
  before its first turn; a count mismatch, or a placeholder without an image, rejects the record.
* `id` (a string or integer) is the sample id, else the record's index (0-based, in file order).
  `task` is `conversation` (or `image+conversation`). Every other top-level key goes to the meta,
  never into the text; turn keys other than the speaker and text are ignored (`describe_mapping`).
* `--opt role_prefix=true` writes `ROLE: ` before each turn's first text piece (e.g. `user: `), so
  that the model sees who speaks; by default the text is stored exactly and the speaker lives only
  in the segment role (turn boundaries are the tokenizer's BOS/EOS or [CLS]/[SEP] around each piece).

A JSON array is parsed whole when the source opens (once per worker) and kept as compact bytes;
JSON lines are indexed by byte offset and read one line at a time (better for files of gigabytes).
A record without turns, with an empty turn, or not a JSON object is a `RecordError` naming its
index (`FILE#N` for arrays, `FILE:LINE` for JSON lines); a file that is not valid JSON as a whole
(array layout) is an `MMToolError` naming the file and position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmtool.data import media
from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SOURCES, MappingRow, Source
from mmtool.data.sources.jsonl import _scan_lines
from mmtool.errors import RECORD_FAILURES, MMToolError, RecordError

SPEAKERS = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bard": "assistant", "bing": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "ipython": "tool",
}
"""Speaker names as found in LLaVA / ShareGPT / OpenAI-style data → the segment role they get."""

TURN_KEYS, SPEAKER_KEYS, TEXT_KEYS = ("conversations", "messages"), ("from", "role"), ("value", "content")
IMAGE_KEYS = ("image", "images")
KNOWN_KEYS = (*TURN_KEYS, *IMAGE_KEYS, "id")


@dataclass
class ConversationOptions:
    path: Path | None = field(default=None, metadata={
        "help": "(required) the LLaVA / ShareGPT file: a JSON array or JSON lines"})
    format: str = field(default="auto", metadata={
        "help": "auto (from the first character: '[' = array), array or jsonl"})
    image_root: Path | None = field(default=None, metadata={
        "help": "the data root: image paths (relative to the file's folder, or absolute) must "
                "resolve inside it, symlinks followed; default: the file's folder"})
    allow_outside: bool = field(default=False, metadata={
        "help": "follow image paths that lead outside the data root (absolute, '..', symlinks)"})
    placeholder: str = field(default="<image>", metadata={
        "help": "the text that marks where an image stands in a turn"})
    role_prefix: bool = field(default=False, metadata={
        "help": "write 'ROLE: ' before each turn's text (user: / assistant: ...); default: text as is"})
    max_pixels: int = field(default=media.DEFAULT_MAX_PIXELS, metadata={
        "help": "reject images with more pixels than this (checked before decoding)"})
    max_line_bytes: int = field(default=64 * 2**20, metadata={
        "help": "JSON lines: reject lines longer than this many bytes (64 MiB)"})


@SOURCES.register("conversations")
class ConversationSource(Source):
    """LLaVA / ShareGPT conversations (JSON array or JSONL) as role-tagged turns (`--opt path=FILE`)."""

    Options = ConversationOptions

    def __init__(self, options: ConversationOptions, split: str = "all"):
        super().__init__(options, split)
        if options.path is None or str(options.path) == "":
            raise MMToolError("source 'conversations' needs --opt path=FILE.json (or .jsonl)")
        self.path = Path(options.path)
        if not self.path.is_file():
            raise MMToolError(f"--opt path={self.path}: no such file")
        self.base_dir = self.path.parent
        self.image_root = Path(options.image_root) if options.image_root else self.base_dir
        if not self.image_root.is_dir():
            raise MMToolError(f"--opt image_root={options.image_root}: no such folder")
        if not options.placeholder:
            raise MMToolError("--opt placeholder: must not be empty")
        if options.max_line_bytes < 1:
            raise MMToolError(f"--opt max_line_bytes={options.max_line_bytes}: must be positive")
        self.layout = self._detect(options.format)
        if self.layout == "array":
            self._items = self._load_array()  # compact JSON bytes of each element
        else:
            offsets, lines = _scan_lines(self.path)
            self._offsets, self._lines = np.asarray(offsets, np.int64), np.asarray(lines, np.int64)

    def _detect(self, fmt: str) -> str:
        if fmt in ("array", "jsonl"):
            return fmt
        if fmt != "auto":
            raise MMToolError(f"--opt format={fmt}: expected auto, array or jsonl")
        with open(self.path, "rb") as f:
            while block := f.read(1 << 16):
                head = block.lstrip(b"\xef\xbb\xbf \t\r\n")
                if head:
                    return "array" if head[:1] == b"[" else "jsonl"
        return "jsonl"  # empty file: no records

    def _load_array(self) -> list[bytes]:
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except UnicodeDecodeError as exc:
            raise MMToolError(f"{self.path}: not valid UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise MMToolError(f"{self.path}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}") from None
        except (RecursionError, ValueError, MemoryError) as exc:
            raise MMToolError(f"{self.path}: cannot parse the JSON array: {exc!s:.200}") from None
        if not isinstance(data, list):
            raise MMToolError(f"{self.path}: expected a JSON array of conversation records, got a "
                              f"{type(data).__name__} (--opt format=jsonl for one object per line)")
        return [json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode() for item in data]

    def __len__(self) -> int:
        return len(self._items) if self.layout == "array" else len(self._offsets)

    def location(self, index: int) -> str:
        if self.layout == "array":
            return f"{self.path}#{index}"
        return f"{self.path}:{int(self._lines[index])}"

    # -- raw records ------------------------------------------------------------------------------
    def _raw(self, index: int) -> bytes:
        if self.layout == "array":
            return self._items[index]
        limit = self.options.max_line_bytes
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            raw = f.readline(limit + 1)
        if len(raw.rstrip(b"\r\n")) > limit:
            raise RecordError(f"line is longer than max_line_bytes={limit} (--opt max_line_bytes)")
        return raw

    def _parse(self, index: int) -> dict[str, Any]:
        raw = self._raw(index)
        try:
            obj = json.loads(media.decode_text(raw, "line"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
        except (RecursionError, ValueError, MemoryError) as exc:
            raise RecordError(f"invalid JSON: {' '.join(str(exc).split())[:200]}") from None
        if not isinstance(obj, dict):
            raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    def record_id(self, index: int) -> str:
        try:
            rid = self._parse(index).get("id")
        except RecordError:  # `read` rejects it; it still needs an id for its split
            rid = None
        return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else str(index)

    # -- content keys -----------------------------------------------------------------------------
    def record_key(self, index: int) -> bytes:
        try:
            return b"%d\0" % index + self._raw(index)
        except RecordError:
            return b"%d\0long" % index

    def record_files(self, index: int) -> list[Path]:
        try:
            obj = self._parse(index)
            return [self._image_path(p) for p in _image_values(obj)]
        except (RecordError, *RECORD_FAILURES):
            return []  # `read` rejects the record

    def input_files(self) -> list[Path]:
        files = [self.path]
        for i in range(len(self)):
            if self.layout == "jsonl" or b'"image' in self._items[i]:
                files += self.record_files(i)
        return list(dict.fromkeys(files))  # an image that several records name: once

    def _image_path(self, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise RecordError(f"an image must be a file path string, got {value!r:.60}")
        return media.confined_path(value, self.base_dir, self.image_root, self.options.allow_outside)

    # -- decoding ---------------------------------------------------------------------------------
    def read(self, index: int) -> Record:
        try:
            return self._read(index)
        except RecordError as err:
            raise err.at(self.location(index))

    def _read(self, index: int) -> Record:
        obj = self._parse(index)
        turns = _turns(obj, self.options.placeholder)
        images = [self._image_path(p) for p in _image_values(obj)]
        ph = self.options.placeholder
        n_ph = sum(text.count(ph) for _, text in turns)
        if n_ph and n_ph != len(images):
            raise RecordError(f"{n_ph} {ph} placeholder(s) but {len(images)} image(s)")
        fields: list[Field] = []
        if images and not n_ph:  # LLaVA convention: the image comes first
            fields += [Field("image", "image", media.load_image(p, self.options.max_pixels)) for p in images]
            images = []
        pending = iter(images)
        for t, (role, text) in enumerate(turns):
            pieces = _split(text, ph)
            prefix = f"{role}: " if self.options.role_prefix else ""
            for j, piece in enumerate(pieces):
                if j:  # a placeholder stood between pieces j-1 and j
                    fields.append(Field("image", "image",
                                        media.load_image(next(pending), self.options.max_pixels)))
                if piece.strip():
                    fields.append(Field("text", role, prefix + piece))
                    prefix = ""
            if len(pieces) == 1 and not text.strip():
                raise RecordError(f"turn {t} ({role}) has empty text")
        meta = {k: v for k, v in obj.items() if k not in KNOWN_KEYS}
        meta["turns"] = [role for role, _ in turns]
        task = "image+conversation" if any(f.modality == "image" for f in fields) else "conversation"
        return Record(id=self.record_id(index), task=task, fields=fields, meta=meta)

    MAPPING_SCAN = 100
    """Records read to find the keys that `mapping_rows` reports."""

    def mapping_rows(self) -> list[tuple[str, str, str, str]]:
        """(input key, target, role, note) for every key of the first `MAPPING_SCAN` records: what
        becomes a text or image segment, the id, meta, or is ignored. Nothing is silent."""
        top: dict[str, int] = {}
        turn_keys: dict[str, int] = {}
        n = min(len(self), self.MAPPING_SCAN)
        for index in range(n):
            try:
                obj = self._parse(index)
            except RecordError:
                continue
            for key in obj:
                top[key] = top.get(key, 0) + 1
            turns = next((obj[k] for k in TURN_KEYS if isinstance(obj.get(k), list)), [])
            for key in {k for turn in turns if isinstance(turn, dict) for k in turn}:
                turn_keys[key] = turn_keys.get(key, 0) + 1
        def note(*parts: str, count: int = n) -> str:
            seen = f"in {count} of the first {n} records" if count < n else ""
            return "; ".join(p for p in (*parts, seen) if p)

        ph, rows = self.options.placeholder, []
        for key, count in top.items():
            if key in TURN_KEYS:
                rows.append((key, "text", "user, assistant, system or tool (from from/role)", note(
                    f"one text segment per turn in order, split at {ph}", "case and newlines as written"
                    + (", after 'ROLE: '" if self.options.role_prefix else ""), count=count)))
            elif key in IMAGE_KEYS:
                rows.append((key, "image", "image", note(f"where {ph} stands, else before the first turn",
                                                         f"paths under {self.image_root}", count=count)))
            elif key == "id":
                rows.append((key, "id", "", note("else the record's index", count=count)))
            else:
                rows.append((key, "meta", "", note("copied, never text", count=count)))
        if "id" not in top:
            rows.append(("(record index)", "id", "", "no id key"))
        rows += [(f"turn.{key}", "ignored", "", note("only from/role and value/content are read", count=count))
                 for key, count in turn_keys.items() if key not in (*SPEAKER_KEYS, *TEXT_KEYS)]
        return rows

    def mapping(self) -> list[MappingRow]:
        """`mapping_rows` as `MappingRow`s (preprocess prints them and stores them in the manifest)."""
        return [MappingRow(*r) for r in self.mapping_rows()]


def _turns(obj: dict[str, Any], placeholder: str = "<image>") -> list[tuple[str, str]]:
    """(role, text) of each turn of a record, roles normalized by `SPEAKERS`."""
    key = next((k for k in TURN_KEYS if k in obj), None)
    turns = obj.get(key) if key else None
    if not isinstance(turns, list) or not turns:
        keys = ", ".join(sorted(obj)) or "none"
        raise RecordError(f"no turns: expected a non-empty 'conversations' or 'messages' list "
                          f"(keys: {keys})")
    out = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {t} must be an object, got {type(turn).__name__}")
        speaker = next((turn[k] for k in SPEAKER_KEYS if k in turn), None)
        text = next((turn[k] for k in TEXT_KEYS if k in turn), None)
        role = SPEAKERS.get(speaker.strip().lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RecordError(f"turn {t}: unknown speaker {speaker!r:.40} (from/role: expected one of "
                              f"{', '.join(SPEAKERS)})")
        out.append((role, _turn_text(text, t, role, placeholder)))
    return out


def _turn_text(content: Any, t: int, role: str, placeholder: str) -> str:
    """A turn's text: a string, or OpenAI-style parts (`[{"type": "text", "text": ...},
    {"type": "image"}]`) joined, each image part written as the placeholder where it stands."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for part in content:
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif part.get("type") in ("image", "image_url"):
                parts.append(placeholder)
            else:
                raise RecordError(f"turn {t} ({role}): content part {part.get('type')!r:.30} is "
                                  "neither text nor image")
        return "".join(parts)
    raise RecordError(f"turn {t} ({role}): value/content must be a string or a list of "
                      f"text/image parts, got {type(content).__name__}")


def _image_values(obj: dict[str, Any]) -> list[Any]:
    """The record's image references, in order (none when it has no `image`/`images`)."""
    value = next((obj[k] for k in IMAGE_KEYS if k in obj and obj[k] is not None), None)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _split(text: str, placeholder: str) -> list[str]:
    """The text around each placeholder, one newline touching the placeholder dropped with it."""
    pieces = text.split(placeholder)
    for j in range(len(pieces)):
        if j > 0 and pieces[j].startswith("\n"):
            pieces[j] = pieces[j][1:]
        if j < len(pieces) - 1 and pieces[j].endswith("\n"):
            pieces[j] = pieces[j][:-1]
    return pieces
