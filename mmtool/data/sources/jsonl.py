"""`jsonl`: a JSON-lines manifest mixing text, images, audio and RL trajectories (LLaVA/Gato style).

One JSON object per line; every key is optional, but a record needs at least one modality:

    {"id": "cap-3", "image": "media/digit3.png", "text": "a handwritten three", "label": 3}
    {"audio": "media/seven.wav", "text": "seven"}
    {"task": "control/cartpole", "observations": [[0.1, 0.2], ...], "actions": [0, 1, ...],
     "rewards": [1.0, ...], "num_actions": 2}
    {"trajectory": "episodes/ep0.npz"}          # arrays observations, actions, rewards

* `text`: a non-empty string. Its role is "caption" next to an image, "transcript" next to audio,
  "document" alone (`--opt text_role=...` overrides).
* `image`, `audio`, `trajectory`: file paths, relative to the manifest's folder (or absolute),
  confined to the data root (the manifest's folder, or `--opt media_root=DIR`): a path that
  resolves outside it — absolute, `..` climbing out, or a symlink leading out — rejects its record
  unless `--opt allow_outside=true`.
  Audio: WAV (int or float), FLAC, OGG (role "speech" next to text, else "audio"); trajectories are
  `.npz` files, never unpickled, with arrays `observations`, `actions`, `rewards`
  (`--opt npz_keys=observations:obs,actions:act` names others; a file with none lists its keys).
* `observations`: T rows of k floats → float32 `[T, k]`.
* `actions`: T ints (or T lists of ints) → discrete int64 `[T, 1]` (`[T, k]`), with
  `num_classes` from the record's `num_actions` or `--opt num_actions` (at most 2^20); T floats or float lists →
  continuous float32 `[T, k]` tokenized with "mulaw".
* `rewards`: T floats → float32 `[T]`. Observations, actions and rewards must agree on T.
* `id` (default: the line number), `task` (default: the modalities joined by "+", e.g.
  "image+text"), `label` (an integer class), `meta` (an object copied into the record's meta).
  Other keys are copied into meta as well.

Records are read by index: `__init__` stores the byte offset of every non-blank line and `read`
decodes just that line, so parallel and resumed runs are exact. Every problem with a line (invalid
JSON or UTF-8, no modality, missing or undecodable files, ragged or NaN arrays, mismatched lengths)
is a `RecordError` located at `manifest:line`; so is JSON nested too deeply to parse or an
integer beyond int64 (`tokenizing.to_sample` turns any other failure within a record into one too).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmtool.data import media
from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import MAPPING_TARGETS, SOURCES, MappingRow, Source
from mmtool.data.sources.keymap import parse_key_map
from mmtool.errors import RECORD_FAILURES, MMToolError, RecordError

MODALITY_KEYS = ("image", "audio", "text", "observations", "actions", "rewards", "trajectory")
OTHER_KEYS = ("id", "task", "label", "num_actions", "meta")
MEDIA_KEYS = ("image", "audio", "trajectory")
NPZ_ROLES = ("observations", "actions", "rewards")
MAX_NUM_ACTIONS = 2**20
"""The most discrete actions a record (or `--opt num_actions`) may declare: the action vocabulary
becomes an embedding table, and 1e12 classes would make training allocate terabytes."""


@dataclass
class JsonlOptions:
    path: Path | None = field(default=None, metadata={
        "help": "(required) the JSON-lines manifest; media paths in it are relative to its folder"})
    num_actions: int = field(default=0, metadata={
        "help": "number of discrete actions, for integer `actions` (a record's own num_actions "
                "wins); 0 = unknown, left to the action tokenizer"})
    max_pixels: int = field(default=media.DEFAULT_MAX_PIXELS, metadata={
        "help": "reject images with more pixels than this (checked before decoding)"})
    media_root: Path | None = field(default=None, metadata={
        "help": "the data root: media paths (relative to the manifest's folder, or absolute) must "
                "resolve inside it, symlinks followed; default: the manifest's folder"})
    allow_outside: bool = field(default=False, metadata={
        "help": "follow media paths that lead outside the data root (absolute, '..', symlinks)"})
    max_line_bytes: int = field(default=64 * 2**20, metadata={
        "help": "reject lines longer than this many bytes (64 MiB) before reading them whole"})
    text_role: str = field(default="", metadata={
        "help": "role of the text field; default: caption with an image, transcript with audio, "
                "document otherwise"})
    npz_keys: str = field(default="", metadata={
        "help": "names of the trajectory .npz arrays, e.g. observations:obs,actions:act,rewards:rew "
                "(default: observations, actions, rewards)"})


@SOURCES.register("jsonl")
class JsonlSource(Source):
    """A JSON-lines manifest of text, image, audio and trajectory records (`--opt path=FILE`)."""

    Options = JsonlOptions

    def __init__(self, options: JsonlOptions, split: str = "all"):
        super().__init__(options, split)
        if options.path is None or str(options.path) == "":
            raise MMToolError("source 'jsonl' needs --opt path=MANIFEST.jsonl")
        self.path = Path(options.path)
        if not self.path.is_file():
            raise MMToolError(f"--opt path={self.path}: no such file")
        self.base_dir = self.path.parent
        self.media_root = Path(options.media_root) if options.media_root else self.base_dir
        if not self.media_root.is_dir():
            raise MMToolError(f"--opt media_root={options.media_root}: no such folder")
        if not 0 <= options.num_actions <= MAX_NUM_ACTIONS:
            raise MMToolError(f"--opt num_actions={options.num_actions}: expected 0 (unknown) to "
                              f"{MAX_NUM_ACTIONS} (2^20)")
        if options.max_line_bytes < 1:
            raise MMToolError(f"--opt max_line_bytes={options.max_line_bytes}: must be positive")
        self.npz_keys = {"observations": "observations", "actions": "actions", "rewards": "rewards",
                         **parse_key_map(options.npz_keys, "npz_keys", NPZ_ROLES)}
        offsets, lines = _scan_lines(self.path)
        self._offsets = np.asarray(offsets, np.int64)
        self._lines = np.asarray(lines, np.int64)
        if offsets and self._first_line_opens_array():
            raise MMToolError(f"--opt path={self.path}: a JSON array, not JSON lines; for LLaVA / "
                              "ShareGPT conversations use `mmtool preprocess conversations --opt "
                              "path=...`, else write one JSON object per line")

    def _first_line_opens_array(self) -> bool:
        """True when the file is a JSON array: a first line "[" alone, or one line that is "[...]"."""
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[0]))
            head = f.readline(1 << 16).strip().lstrip(b"\xef\xbb\xbf")
        return head == b"[" or (len(self._offsets) == 1 and head.startswith(b"["))

    def __len__(self) -> int:
        return len(self._offsets)

    def location(self, index: int) -> str:
        return f"{self.path}:{int(self._lines[index])}"

    # -- content keys: the raw line (and its number) plus the files it names -----------------------
    def record_key(self, index: int) -> bytes:
        try:
            return b"%d\0" % int(self._lines[index]) + self._raw(index)
        except RecordError:  # a line over max_line_bytes (rejected by `read`): its digest, streamed
            return b"%d\0long\0" % int(self._lines[index]) + self._long_line_digest(index)

    def record_files(self, index: int) -> list[Path]:
        try:
            return self._media_paths(self._raw(index))
        except RecordError:
            return []  # `read` rejects the line

    def _long_line_digest(self, index: int) -> bytes:
        """sha256 of line `index` read in 1 MiB blocks (never whole in memory)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            while block := f.readline(1 << 20):
                h.update(block)
                if block.endswith(b"\n"):
                    break
        return h.digest()

    def input_files(self) -> list[Path]:
        files = [self.path]
        with open(self.path, "rb") as f:  # one pass; only lines that mention a media key are parsed
            for raw in f:
                if b'"image"' in raw or b'"audio"' in raw or b'"trajectory"' in raw:
                    files += self._media_paths(raw)
        return files

    def _media_paths(self, raw: bytes) -> list[Path]:
        """The media files a raw line names, confined like `read` confines them: a line that is
        malformed or names a path outside the data root lists none (`read` rejects it), so the
        content key never reads a byte outside the data either."""
        if len(raw) > self.options.max_line_bytes:
            return []
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                return []
            paths = [self._media(v, k) for k in MEDIA_KEYS if isinstance(v := obj.get(k), str) and v]
        except (RecordError, *RECORD_FAILURES):
            return []  # `read` rejects the line
        return [Path(p) for p in paths if isinstance(p, (str, Path))]

    def _raw(self, index: int) -> bytes:
        limit = self.options.max_line_bytes
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            raw = f.readline(limit + 1)
        if len(raw.rstrip(b"\r\n")) > limit:
            raise RecordError(f"line is longer than max_line_bytes={limit} (--opt max_line_bytes)")
        return raw

    def _parse(self, index: int) -> dict[str, Any]:
        line = media.decode_text(self._raw(index), "line").rstrip("\r\n")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(f"invalid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}") \
                from None
        except RecursionError:
            raise RecordError("invalid JSON: nested too deeply for Python's parser") from None
        except (ValueError, MemoryError) as exc:  # e.g. an integer literal of over 4300 digits
            raise RecordError(f"invalid JSON: {' '.join(str(exc).split())[:200]}") from None
        if not isinstance(obj, dict):
            raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    def record_id(self, index: int) -> str:
        try:
            obj = self._parse(index)
        except RecordError:  # a bad line still needs an id; `read` will reject it
            obj = {}
        rid = obj.get("id")
        return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) \
            else str(int(self._lines[index]))

    def mapping(self) -> list[MappingRow]:
        """The keys of the first 100 lines and what each becomes (keys are fixed, see the module
        docstring; any key not listed there is copied into meta, not trained on)."""
        seen: dict[str, int] = {}
        for index in range(min(len(self), 100)):
            try:
                for key in self._parse(index):
                    seen[key] = seen.get(key, 0) + 1
            except RecordError:
                continue
        targets = {"image": "image", "audio": "audio", "text": "text", "observations": "observation",
                   "actions": "action", "rewards": "reward", "trajectory": "observation",
                   "id": "id", "label": "label", "task": "task", "num_actions": "ignored"}
        roles = {"image": "image", "audio": "speech or audio", "observations": "observation",
                 "actions": "action", "rewards": "reward",
                 "trajectory": "observation, action, reward (npz arrays)",
                 "text": self.options.text_role or "caption, transcript or document"}
        n = min(len(self), 100)
        rows = [MappingRow(key, targets.get(key, "meta"), roles.get(key, ""),
                           f"in {count} of the first {n} lines" if count < n else "")
                for key, count in seen.items()]
        if "id" not in seen:
            rows.append(MappingRow("(line number)", "id", "", "no id key"))
        return sorted(rows, key=lambda r: MAPPING_TARGETS.index(r.target))

    def read(self, index: int) -> Record:
        try:
            return self._read(index)
        except RecordError as err:
            raise err.at(self.location(index))

    def _media(self, value: Any, key: str) -> media.PathOrBytes:
        """The confined path of a record's `image`/`audio`/`trajectory` value."""
        return media.confined_path(_path_value(value, key), self.base_dir, self.media_root,
                                   self.options.allow_outside)

    # -- decoding one line ------------------------------------------------------------------------
    def _read(self, index: int) -> Record:
        obj = self._parse(index)
        present = [k for k in MODALITY_KEYS if k in obj]
        if not present:
            keys = ", ".join(sorted(obj)) or "none"
            raise RecordError(f"no known modality in record (keys: {keys}); expected one of "
                              f"{', '.join(MODALITY_KEYS)}")
        fields: list[Field] = []
        if "image" in obj:
            src = self._media(obj["image"], "image")
            fields.append(Field("image", "image", media.load_image(src, self.options.max_pixels)))
        if "audio" in obj:
            src = self._media(obj["audio"], "audio")
            fields.append(Field("audio", "speech" if "text" in obj else "audio", media.load_audio(src)))
        if "text" in obj:
            text = obj["text"]
            if not isinstance(text, str):
                raise RecordError(f"text must be a string, got {type(text).__name__}")
            if not text.strip():
                raise RecordError("empty text")
            role = self.options.text_role or (
                "caption" if "image" in obj else "transcript" if "audio" in obj else "document")
            fields.append(Field("text", role, text))
        fields += self._trajectory_fields(obj)

        label = obj.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            raise RecordError(f"label must be a non-negative integer class index, got {label!r}")
        task = obj.get("task")
        if task is None:
            task = "+".join(dict.fromkeys(f.modality for f in fields))
        elif not isinstance(task, str) or not task:
            raise RecordError(f"task must be a non-empty string, got {task!r}")
        meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
        meta.update({k: v for k, v in obj.items() if k not in MODALITY_KEYS + OTHER_KEYS})
        return Record(id=self.record_id(index), task=task, fields=fields, label=label, meta=meta)

    def _trajectory_fields(self, obj: dict[str, Any]) -> list[Field]:
        arrays: dict[str, Any] = {k: obj[k] for k in ("observations", "actions", "rewards") if k in obj}
        if "trajectory" in obj:
            if arrays:
                raise RecordError("give either a trajectory file or inline "
                                  f"{'/'.join(arrays)}, not both")
            src = self._media(obj["trajectory"], "trajectory")
            names = {v: k for k, v in self.npz_keys.items()}  # npz key -> role
            arrays = {names[k]: v for k, v in media.load_npz(src, keys=tuple(names)).items()}
            if not arrays:
                found = ", ".join(media.npz_keys(src)) or "none"
                raise RecordError(f"trajectory npz has none of the arrays {', '.join(names)} "
                                  f"(keys found: {found}); map them with --opt npz_keys="
                                  "observations:KEY,actions:KEY,rewards:KEY")
        fields, lengths = [], {}
        if "observations" in arrays:
            obs = float_matrix(arrays["observations"], "observations")
            lengths["observations"] = len(obs)
            fields.append(Field("observation", "observation", obs))
        if "actions" in arrays:
            fields.append(action_field(arrays["actions"], obj.get("num_actions"),
                                       self.options.num_actions))
            lengths["actions"] = len(fields[-1].data)
        if "rewards" in arrays:
            rew = float_matrix(arrays["rewards"], "rewards", vector=True)
            lengths["rewards"] = len(rew)
            fields.append(Field("reward", "reward", rew))
        if len(set(lengths.values())) > 1:
            raise RecordError("trajectory lengths differ: " + ", ".join(
                f"{k} has {v} timesteps" for k, v in lengths.items()))
        return fields


