"""`webdataset`: samples from local WebDataset tar shards, streamed from the tars (never copied).

    mmtool preprocess webdataset --opt urls='shards/train-{000..003}.tar' --out data/wds

A WebDataset shard is a plain tar whose members are grouped into samples by key: the member's
path up to the first dot of its basename (`a/b/0001.seg.png` → key `a/b/0001`, extension
`seg.png`). Extensions are lower-cased. `urls` takes files, folders (their `.tar` files), globs and
`{000..003}` / `{a,b}` brace patterns, several separated by `::`. Only uncompressed tars are read
(a `.tar.gz` cannot be read by offset: decompress it first).

Construction reads the tar headers once and keeps, per sample, each member's byte offset and size;
`read` seeks to just those bytes, so parallel and resumed runs are exact.

Default mapping (`describe_mapping()` lists it with the extensions actually found):

* `jpg`/`jpeg`/`png`/`webp` → image (the first present, in that order: mixed `.jpg` and `.png`
  samples in one dataset are fine); `txt` → text (role caption next to an image, transcript next
  to audio, else document); `wav`/`flac` → audio; `cls` → label (an integer);
* `json` → its top-level fields are copied into the record's meta (never text) unless mapped;
* `__key__` → the record id (`TAR_STEM/KEY` when keys repeat across tars); `__url__` (the tar's
  path) → meta; neither ever becomes text;
* any other extension is ignored (and reported).

`--opt map=text:json.caption,label:json.label,image:seg.png` overrides a target with an extension
or a (nested, dot-separated) field of the sample's `.json`; `id:json.uid` takes the id from a field.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtool.data import media
from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SOURCES, MappingRow, Source
from mmtool.data.sources.keymap import list_files, parse_key_map
from mmtool.errors import MMToolError, RecordError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac")
DEFAULTS = {"image": IMAGE_EXTS, "text": ("txt",), "audio": AUDIO_EXTS, "label": ("cls",)}
TARGETS = ("image", "text", "audio", "label", "id")


@dataclass
class WebDatasetOptions:
    urls: str = field(default="", metadata={
        "help": "(required) tar shards: files, folders, globs, {000..009} patterns; '::' separates"})
    map: str = field(default="", metadata={
        "help": "TARGET:SOURCE pairs (targets image, text, audio, label, id; sources an extension "
                "or json.FIELD.SUBFIELD), e.g. text:json.caption,label:json.label"})
    text_role: str = field(default="", metadata={
        "help": "role of the text; default: caption with an image, transcript with audio, else "
                "document"})
    max_pixels: int = field(default=media.DEFAULT_MAX_PIXELS, metadata={
        "help": "reject images with more pixels than this (checked before decoding)"})


@dataclass
class _Sample:
    shard: int
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)
    repeated: list[str]  # extensions that occur twice under this key


@SOURCES.register("webdataset")
class WebDatasetSource(Source):
    """WebDataset tar shards (`--opt urls=...`), one record per key."""

    Options = WebDatasetOptions

    def __init__(self, options: WebDatasetOptions, split: str = "all"):
        super().__init__(options, split)
        self.shards = list_files(options.urls, "urls", (".tar",))
        self.map = parse_key_map(options.map, "map", TARGETS)
        for target, src in self.map.items():
            if target == "id" and not src.startswith("json.") and src != "__key__":
                raise MMToolError(f"--opt map=...id:{src}: the id comes from __key__ or a json.FIELD")
        self.samples: list[_Sample] = []
        self.skipped_members: Counter[str] = Counter()  # non-file members, names without a dot
        for i, path in enumerate(self.shards):
            self.samples += self._index(i, path)
        if not self.samples:
            raise MMToolError(f"--opt urls={options.urls}: the tars hold no samples")
        self.extensions = Counter(ext for s in self.samples for ext in s.members)
        self.prefixed = len({s.key for s in self.samples}) < len(self.samples)
        """Keys repeat across tars (e.g. every shard restarts at 000000): ids become TAR_STEM/KEY."""
        self._handles: dict[int, Any] = {}

    def _index(self, shard: int, path: Path) -> list[_Sample]:
        """The samples of one tar, grouped by key in order of first appearance."""
        by_key: dict[str, _Sample] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        self.skipped_members["non-file member"] += 1
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot or not stem:
                        self.skipped_members["member without key.extension"] += 1
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    sample = by_key.setdefault(key, _Sample(shard, key, {}, []))
                    ext = ext.lower()
                    if ext in sample.members:
                        sample.repeated.append(ext)
                    sample.members[ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise MMToolError(f"--opt urls: cannot read {path} as an uncompressed tar "
                              f"(decompress .tar.gz first): {exc}") from None
        return list(by_key.values())

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files stay with their process

    def location(self, index: int) -> str:
        s = self.samples[index]
        return f"{self.shards[s.shard]}:{s.key}"

    # -- content keys: the tar is an input; a record's key is its members' names, offsets, sizes --
    def input_files(self) -> list[Path]:
        return list(self.shards)

    def record_files(self, index: int) -> list[Path]:
        return [self.shards[self.samples[index].shard]]

    def record_key(self, index: int) -> bytes:
        s = self.samples[index]
        members = ";".join(f"{e}@{o}+{n}" for e, (o, n) in sorted(s.members.items()))
        return f"{self.shards[s.shard]}\0{s.key}\0{members}".encode("utf-8", "surrogatepass")

    def record_id(self, index: int) -> str:
        s = self.samples[index]
        key = f"{self.shards[s.shard].stem}/{s.key}" if self.prefixed else s.key
        src = self.map.get("id", "__key__")
        if src == "__key__":
            return key
        try:
            value = _json_path(self._json(s), src)
        except RecordError:
            return key  # `read` rejects it
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else key

    # -- the mapping report ---------------------------------------------------------------------
    def mapping(self) -> list[MappingRow]:
        """Each extension found (with its count), mapped json fields and `__key__`/`__url__`."""
        key_is_id = self.map.get("id", "__key__") == "__key__"
        rows = [MappingRow("__key__", "id" if key_is_id else "meta",
                           note="" if key_is_id else "meta.__key__; the id is " + self.map["id"]),
                MappingRow("__url__", "meta", note="meta.__url__: the tar's path, never text")]
        used: dict[str, str] = {}
        for target in ("image", "audio", "text", "label"):
            for ext in self._sources(target):
                used.setdefault(ext, target)
        text_role = self.options.text_role or ""
        text_note = "" if text_role else "role caption (next to an image), transcript or document"
        for target, src in self.map.items():
            if src.startswith("json."):
                rows.append(MappingRow(src, target, text_role if target == "text" else "",
                                       text_note if target == "text" else ""))
        for ext, count in sorted(self.extensions.items()):
            target = used.get(ext, "meta" if ext == "json" else "ignored")
            note = ("fields not mapped (map=TARGET:json.FIELD)" if target == "meta"
                    else text_note if target == "text" else "")
            rows.append(MappingRow(f".{ext} ({count} samples)", target,
                                   text_role if target == "text" else "", note))
        rows += [MappingRow(f"{what} ({n})", "ignored") for what, n in sorted(self.skipped_members.items())]
        return rows

    def skipped(self) -> dict[str, int]:
        """Tar members that are not samples (directories, names without `key.extension`)."""
        return dict(self.skipped_members)

    def _sources(self, target: str) -> tuple[str, ...]:
        src = self.map.get(target)
        if src is None:
            return DEFAULTS.get(target, ())
        return () if src.startswith("json.") else (src.lower(),)

    # -- reading one sample ---------------------------------------------------------------------
    def _bytes(self, s: _Sample, ext: str) -> bytes:
        offset, size = s.members[ext]
        fh = self._handles.get(s.shard)
        if fh is None:
            fh = self._handles[s.shard] = open(self.shards[s.shard], "rb")
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise RecordError(f"member {s.key}.{ext} is truncated ({len(data)} of {size} bytes)")
        return data

    def _json(self, s: _Sample) -> dict[str, Any]:
        if "json" not in s.members:
            raise RecordError(f"sample has no .json member (extensions: {', '.join(s.members)})")
        try:
            obj = json.loads(media.decode_text(self._bytes(s, "json"), ".json member"))
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            raise RecordError(f"invalid JSON in {s.key}.json: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise RecordError(f"{s.key}.json must hold a JSON object, got {type(obj).__name__}")
        return obj

    def read(self, index: int) -> Record:
        try:
            return self._read(self.samples[index], index)
        except RecordError as err:
            raise err.at(self.location(index))

    def _value(self, s: _Sample, target: str) -> Any:
        """The raw value for `target` (bytes of a member, or a json field), or None when absent."""
        src = self.map.get(target)
        if src is not None and src.startswith("json."):
            return _json_path(self._json(s), src)
        exts = [e for e in self._sources(target) if e in s.members]
        if src is not None and not exts:
            raise RecordError(f"sample has no .{src} member (extensions: {', '.join(s.members)})")
        return self._bytes(s, exts[0]) if exts else None

    def _read(self, s: _Sample, index: int) -> Record:
        if s.repeated:
            raise RecordError(f"key {s.key!r} has more than one .{s.repeated[0]} member")
        fields: list[Field] = []
        image, audio, text = (self._value(s, t) for t in ("image", "audio", "text"))
        if image is not None:
            fields.append(Field("image", "image", media.load_image(image, self.options.max_pixels)))
        if audio is not None:
            fields.append(Field("audio", "speech" if text is not None else "audio",
                                media.load_audio(audio)))
        if text is not None:
            text = media.decode_text(text, "text") if isinstance(text, bytes) else text
            if not isinstance(text, str):
                raise RecordError(f"text must be a string, got {type(text).__name__}")
            if not text.strip():
                raise RecordError("empty text")
            role = self.options.text_role or (
                "caption" if image is not None else "transcript" if audio is not None else "document")
            fields.append(Field("text", role, text))
        if not fields:
            raise RecordError(f"no image, audio or text in sample (extensions: "
                              f"{', '.join(s.members)}); map one with --opt map=")
        return Record(id=self.record_id(index), task="+".join(f.modality for f in fields),
                      fields=fields, label=self._label(s), meta=self._meta(s))

    def _label(self, s: _Sample) -> int | None:
        value = self._value(s, "label")
        if isinstance(value, bytes):
            raw = media.decode_text(value, "label").strip()
            if not raw.isdigit():
                raise RecordError(f"label must be a non-negative integer, got {raw[:40]!r}")
            return int(raw)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise RecordError(f"label must be a non-negative integer class index, got {value!r:.40}")
        return value

    def _meta(self, s: _Sample) -> dict[str, Any]:
        meta: dict[str, Any] = {"__url__": str(self.shards[s.shard])}
        if self.map.get("id", "__key__") != "__key__":
            meta["__key__"] = s.key
        if "json" in s.members:
            mapped = {src.split(".")[1] for src in self.map.values() if src.startswith("json.")}
            meta.update({k: v for k, v in self._json(s).items() if k not in mapped})
        return meta


def _json_path(obj: dict[str, Any], src: str) -> Any:
    """The value at `json.a.b` in `obj`; a missing step is a RecordError listing the keys there."""
    value: Any = obj
    for i, part in enumerate(src.split(".")[1:]):
        if not isinstance(value, dict) or part not in value:
            where = ".".join(["json", *src.split(".")[1:i + 1]])
            keys = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise RecordError(f"{src}: {where} has no field {part!r} (fields: {keys or 'none'})")
        value = value[part]
    return value
