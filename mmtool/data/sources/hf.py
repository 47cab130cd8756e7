"""`hf`: any dataset that `datasets.load_dataset` can open — local builders (imagefolder,
audiofolder, json, csv, parquet, arrow) offline, or a Hugging Face Hub name (cached or online).

    --source hf --opt path=imagefolder --opt data_dir=sample_data/images
    --source hf --opt path=json --opt data_files=caps.jsonl --opt map=img:image,caption:text

Columns become fields by their `Features` type: `Image` → image, `Audio` → audio, raw bytes
(`Value("binary")`) → image or audio when they start with a PNG/JPEG/GIF/WebP/BMP or WAV/FLAC/OGG
signature, `Value("string")` → text, the first `ClassLabel` → the record's label (its class name
goes to meta["label_name"]). Strings that are not prose never become text: a column named like an
id (`id`, `key`, `__key__`, `uid`, ...) gives the record ids, and one named like a path or URL
(`__url__`, `url`, `path`, `file_name`, ...) or whose first values all look like file paths or URLs
goes to meta. Every other column is ignored; `mapping()` (printed by `mmtool preprocess` first)
lists each column and what it became. `--opt map=col:modality[:role],...` replaces that detection:
only the named columns are read, in the order given; modalities are image, audio, text,
observation, action, reward, label, `id` (the column holding record ids) and `meta`.

Local data never goes to the Hub: a `path=` that is a local file (`data.parquet`, `caps.csv`,
`notes.txt`, ...) is read with the builder its suffix names, and one that looks like a file but does
not exist is an error. `path=text` reads one record per line (`--opt sample_by=paragraph` or
`document` for one per blank-line-separated paragraph or per file); blank lines are skipped and
counted (`skipped` in the manifest), not rejected.

Media is decoded here, not by `datasets`: Image/Audio columns are cast to `decode=False` and their
bytes or paths go through `mmtool.data.media` (no torchcodec/ffmpeg: WAV, FLAC, OGG via soundfile).

Splits: mmtool's `--split` is the Hugging Face split; `--split all` (the default) reads every split
the dataset has, in order, each row keeping its split (split names other than train, validation and
test count as train). `--opt split=` picks one, slices included (`train[:100]`). Records are not
re-split by hash.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtool.data import media
from mmtool.data.schema import SPLITS, Field, Record
from mmtool.data.sources.base import SOURCES, MappingRow, Source
from mmtool.data.sources.jsonl import action_field, float_matrix
from mmtool.errors import MMToolError, RecordError

TARGETS = ("image", "audio", "text", "observation", "action", "reward", "label", "id", "meta")
ID_NAMES = ("id", "key", "__key__", "uid", "uuid", "guid", "idx", "index", "sample_id", "record_id")
"""String (or integer) columns with these names hold record ids, never text."""
PATH_NAMES = ("__url__", "url", "path", "file", "filename", "file_name", "filepath", "file_path",
              "image_path", "audio_path", "image_url", "img_path", "uri", "src")
"""String columns with these names hold locations: meta, never text."""
_PATH_LIKE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://\S+|\S*[/\\]\S*|[^\s.]\S*\.[A-Za-z0-9]{1,5})$")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                  ".arrow": "arrow", ".txt": "text", ".tar": "webdataset"}
"""The `datasets` builder for a local file given as `path=`, by suffix."""
MAGIC = ((b"\x89PNG", "image"), (b"\xff\xd8\xff", "image"), (b"GIF8", "image"), (b"BM", "image"),
         (b"fLaC", "audio"), (b"OggS", "audio"))
"""File signatures that make a raw-bytes column an image or audio column (RIFF: WAVE or WEBP)."""
_ORDER = {m: i for i, m in enumerate(TARGETS)}


@dataclass
class HFOptions:
    path: str = field(default="", metadata={
        "help": "(required) what load_dataset opens: imagefolder, audiofolder, json, csv, parquet, "
                "arrow, a Hub name, or a folder written by save_to_disk"})
    data_dir: str = field(default="", metadata={"help": "load_dataset data_dir (folder builders)"})
    data_files: str = field(default="", metadata={
        "help": "load_dataset data_files: a file or glob; several separated by commas"})
    name: str = field(default="", metadata={"help": "dataset configuration name"})
    split: str = field(default="", metadata={
        "help": "Hugging Face split to read, slices allowed (train[:100]); default: mmtool's "
                "--split (all: every split the dataset has)"})
    map: str = field(default="", metadata={
        "help": "col:modality[:role],... replaces type-based column detection, e.g. "
                "img:image,caption:text,label:label (modality: image, audio, text, observation, "
                "action, reward, label, id)"})
    text_role: str = field(default="", metadata={
        "help": "role of text fields; default: caption with an image, transcript with audio, "
                "document otherwise (the column name when there are several text columns)"})
    task: str = field(default="", metadata={
        "help": "task of every record; default: the modalities joined by +, e.g. image+text"})
    num_actions: int = field(default=0, metadata={"help": "number of discrete actions (action columns)"})
    max_pixels: int = field(default=media.DEFAULT_MAX_PIXELS, metadata={
        "help": "reject images with more pixels than this (checked before decoding)"})
    cache_dir: str = field(default="", metadata={
        "help": "datasets cache folder; default: HF_DATASETS_CACHE (~/.cache/huggingface/datasets)"})
    sample_by: str = field(default="", metadata={
        "help": "path=text only: line (default; blank lines skipped and counted), paragraph "
                "(blank-line separated) or document (one record per file)"})


@SOURCES.register("hf")
class HFSource(Source):
    """A Hugging Face `datasets` dataset (imagefolder, audiofolder, json, parquet, Hub, ...)."""

    Options = HFOptions

    def __init__(self, options: HFOptions, split: str = "all"):
        super().__init__(options, split)
        if not options.path:
            raise MMToolError("source 'hf' needs --opt path=... (imagefolder, audiofolder, json, "
                              "parquet, arrow, or a dataset name)")
        self.hf_split = options.split or (split if split != "all" else "")
        self.builder, self.data_files = _local_path(options)
        self._skipped: dict[str, int] = {}
        self.split_rows: list[tuple[str, int]] = []  # (HF split, its first row), in order
        self.ds = self._load()
        self.columns, self.ignored = self._columns()
        self.label_names: list[str] | None = None
        for col, target, _ in self.columns:
            if target == "label" and hasattr(self.ds.features[col], "names"):
                self.label_names = list(self.ds.features[col].names)
        id_col = next((c for c, t, _ in self.columns if t == "id"), None)
        self._ids = self.ds.select_columns([id_col]) if id_col else None  # no media in the way
        self._id_col = id_col
        # Media given as plain path strings (json/csv columns) are relative to the data's folder.
        first_file = self.data_files.split(",")[0].strip()
        self.base_dir = options.data_dir or (os.path.dirname(first_file) if first_file else None)

    # -- loading ----------------------------------------------------------------------------------
    def _load(self):
        import datasets

        o = self.options
        kwargs: dict[str, Any] = {"split": self.hf_split} if self.hf_split else {}
        if o.name:
            kwargs["name"] = o.name
        if o.data_dir:
            kwargs["data_dir"] = o.data_dir
        if self.data_files:
            files = [f.strip() for f in self.data_files.split(",") if f.strip()]
            kwargs["data_files"] = files[0] if len(files) == 1 else files
        if o.cache_dir:
            kwargs["cache_dir"] = o.cache_dir
        if o.sample_by:
            if self.builder != "text" or o.sample_by not in ("line", "paragraph", "document"):
                raise MMToolError(f"--opt sample_by={o.sample_by}: expected line, paragraph or "
                                  "document, with path=text (or a .txt file)")
            kwargs["sample_by"] = o.sample_by
        where = f"--opt path={o.path}" + (f" data_dir={o.data_dir}" if o.data_dir else "") + \
            (f" data_files={o.data_files}" if o.data_files else "")
        try:
            with _audio_paths_without_torchcodec():
                if _saved_to_disk(o.path):
                    ds = datasets.load_from_disk(o.path)  # a folder written by save_to_disk
                    if isinstance(ds, datasets.DatasetDict) and self.hf_split:
                        ds = _pick_split(ds, self.hf_split, where)
                else:
                    ds = datasets.load_dataset(self.builder, **kwargs)
        except MMToolError:
            raise
        except (ValueError, KeyError) as exc:
            if "split" in str(exc).lower():
                raise MMToolError(f"{where}: no split {self.hf_split!r} ({exc}); pick one with "
                                  "--split or --opt split=NAME") from None
            raise MMToolError(f"{where}: load_dataset failed: {exc}") from None
        except Exception as exc:  # FileNotFoundError, DatasetNotFoundError, network errors, ...
            raise MMToolError(f"{where}: load_dataset failed: {type(exc).__name__}: {exc}") from None
        ds = self._join_splits(ds, where)
        # Decode media ourselves: datasets would need torchcodec/ffmpeg for audio.
        for col, feat in ds.features.items():
            if isinstance(feat, (datasets.Image, datasets.Audio)) and feat.decode:
                ds = ds.cast_column(col, type(feat)(decode=False))
        if self.builder == "text" and "text" in ds.column_names:
            keep = [i for i, t in enumerate(ds["text"]) if t is not None and t.strip()]
            if len(keep) < len(ds):  # blank lines are not records: skipped and counted
                self._skipped["blank lines" if o.sample_by in ("", "line") else "blank texts"] = \
                    len(ds) - len(keep)
                self._shift_split_rows(keep)
                ds = ds.select(keep)
        return ds

    def _join_splits(self, ds, where: str):
        """Every split of a `DatasetDict` (`--split all`), one after the other; remembers where
        each starts (`split_rows`)."""
        import datasets

        if not isinstance(ds, datasets.DatasetDict):
            self.split_rows = [(self.hf_split.split("[")[0] or "train", 0)]
            return ds
        if not ds:
            raise MMToolError(f"{where}: the dataset has no splits")
        start = 0
        for name, part in ds.items():
            self.split_rows.append((name, start))
            start += len(part)
        try:
            return datasets.concatenate_datasets(list(ds.values()))
        except ValueError as exc:
            raise MMToolError(f"{where}: its splits ({', '.join(ds)}) have different columns ({exc}); "
                              "read one with --split or --opt split=NAME") from None

    def _shift_split_rows(self, keep: list[int]) -> None:
        """`split_rows` after keeping only rows `keep` (sorted)."""
        import bisect

        self.split_rows = [(name, bisect.bisect_left(keep, first)) for name, first in self.split_rows]

    def _split_at(self, index: int) -> tuple[str, int]:
        """(the HF split of row `index`, its row number within that split)."""
        import bisect

        k = bisect.bisect_right([first for _, first in self.split_rows], index) - 1
        name, first = self.split_rows[max(k, 0)]
        return name, index - first

    def _columns(self) -> tuple[list[tuple[str, str, str | None]], list[str]]:
        """((column, target, role) for the columns that are read, in field order; ignored columns)."""
        feats = self.ds.features
        described = ", ".join(f"{c} ({_type_name(f)})" for c, f in feats.items())
        if self.options.map:
            cols = []
            for item in self.options.map.split(","):
                parts = [p.strip() for p in item.split(":")]
                if len(parts) not in (2, 3) or not all(parts):
                    raise MMToolError(f"--opt map: {item!r} is not col:modality[:role]; the dataset "
                                      f"has {described}")
                col, target = parts[0], parts[1]
                if col not in feats:
                    raise MMToolError(f"--opt map: no column {col!r}; the dataset has {described}")
                if target not in TARGETS:
                    raise MMToolError(f"--opt map: {item!r}: modality {target!r} is not one of "
                                      f"{', '.join(TARGETS)}")
                cols.append((col, target, parts[2] if len(parts) == 3 else None))
            if [t for _, t, _ in cols].count("label") > 1 or [t for _, t, _ in cols].count("id") > 1:
                raise MMToolError("--opt map: at most one label and one id column")
            named = {c for c, _, _ in cols}
            return cols, [c for c in feats if c not in named]
        cols, ignored = [], []
        for col, feat in feats.items():
            target = self._detect(col, feat, [t for _, t, _ in cols])
            if target is None:
                ignored.append(col)
            else:
                cols.append((col, target, None))
        if not any(t not in ("label", "id", "meta") for _, t, _ in cols):
            raise MMToolError(f"--opt path={self.options.path}: no image, audio or text column "
                              f"found among {described}; name them with --opt map=col:modality,...")
        return sorted(cols, key=lambda c: _ORDER[c[1]]), ignored  # stable within a modality

    def _detect(self, col: str, feat: Any, taken: list[str]) -> str | None:
        """What column `col` becomes without `map=` (None: ignored)."""
        import datasets

        if isinstance(feat, datasets.Image):
            return "image"
        if isinstance(feat, datasets.Audio):
            return "audio"
        if isinstance(feat, datasets.ClassLabel):
            return "label" if "label" not in taken else None
        if not isinstance(feat, datasets.Value):
            return None
        if col.lower() in ID_NAMES and "id" not in taken and feat.dtype != "binary":
            return "id"
        if feat.dtype in ("binary", "large_binary"):
            head = next((v for v in self.ds.select_columns([col])[:8][col] if v), b"")
            magic = next((m for sig, m in MAGIC if head.startswith(sig)), None)
            if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"WEBP"):
                magic = "audio" if head[8:12] == b"WAVE" else "image"
            return magic
        if feat.dtype not in ("string", "large_string"):
            return None
        if col.lower() in ID_NAMES or col.lower() in PATH_NAMES:
            return "meta"
        values = [v for v in self.ds.select_columns([col])[:32][col] if isinstance(v, str) and v]
        if values and all(_PATH_LIKE.match(v.strip()) for v in values):
            return "meta"  # file paths or URLs: never text unless mapped
        return "text"

    def mapping(self) -> list[MappingRow]:
        """Each column: the modality/role it becomes, `id`, `label`, `meta`, or ignored."""
        texts = [t for _, t, _ in self.columns].count("text")
        targets = {t for _, t, _ in self.columns}
        rows = []
        for col, target, role in self.columns:
            note = "map=" if self.options.map else _why(col, target)
            if target == "text":
                role = role or self.options.text_role or (col if texts > 1 else "caption"
                                                          if "image" in targets else "transcript"
                                                          if "audio" in targets else "document")
            elif target in ("image", "audio") and not role:
                role = target if target == "image" else ("speech" if "text" in targets else "audio")
            rows.append(MappingRow(col, target, role or "", note))
        if not any(t == "id" for t in targets):
            rows.append(MappingRow("(row number)", "id", "", "SPLIT-ROW; no id column"))
        kinds = {c: _type_name(f) for c, f in self.ds.features.items()}
        rows += [MappingRow(c, "ignored", "", kinds[c] + ("; not in map=" if self.options.map
                                                         else "")) for c in self.ignored]
        return rows

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    # -- the Source interface ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ds)

    def indices(self) -> list[int]:
        return list(range(len(self)))  # the split was chosen when loading

    def split_of(self, index: int) -> str:
        if self.split != "all":
            return self.split
        base = self._split_at(index)[0]
        return base if base in SPLITS else "train"

    def record_id(self, index: int) -> str:
        if self._ids is not None:
            value = self._ids[index][self._id_col]
            if value is not None and str(value) != "":
                return str(value)
        name, row = self._split_at(index)
        return f"{name}-{row}"

    # -- content keys: the dataset's own fingerprint, the row index, and the local files -----------
    def content_version(self) -> str:
        return f"hf:{getattr(self.ds, '_fingerprint', None)}:{self.hf_split or 'all'}"

    def record_key(self, index: int) -> bytes:
        return str(index).encode()

    def input_files(self) -> list[Path]:
        """The local files behind the dataset: `data_dir`'s, `data_files`' and a local `path`'s."""
        o = self.options
        roots = [Path(o.data_dir)] if o.data_dir else []
        roots += [Path(o.path)] if Path(o.path).exists() else []
        files = [f for r in roots for f in ([r] if r.is_file() else sorted(r.rglob("*"))) if f.is_file()]
        for pattern in filter(None, (f.strip() for f in self.data_files.split(","))):
            files += sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        return files

    def location(self, index: int) -> str:
        src = self.options.path + (f":{self.options.data_dir}" if self.options.data_dir else "")
        name, row = self._split_at(index)
        return f"{src}[{self.hf_split or name}] row {row}"

    def read(self, index: int) -> Record:
        row = self.ds[index]
        try:
            return self._record(index, row)
        except RecordError as err:
            raise err.at(self.location(index))

    def _record(self, index: int, row: dict[str, Any]) -> Record:
        targets = [t for _, t, _ in self.columns]
        texts = targets.count("text")
        fields, label, meta = [], None, {}
        for col, target, role in self.columns:
            value = row[col]
            if target == "meta":
                meta[col] = value
                continue
            if target in ("id", "label"):
                if target == "label" and value is not None:
                    label, name = self._label(col, value)
                    if name is not None:
                        meta["label_name"] = name
                continue
            if value is None:
                raise RecordError(f"column {col!r} ({target}) is empty")
            if target in ("image", "audio"):
                src = media.media_input(value, self.base_dir)
                try:
                    data = media.load_image(src, self.options.max_pixels) if target == "image" \
                        else media.load_audio(src)
                except RecordError as err:
                    path = value.get("path") if isinstance(value, dict) else None
                    raise RecordError(f"column {col!r}: {err.reason}"
                                      + (f" ({path})" if path and path not in err.reason else "")) \
                        from None
                if isinstance(value, dict) and value.get("path"):
                    meta.setdefault("file", value["path"])
                default_role = target if target == "image" else ("speech" if "text" in targets else "audio")
                fields.append(Field(target, role or default_role, data))
            elif target == "text":
                if not isinstance(value, str):
                    raise RecordError(f"column {col!r}: text must be a string, got {type(value).__name__}")
                if not value.strip():
                    raise RecordError(f"column {col!r}: empty text")
                auto = col if texts > 1 else (
                    "caption" if "image" in targets else "transcript" if "audio" in targets else "document")
                fields.append(Field("text", role or self.options.text_role or auto, value))
            elif target == "observation":
                fields.append(Field("observation", role or "observation", float_matrix(value, col)))
            elif target == "action":
                f = action_field(value, None, self.options.num_actions)
                f.role = role or "action"
                fields.append(f)
            elif target == "reward":
                fields.append(Field("reward", role or "reward", float_matrix(value, col, vector=True)))
        if not fields:
            raise RecordError("no field to read (every mapped column is an id or label)")
        task = self.options.task or "+".join(dict.fromkeys(f.modality for f in fields))
        return Record(id=self.record_id(index), task=task, fields=fields, label=label, meta=meta)

    def _label(self, col: str, value: Any) -> tuple[int | None, str | None]:
        names = getattr(self.ds.features[col], "names", None)
        if isinstance(value, str) and names is None:
            raise RecordError(f"column {col!r}: label {value!r} is a string; labels must be class "
                              "indices (or a ClassLabel column)")
        try:
            idx = int(value)
        except (TypeError, ValueError):
            raise RecordError(f"column {col!r}: label {value!r} is not an integer") from None
        if idx < 0:  # Hugging Face marks unlabeled rows (e.g. hidden test labels) with -1
            return None, None
        return idx, (names[idx] if names and idx < len(names) else None)


