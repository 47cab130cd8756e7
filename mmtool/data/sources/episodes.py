"""`episodes`: RL / robotics trajectories stored as step tables or HDF5, one record per episode.

    mmtool preprocess episodes --opt path=lerobot/data --out data/robot           # parquet
    mmtool preprocess episodes --opt path=hopper-medium-v2.hdf5 --out data/d4rl   # D4RL
    mmtool preprocess episodes --opt path=minari/main_data.hdf5 --out data/minari # Minari

`path` takes files, folders, globs and `{000..009}` patterns (`::` separates several). Three
layouts, told apart by `--opt format=` (default `auto`: `.parquet` → parquet; an HDF5 file with a
root `observations` dataset → d4rl; one with `episode_*` groups → minari):

* **parquet** (LeRobot): one row per step, in one file or one file per episode. Rows are grouped
  by the episode column (`episode_index`) and ordered by the step column (`frame_index`; without
  one, file order). Columns `observation.state` → observation `[T, k]`, `action` → action,
  `next.reward` or `reward` (if present) → reward. List columns become k values per step.
* **d4rl**: flat arrays `observations [N, k]`, `actions [N, m]`, `rewards [N]`, `terminals [N]`,
  `timeouts [N]`; an episode ends at a step whose terminal or timeout is set (steps after the last
  end form a final, unfinished episode, `meta.ended = false`).
* **minari**: one group per episode, `episode_N/{observations, actions, rewards, terminations,
  truncations}`. Minari stores T+1 observations (the last one follows the last action);
  `drop_last_observation=true` (default) keeps the first T, aligned with the T actions;
  `false` keeps the last one in `meta.final_observation` rather than dropping it.

Names differ between datasets: `--opt keys=observations:obs,actions:act,episode:ep` maps each
role (episode, step, observations, actions, rewards, terminals, timeouts) to a column or HDF5
key; a missing one is an error that lists the columns/keys found. Integer actions are discrete
(`num_actions`, else their maximum + 1 is left to the tokenizer); float actions go through mulaw.
Observations of more than one dimension per step are flattened to `[T, k]` (shape in meta).
Records are read by index (one episode at a time), so parallel and resumed runs are exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SOURCES, MappingRow, Source
from mmtool.data.sources.jsonl import MAX_NUM_ACTIONS, action_field, float_matrix
from mmtool.data.sources.keymap import list_files, parse_key_map
from mmtool.errors import MMToolError, RecordError

ROLES = ("episode", "step", "observations", "actions", "rewards", "terminals", "timeouts")
DEFAULT_KEYS = {
    "parquet": {"episode": "episode_index", "step": "frame_index", "observations": "observation.state",
                "actions": "action", "rewards": "next.reward|reward"},
    "d4rl": {"observations": "observations", "actions": "actions", "rewards": "rewards",
             "terminals": "terminals", "timeouts": "timeouts"},
    "minari": {"observations": "observations", "actions": "actions", "rewards": "rewards",
               "terminals": "terminations", "timeouts": "truncations"},
}
OPTIONAL = ("step", "rewards", "terminals", "timeouts")
SUFFIXES = (".parquet", ".hdf5", ".h5")


@dataclass
class EpisodesOptions:
    path: str = field(default="", metadata={
        "help": "(required) parquet or HDF5 files: files, folders, globs, {000..009}; '::' separates"})
    format: str = field(default="auto", metadata={
        "help": "auto, parquet (LeRobot step rows), d4rl (flat HDF5 arrays), minari (HDF5 groups)"})
    keys: str = field(default="", metadata={
        "help": "ROLE:NAME pairs for roles episode, step, observations, actions, rewards, "
                "terminals, timeouts, e.g. observations:obs,actions:act"})
    drop_last_observation: bool = field(default=True, metadata={
        "help": "minari: drop observation T+1 (true) or keep it in meta.final_observation (false)"})
    num_actions: int = field(default=0, metadata={
        "help": "number of discrete actions for integer actions; 0 = left to the tokenizer"})
    task: str = field(default="control", metadata={"help": "the task name of every record"})


@dataclass
class _Episode:
    file: int
    id: str
    ref: Any  # parquet: row indices in step order; d4rl: (start, end); minari: group name
    meta: dict[str, Any]


@SOURCES.register("episodes")
class EpisodesSource(Source):
    """Episodes from LeRobot-style parquet step tables, D4RL HDF5 or Minari HDF5 (`--opt path=`)."""

    Options = EpisodesOptions

    def __init__(self, options: EpisodesOptions, split: str = "all"):
        super().__init__(options, split)
        if options.format not in ("auto", *DEFAULT_KEYS):
            raise MMToolError(f"--opt format={options.format}: expected auto, parquet, d4rl or minari")
        if not 0 <= options.num_actions <= MAX_NUM_ACTIONS:
            raise MMToolError(f"--opt num_actions={options.num_actions}: expected 0 to {MAX_NUM_ACTIONS}")
        self.files = list_files(options.path, "path", SUFFIXES)
        self.user_keys = parse_key_map(options.keys, "keys", ROLES)
        self.formats = [self._format(p) for p in self.files]
        self.found: dict[int, list[str]] = {}  # file -> its columns / keys, for the mapping report
        self.episodes: list[_Episode] = []
        for i, path in enumerate(self.files):
            index = {"parquet": self._index_parquet, "d4rl": self._index_d4rl,
                     "minari": self._index_minari}[self.formats[i]]
            self.episodes += index(i, path)
        if not self.episodes:
            raise MMToolError(f"--opt path={options.path}: no episodes found")
        self._prefix_ids()
        self._cache: tuple[int, Any] | None = None  # (file, open table or h5 file)

    # -- index ----------------------------------------------------------------------------------
    def _format(self, path: Path) -> str:
        if self.options.format != "auto":
            return self.options.format
        if path.suffix == ".parquet":
            return "parquet"
        h5 = _open_h5(path)
        with h5:
            if "observations" in h5 and not hasattr(h5["observations"], "keys"):
                return "d4rl"
            if any(k.startswith("episode_") for k in h5):
                return "minari"
            raise MMToolError(f"--opt path: {path} is neither D4RL (a root 'observations' array) "
                              f"nor Minari (episode_N groups); keys found: {', '.join(sorted(h5)) or 'none'}")

    def key(self, fmt: str, role: str, found: list[str], where: Path) -> str | None:
        """The column/key of `role` in `found` (user's map, else the defaults); None if optional."""
        names = self.user_keys.get(role) or DEFAULT_KEYS[fmt].get(role, "")
        for name in filter(None, names.split("|")):
            if name in found:
                return name
        if role in OPTIONAL and role not in self.user_keys:
            return None
        kind = "columns" if fmt == "parquet" else "keys"
        raise MMToolError(f"--opt keys: {where} has no {role} {kind[:-1]} {names!r} ({kind} found: "
                          f"{', '.join(found) or 'none'}); map it with --opt keys={role}:NAME")

    def _index_parquet(self, i: int, path: Path) -> list[_Episode]:
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        self.found[i] = columns
        ep_col = self.key("parquet", "episode", columns, path)
        for role in ("observations", "actions", "rewards"):
            self.key("parquet", role, columns, path)  # fail now, naming the columns found
        step_col = self.key("parquet", "step", columns, path)
        table = pq.read_table(path, columns=[c for c in (ep_col, step_col) if c])
        ep = table[ep_col].to_numpy(zero_copy_only=False)
        step = table[step_col].to_numpy(zero_copy_only=False) if step_col else np.arange(len(ep))
        order = np.lexsort((step, ep))  # rows by episode, then step (stable: file order on ties)
        bounds = np.flatnonzero(ep[order][1:] != ep[order][:-1]) + 1
        groups = np.split(order, bounds)  # one array of row indices per episode, in step order
        out = []
        for rows in sorted(groups, key=lambda r: int(r.min())):  # episodes in order of first row
            value, steps = ep[rows[0]], step[rows]
            value = value.item() if hasattr(value, "item") else value
            meta = {"file": str(path), "episode": value}
            if len(steps) > 1 and (dup := np.flatnonzero(steps[1:] == steps[:-1])).size:
                meta["duplicate_step"] = steps[dup[0]].item()
            out.append(_Episode(i, str(value), rows, meta))
        return out

    def _index_d4rl(self, i: int, path: Path) -> list[_Episode]:
        with _open_h5(path) as h5:
            found = _h5_keys(h5)
            self.found[i] = found
            for role in ("observations", "actions"):
                self.key("d4rl", role, found, path)
            n = len(h5[self.key("d4rl", "observations", found, path)])
            ends = np.zeros(n, bool)
            for role in ("terminals", "timeouts"):
                if name := self.key("d4rl", role, found, path):
                    ends |= np.asarray(h5[name][:n]).astype(bool).reshape(-1)[:n]
            terminals = np.asarray(h5[t][:n]).astype(bool).reshape(-1) \
                if (t := self.key("d4rl", "terminals", found, path)) else np.zeros(n, bool)
        cuts = [0, *(np.flatnonzero(ends) + 1).tolist()]
        if cuts[-1] != n:
            cuts.append(n)
        out = []
        for e, (start, end) in enumerate(zip(cuts[:-1], cuts[1:])):
            out.append(_Episode(i, str(e), (start, end), {
                "file": str(path), "start": start, "end": end, "ended": bool(ends[end - 1]),
                "terminated": bool(terminals[end - 1])}))
        return out

    def _index_minari(self, i: int, path: Path) -> list[_Episode]:
        with _open_h5(path) as h5:
            groups = sorted((k for k in h5 if k.startswith("episode_")),
                            key=lambda k: (int(k[8:]) if k[8:].isdigit() else 1 << 62, k))
            self.found[i] = _h5_keys(h5[groups[0]]) if groups else []
        return [_Episode(i, g.removeprefix("episode_"), g, {"file": str(path), "group": g})
                for g in groups]

    def _prefix_ids(self) -> None:
        """Ids are the episodes' own when unique, else prefixed by their file's stem/path."""
        if len({e.id for e in self.episodes}) == len(self.episodes):
            return
        stems = [p.stem for p in self.files]
        names = stems if len(set(stems)) == len(stems) else [str(p) for p in self.files]
        for e in self.episodes:
            e.id = f"{names[e.file]}/{e.id}"

    # -- Source API -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.episodes)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def record_id(self, index: int) -> str:
        return self.episodes[index].id

    def location(self, index: int) -> str:
        e = self.episodes[index]
        return f"{self.files[e.file]}:episode {e.id}"

    def input_files(self) -> list[Path]:
        return list(self.files)

    def record_files(self, index: int) -> list[Path]:
        return [self.files[self.episodes[index].file]]

    def record_key(self, index: int) -> bytes:
        e = self.episodes[index]
        ref = e.ref if not isinstance(e.ref, np.ndarray) else hashlib.sha256(e.ref.tobytes()).hexdigest()
        return f"{e.id}\0{e.file}\0{ref}".encode()

    def mapping(self) -> list[MappingRow]:
        """Every column/key of every layout read: what it becomes, or that it is ignored."""
        rows: dict[tuple[str, str, str], None] = {}
        targets = {"episode": ("id", "rows grouped into one episode per value"),
                   "step": ("order", "the episode's steps sorted by it"),
                   "observations": ("observation", ""), "actions": ("action", ""),
                   "rewards": ("reward", ""),
                   "terminals": ("meta", "ends an episode (meta.terminated)"),
                   "timeouts": ("meta", "ends an episode (meta.ended)")}
        for i, found in self.found.items():
            fmt = self.formats[i]
            used = {}
            for role, target in targets.items():
                try:
                    name = self.key(fmt, role, found, self.files[i])
                except MMToolError:
                    name = None
                if name:
                    used[name] = target
            for name in found:
                rows[(name, *used.get(name, ("ignored", "")))] = None
        return [MappingRow(name, target, note=note) for name, target, note in rows]

    # -- reading --------------------------------------------------------------------------------
    def _handle(self, file: int) -> Any:
        if self._cache is None or self._cache[0] != file:
            if self._cache is not None and hasattr(self._cache[1], "close"):
                self._cache[1].close()
            path = self.files[file]
            if self.formats[file] == "parquet":
                import pyarrow.parquet as pq
                names = [self.key("parquet", r, self.found[file], path)
                         for r in ("observations", "actions", "rewards")]
                handle = pq.read_table(path, columns=[n for n in names if n])
            else:
                handle = _open_h5(path)
            self._cache = (file, handle)
        return self._cache[1]

    def read(self, index: int) -> Record:
        try:
            return self._read(self.episodes[index])
        except RecordError as err:
            raise err.at(self.location(index))

    def _read(self, e: _Episode) -> Record:
        fmt, path, found = self.formats[e.file], self.files[e.file], self.found[e.file]
        handle = self._handle(e.file)
        meta = dict(e.meta)
        if "duplicate_step" in meta:
            raise RecordError(f"step {meta['duplicate_step']} occurs twice in this episode")
        if fmt == "parquet":
            arrays = {r: _column(handle, n, e.ref) for r in ("observations", "actions", "rewards")
                      if (n := self.key(fmt, r, found, path))}
        elif fmt == "d4rl":
            start, end = e.ref
            arrays = {r: np.asarray(handle[n][start:end]) for r in ("observations", "actions", "rewards")
                      if (n := self.key(fmt, r, found, path))}
        else:
            arrays, meta = self._minari(handle[e.ref], meta)
        return Record(id=e.id, task=self.options.task, fields=self._fields(arrays, meta), meta=meta)

    def _minari(self, group: Any, meta: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        found = _h5_keys(group)
        try:  # a group without (array) observations/actions rejects its episode, listing its keys
            names = {r: self.key("minari", r, found, Path(group.name)) for r in ROLES[2:]}
        except MMToolError as exc:
            raise RecordError(str(exc).removeprefix("--opt keys: ")) from None
        arrays = {r: np.asarray(group[names[r]]) for r in ("observations", "actions", "rewards") if names[r]}
        T = len(arrays["actions"])
        obs = arrays["observations"]
        if len(obs) == T + 1:
            if not self.options.drop_last_observation:
                meta["final_observation"] = obs[-1].astype(float).tolist()
            arrays["observations"] = obs[:T]
            meta["dropped_last_observation"] = bool(self.options.drop_last_observation)
        for role, key in (("terminals", "terminated"), ("timeouts", "truncated")):
            if names[role]:
                flags = np.asarray(group[names[role]]).astype(bool).reshape(-1)
                meta[key] = bool(flags[-1]) if flags.size else False
        return arrays, meta

    def _fields(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> list[Field]:
        obs = arrays["observations"]
        if obs.ndim > 2:
            meta["observation_shape"] = list(obs.shape[1:])
            obs = obs.reshape(len(obs), -1)  # [T, k]
        fields = [Field("observation", "observation",
                        float_matrix(obs, "observations", allow_vector=True))]
        acts = arrays["actions"]
        if acts.dtype.kind == "b":
            acts = acts.astype(np.int64)
        fields.append(action_field(acts, None, self.options.num_actions))
        lengths = {"observations": len(fields[0].data), "actions": len(fields[1].data)}
        if "rewards" in arrays:
            fields.append(Field("reward", "reward", float_matrix(arrays["rewards"], "rewards", vector=True)))
            lengths["rewards"] = len(fields[-1].data)
        if len(set(lengths.values())) > 1:
            raise RecordError("trajectory lengths differ: " + ", ".join(
                f"{k} has {v} steps" for k, v in lengths.items()))
        meta["steps"] = lengths["actions"]
        return fields


def _column(table: Any, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of a parquet column as `[T]` or `[T, k]` numbers (list columns stacked)."""
    col = table[name].take(rows)
    try:
        values = col.to_numpy(zero_copy_only=False)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"column {name!r} is not numeric: {exc}") from None
    if values.dtype == object:
        try:
            values = np.stack([np.asarray(v) for v in values])
        except ValueError:
            raise RecordError(f"column {name!r} has lists of different lengths") from None
    return values


def _open_h5(path: Path) -> Any:
    try:
        import h5py
    except ImportError:
        raise MMToolError("reading HDF5 episodes needs h5py: pip install 'mmtool[hdf5]'") from None
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise MMToolError(f"--opt path: cannot read {path} as HDF5: {exc}") from None


def _h5_keys(group: Any) -> list[str]:
    """The datasets under `group`, as slash paths (`infos/qpos`), in name order."""
    keys: list[str] = []
    group.visit(lambda name: keys.append(name) if not hasattr(group[name], "keys") else None)
    return keys