def _scan_lines(path: Path, chunk: int = 2**20) -> tuple[list[int], list[int]]:
    """Byte offsets and 1-based numbers of the non-blank lines, reading at most `chunk` bytes at a
    time, so one enormous line costs no more memory than a short one."""
    offsets, lines = [], []
    with open(path, "rb") as f:
        pos, n = 0, 0
        while raw := f.readline(chunk):
            start, n, blank = pos, n + 1, not raw.strip()
            pos += len(raw)
            while not raw.endswith(b"\n") and (raw := f.readline(chunk)):
                pos += len(raw)
                blank = blank and not raw.strip()
            if not blank:
                offsets.append(start)
                lines.append(n)
    return offsets, lines


def action_field(value: Any, num_actions: Any = None, default_num_actions: int = 0) -> Field:
    """The `action` field of T actions: integers → discrete int64 `[T, k]` (`num_classes` from
    `num_actions`, else `default_num_actions`, else left out); floats → float32 `[T, k]` for "mulaw".
    """
    if is_integer_data(value):
        try:
            acts = np.asarray(value, np.int64)
        except OverflowError:
            raise RecordError("actions must be integers in the int64 range") from None
        if acts.ndim == 1:
            acts = acts[:, None]
        if acts.ndim != 2 or acts.shape[0] == 0:
            raise RecordError(f"actions must be T ints or T lists of ints, got shape {list(acts.shape)}")
        if num_actions is not None and (not isinstance(num_actions, int) or isinstance(num_actions, bool)
                                        or not 1 <= num_actions <= MAX_NUM_ACTIONS):
            raise RecordError(f"num_actions must be an integer from 1 to {MAX_NUM_ACTIONS} (2^20), "
                              f"got {num_actions!r:.40}")
        n = num_actions or default_num_actions
        if acts.min() < 0 or (n and acts.max() >= n):
            bad = int(acts.min() if acts.min() < 0 else acts.max())
            raise RecordError(f"action {bad} is out of range" + (f" 0..{n - 1} (num_actions={n})" if n
                                                                 else "; discrete actions are >= 0"))
        return Field("action", "action", acts, tokenizer="discrete",
                     options={"num_classes": int(n)} if n else {})
    return Field("action", "action", float_matrix(value, "actions", allow_vector=True),
                 tokenizer="mulaw")