def _why(col: str, target: str) -> str:
    """A few words on why an automatically detected column became `target`."""
    if target == "id":
        return "named like an id"
    if target == "meta":
        return "named like a path/URL/id" if col.lower() in PATH_NAMES + ID_NAMES else \
            "values look like paths/URLs; map=COL:text to read them as text"
    return {"image": "Image feature or image bytes", "audio": "Audio feature or audio bytes",
            "text": "string column", "label": "ClassLabel"}.get(target, "")


def _local_path(o: HFOptions) -> tuple[str, str]:
    """(the builder to load, the data_files): a local file's path becomes data_files of the builder
    its suffix names, so that it is read offline and never looked up on the Hub.

    Raises:
        MMToolError: `path` looks like a data file (a known suffix, or starts with ./ or /) but is not
            there.
    """
    p = Path(o.path)
    builder = LOCAL_BUILDERS.get(p.suffix.lower())
    matches = sorted(glob.glob(o.path)) if any(c in o.path for c in "*?[") else []
    if p.is_file() or matches:
        if builder is None:
            raise MMToolError(f"--opt path={o.path}: a local file of a kind the hf source cannot "
                              f"read; suffixes: {', '.join(LOCAL_BUILDERS)}")
        if o.data_files:
            raise MMToolError(f"--opt path={o.path} is a file: give it alone, or path=BUILDER with "
                              "data_files=")
        return builder, o.path
    looks_local = builder is not None or o.path.startswith(("./", "../", "/", "~"))
    if looks_local and not p.exists():
        raise MMToolError(f"--opt path={o.path}: no such file or folder (a local path is never "
                          "looked up on the Hugging Face Hub)")
    return o.path, o.data_files


def _type_name(feat: Any) -> str:
    dtype = getattr(feat, "dtype", None)
    return f"{type(feat).__name__}({dtype})" if type(feat).__name__ == "Value" else type(feat).__name__


def _saved_to_disk(path: str) -> bool:
    """True for a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _pick_split(dd, split: str, where: str):
    if split not in dd:
        raise MMToolError(f"{where}: no split {split!r} (splits: {', '.join(dd)}); pick one with "
                          "--split or --opt split=NAME")
    return dd[split]


@contextlib.contextmanager
def _audio_paths_without_torchcodec():
    """Lets `audiofolder` (and other builders that write Audio columns) prepare without torchcodec.

    `datasets.Audio.encode_example` imports torchcodec even when it only stores a file path or the
    file's bytes. When torchcodec is missing, this replaces it, for the duration of the load only,
    with the path/bytes branches of the original (no audio is decoded or re-encoded); any other
    value still goes to the original, which raises its own ImportError.
    """
    try:
        import torchcodec  # noqa: F401

        yield
        return
    except ImportError:
        pass
    from datasets.features.audio import Audio

    original = Audio.encode_example

    def encode_example(self, value):
        if isinstance(value, (str, os.PathLike)):
            return {"bytes": None, "path": os.fspath(value) if isinstance(value, str)
                    else str(Path(value).absolute())}
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": bytes(value), "path": None}
        if isinstance(value, dict) and "array" not in value and (value.get("bytes") or value.get("path")) \
                and not str(value.get("path") or "").endswith("pcm"):
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return original(self, value)

    Audio.encode_example = encode_example
    try:
        yield
    finally:
        Audio.encode_example = original