def _path_value(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecordError(f"{key} must be a file path string, got {value!r:.60}")
    return value


def is_integer_data(value: Any) -> bool:
    """True for an integer numpy array or a JSON list of ints / lists of ints (not bools/floats)."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iub"
    if not isinstance(value, list) or not value:
        return False
    items = [x for row in value for x in row] if all(isinstance(r, list) for r in value) else value
    return bool(items) and all(isinstance(x, int) and not isinstance(x, bool) for x in items)


def float_matrix(value: Any, key: str, vector: bool = False, allow_vector: bool = False) -> np.ndarray:
    """Validates T rows of k numbers (or T numbers if `vector`) and returns float32 `[T, k]` / `[T]`.

    `allow_vector` also accepts T numbers as `[T, 1]`.
    """
    if isinstance(value, list):
        if not value:
            raise RecordError(f"{key} is empty")
        rows = [isinstance(r, list) for r in value]
        if any(rows) and not all(rows):
            raise RecordError(f"{key} mixes numbers and lists")
        if all(rows):
            lengths = [len(r) for r in value]
            if len(set(lengths)) > 1:
                first = next(t for t, n in enumerate(lengths) if n != lengths[0])
                raise RecordError(f"ragged {key}: step 0 has {lengths[0]} values but step {first} "
                                  f"has {lengths[first]}")
            if any(isinstance(x, (list, dict, str, bool)) for r in value for x in r):
                raise RecordError(f"{key} must hold numbers only")
        elif any(isinstance(x, (dict, str, bool)) for x in value):
            raise RecordError(f"{key} must hold numbers only")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{key} must be numeric: {exc}") from None
    if vector and arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if not vector and allow_vector and arr.ndim == 1:
        arr = arr[:, None]
    want = 1 if vector else 2
    if arr.ndim != want or arr.shape[0] == 0:
        form = "T numbers" if vector else "T rows of k numbers"
        raise RecordError(f"{key} must be {form}, got shape {list(arr.shape)}")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        where = f"step {bad[0][0]}" + (f", value {bad[0][1]}" if arr.ndim == 2 else "")
        kind = "NaN" if math.isnan(arr[tuple(bad[0])]) else "inf"
        raise RecordError(f"{key} contain {kind} (first at {where}); values must be finite")
    return arr.astype(np.float32)
