"""Who owns an output folder, and who writes it now.

**Ownership.** Every folder mmtool writes carries a marker, `OUT/.mmtool.json`:
`{"kind": "preprocess" | "embed" | "run" | "export" | "sweep" | ..., "mmtool_version", "command",
"created"}`, written atomically before anything else. `claim(out, kind)` decides whether a command
may write `out`:

- `--out` that is the home folder, `/` or the current directory is refused, and so is a path that
  exists and is not a folder;
- a missing or empty folder is created and marked;
- a folder with the marker of this kind is ours; a marker of another kind is refused (a preprocess
  into a run folder, say);
- a non-empty folder without the marker is refused, `--overwrite` included, naming some of the
  files found — *unless* it is recognisably a folder mmtool made before markers existed (a
  preprocess or embedding folder with our manifest, a run with config.json and checkpoints, an
  export, a sweep): such a folder is adopted, i.e. marked with `"adopted": true`, and used as before.
  Adopting costs nothing and refusing would strand every folder made by earlier versions; a
  foreign tool's `manifest.json` or `config.json` does not look like ours and is refused.

`--overwrite` removes only what mmtool wrote there (the kind's `owned` files: its manifest, shards
named by its pattern, `rejected.jsonl`, `.partial/`, interrupted atomic-write temporaries); any other
file in an owned folder is left in place and reported back (`Claim.foreign`).

**One writer per folder.** `lock(out)` holds an advisory `fcntl.flock` on `OUT/.mmtool.lock` for the
duration of a command, with the holder's pid, host and command written into the file. A second writer
fails at once with one line naming that pid and command. A crashed or `kill -9`ed holder needs no
clean-up: the kernel releases a flock when its process dies, so the next writer takes it over. The
lock is re-entrant within a process (a sweep that locks a run folder may call `train`, which locks it
again). Limits: POSIX only (Windows is not a target: `fcntl` does not exist there); on network file
systems flock is only as good as the server's lock support (NFSv4 and Lustre with `flock` honour it);
the lock file itself is never deleted (deleting a lock file that another process has open races).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import functools
import json
import os
import re
import shlex
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mmtool import __version__
from mmtool.errors import MMToolError
from mmtool.io import atomic_write_json, read_json_object

MARKER = ".mmtool.json"
LOCK = ".mmtool.lock"
PARTIAL = ".partial"  # unfinished work of a job (data.parts.PARTIAL is this name)
_SHARD = re.compile(r"shard-\d{5}\.arrow|slice-\d{5}-of-\d{5}\.json")  # shards, slice manifests
_LOCKS = re.compile(r"\.mmtool\..+\.lock")  # a slice's own lock (`lock(name=...)`)
_TMP = re.compile(r"\..+\.tmp")  # io.tmp_path's names: an interrupted atomic write of ours
_SHOWN = 5  # files named in a refusal


def command_line() -> str:
    """This process's command, as a user would type it (`mmtool preprocess ...`)."""
    argv = list(sys.argv)
    if argv and (Path(argv[0]).parts[-2:] == ("mmtool", "__main__.py") or Path(argv[0]).name == "mmtool"):
        argv[0] = "mmtool"
    return shlex.join(argv)


# -- kinds ----------------------------------------------------------------------------------------
def _manifest(folder: Path) -> dict[str, Any] | None:
    doc = read_json_object(folder / "manifest.json")
    ours = doc is not None and "schema_version" in doc and isinstance(doc.get("shards"), list)
    return doc if ours else None


def _partial_plan(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / PARTIAL / "plan.json") or {}


def _is_preprocess(folder: Path) -> bool:
    doc = _manifest(folder)
    if doc is not None:
        return "embedding" not in doc and isinstance(doc.get("plan"), dict)
    plan = _partial_plan(folder)
    return "fingerprint" in plan and "shard_size" in plan


def _is_embed(folder: Path) -> bool:
    doc = _manifest(folder)
    if doc is not None:
        return isinstance(doc.get("embedding"), dict)
    plan = _partial_plan(folder)
    return "fingerprint" in plan and "encoder" in plan


def _is_run(folder: Path) -> bool:
    cfg = read_json_object(folder / "config.json") or {}
    return "model" in cfg and "data" in cfg and ((folder / "checkpoints").is_dir()
                                                 or (folder / "metrics.jsonl").is_file())


def _is_export(folder: Path) -> bool:
    return (read_json_object(folder / "config.json") or {}).get("model_type") == "mmtool"


def _is_sweep(folder: Path) -> bool:
    return ((folder / "sweep.json").is_file() or (folder / ".data.lock").is_file()
            or any((folder / "runs").glob("*/sweep-point.json")))


def _is_quickstart(folder: Path) -> bool:
    data = folder / "data"
    return data.is_dir() and any(_is_preprocess(d) for d in data.iterdir() if d.is_dir())


def _dataset_files(folder: Path) -> list[Path]:
    """What a preprocess or embed job writes: manifest, rejects, shards, .partial, temporaries."""
    named = [folder / "manifest.json", folder / "rejected.jsonl", folder / PARTIAL]
    listed = [folder / s["path"] for s in (_manifest(folder) or {}).get("shards", [])
              if isinstance(s, dict) and isinstance(s.get("path"), str) and "/" not in s["path"]
              and ".." not in s["path"]]
    patterned = [p for p in folder.iterdir() if _SHARD.fullmatch(p.name) or _TMP.fullmatch(p.name)]
    return [p for p in dict.fromkeys(named + listed + patterned) if p.exists() or p.is_symlink()]


@dataclass(frozen=True)
class FolderKind:
    """One kind of folder mmtool writes.

    Args:
        name: the marker's `kind`.
        what: how messages name it, e.g. "a preprocessed dataset".
        recognise: True for a folder of this kind made before markers existed (it is adopted).
        owned: the entries of an owned folder that `--overwrite` may delete (never the marker or the
            lock file, which `claim` keeps); None for kinds without `--overwrite`.
    """

    name: str
    what: str
    recognise: Callable[[Path], bool] = lambda _folder: False
    owned: Callable[[Path], list[Path]] | None = None


KINDS: dict[str, FolderKind] = {}
"""Registry of folder kinds, by marker name."""


def register_kind(kind: FolderKind) -> FolderKind:
    """Adds a kind to `KINDS` (a plug-in command that writes a folder registers one)."""
    KINDS[kind.name] = kind
    return kind


for _kind in (
    FolderKind("preprocess", "a preprocessed dataset", _is_preprocess, _dataset_files),
    FolderKind("embed", "an embedding folder", _is_embed, _dataset_files),
    FolderKind("run", "a training run", _is_run),
    FolderKind("export", "an mmtool export", _is_export),
    FolderKind("sweep", "a sweep", _is_sweep),
    FolderKind("quickstart", "a quickstart folder", _is_quickstart),
    FolderKind("report", "a report", lambda f: "files" in (read_json_object(f / "report.json") or {})),
    FolderKind("eval-transfer", "a transfer evaluation",
               lambda f: "tasks" in (read_json_object(f / "report.json") or {})),
):
    register_kind(_kind)


# -- claim -----------------------------------------------------------------------------------------
@dataclass
class Claim:
    """What `claim` found and did.

    Attributes:
        path: the folder.
        kind: its kind.
        created: the folder did not exist (or was empty) and was marked now.
        adopted: a folder made before markers existed was marked now.
        removed: names `--overwrite` deleted.
        foreign: names in the folder that mmtool did not write (left in place).
    """

    path: Path
    kind: str
    created: bool = False
    adopted: bool = False
    removed: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The folder's marker, or None when it has none (or an unreadable one)."""
    doc = read_json_object(Path(folder) / MARKER)
    return doc if doc is not None and isinstance(doc.get("kind"), str) else None


def _names(paths: list[str]) -> str:
    shown = ", ".join(sorted(paths)[:_SHOWN])
    return shown + (f", … ({len(paths)} in all)" if len(paths) > _SHOWN else "")


def check_out(out: str | Path, flag: str = "--out") -> Path:
    """Refuses an output path that is the home folder, `/`, the current directory, or an existing
    non-folder; returns it as a Path. A literal `~` (a shell did not expand it) counts as home.

    Raises:
        MMToolError: naming the flag and the path.
    """
    path = Path(out)
    resolved = path.expanduser().resolve()
    for name, place in (("the root folder", Path("/")), ("your home folder", Path.home()),
                        ("the current directory", Path.cwd())):
        if resolved == place.resolve():
            raise MMToolError(f"{flag} {out}: is {name}; give mmtool a folder of its own "
                              f"(e.g. {flag} {Path(out) / 'mmtool-out'})")
    if path.exists() and not path.is_dir():
        raise MMToolError(f"{flag} {out}: exists and is not a folder")
    return path


def _entries(folder: Path) -> list[str]:
    """The folder's names, less the lock, the marker and a marker being written (a concurrent writer
    between its flock and its marker must not make the folder look foreign)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in (MARKER, LOCK) and not p.name.startswith(f".{MARKER}.")
                  and not _LOCKS.fullmatch(p.name))


def inspect(out: str | Path, kind: str, flag: str = "--out") -> str:
    """Decides, without writing anything, what `claim` would do: "new", "owned" or "adopt".

    Raises:
        MMToolError: a refused path, a marker of another kind, or a non-empty folder that mmtool did
            not make.
    """
    folder, spec = check_out(out, flag), KINDS[kind]
    if not folder.exists():
        return "new"
    marker = read_marker(folder)
    if marker is not None:
        if marker["kind"] != kind:
            other = KINDS.get(marker["kind"])
            raise MMToolError(
                f"{flag} {out}: holds {other.what if other else marker['kind']} (made by "
                f"`{marker.get('command', '?')}`) and is not {spec.what}; choose another {flag}")
        return "owned"
    entries = _entries(folder)
    if not entries:
        return "new"
    if spec.recognise(folder):
        return "adopt"
    for other in KINDS.values():
        if other.recognise(folder):
            raise MMToolError(f"{flag} {out}: holds {other.what} (made before ownership markers) "
                              f"and is not {spec.what}; choose another {flag}")
    raise MMToolError(f"{flag} {out}: is not empty and mmtool did not make it (found {_names(entries)}); "
                      f"choose a new or empty folder (--overwrite never deletes files mmtool did not write)")


def claim(out: str | Path, kind: str, overwrite: bool = False, command: str | None = None,
          flag: str = "--out") -> Claim:
    """Makes `out` a folder of `kind` that this command may write (see the module docstring).

    Call it while holding `lock(out)` when other writers may exist (`writer` does both).

    Args:
        out: the output folder.
        kind: a name in `KINDS`.
        overwrite: delete what mmtool wrote there before (the kind's `owned` files), never other files.
        command: recorded in the marker (default: this process's command line).
        flag: the flag that named `out`, for messages.

    Raises:
        MMToolError: see `inspect`.
    """
    state = inspect(out, kind, flag)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result = Claim(folder, kind, created=state == "new", adopted=state == "adopt")
    if state != "owned":
        marker = {"kind": kind, "mmtool_version": __version__, "command": command or command_line(),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(folder / MARKER, {**marker, **({"adopted": True} if result.adopted else {})})
    if overwrite and KINDS[kind].owned is not None:
        owned = KINDS[kind].owned(folder)
        for path in owned:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        result.removed = sorted(p.name for p in owned)
        result.foreign = _entries(folder)  # what is left is not ours
    return result


# -- lock ------------------------------------------------------------------------------------------
_HELD: dict[str, int] = {}  # resolved lock path → depth, for re-entrant use within this process
_HELD_GUARD = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> str:
    """The lock's holder as words, read from the lock file (retried briefly: a new holder writes
    its details just after taking the lock)."""
    for _ in range(20):
        try:
            doc = json.loads(path.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and "pid" in doc:
            pid = doc["pid"]
            dead = doc.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
            return (f"pid {pid} on {doc.get('host')} (`{doc.get('command')}`, since {doc.get('since')})"
                    + ("; that process has exited but a child of it still holds the lock" if dead else ""))
        time.sleep(0.05)
    return "another process (it has not said which)"


@contextmanager
def lock(out: str | Path, command: str | None = None, flag: str = "--out",
         wait: bool = False, name: str = LOCK) -> Iterator[Path]:
    """Holds the one-writer lock of folder `out` (which must exist) for the `with` block.

    Args:
        out: the folder.
        command: recorded for a second writer's message (default: this process's command line).
        flag: the flag that named `out`, for messages.
        wait: block until the lock is free instead of failing (for short critical sections).
        name: the lock file; another name locks one part of the folder (a preprocessing slice's
            parts, `.mmtool.slice-00002-of-00004.lock`) for writers that share it.

    Yields:
        The lock file's path.

    Raises:
        MMToolError: another process holds the lock (the message names its pid and command).
    """
    path = Path(out) / name
    key = str(path.resolve())
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise MMToolError(f"{flag} {out}: is being written by {_holder(path)}; wait for it to "
                              "finish or stop it (one writer per folder)") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or command_line(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        with _HELD_GUARD:
            _HELD[key] = 1
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            os.ftruncate(fd, 0)  # a free lock names no holder
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


@contextmanager
def writer(out: str | Path, kind: str, overwrite: bool = False, command: str | None = None,
           flag: str = "--out") -> Iterator[Claim]:
    """Claims `out` for `kind` and holds its lock for the `with` block: the way a command writes.

    The ownership check runs before anything is written (a refused folder gets no lock file), then
    again under the lock (another writer may have marked the folder meanwhile). When the block
    fails and the folder was created here and holds nothing else, the folder is removed again.

    Raises:
        MMToolError: see `inspect` and `lock`.
    """
    fresh = inspect(out, kind, flag) == "new" and not Path(out).exists()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with lock(folder, command, flag):
            yield claim(folder, kind, overwrite, command, flag)
    except BaseException:
        if fresh:
            _remove_if_untouched(folder)
        raise


def claim_shared(out: str | Path, kind: str, command: str | None = None, flag: str = "--out") -> Claim:
    """Claims `out` under a brief lock that waits instead of failing, and returns: for a folder that
    several processes of one job write at once (a sweep's `--point` processes), each of which
    locks the subfolder it writes.

    Raises:
        MMToolError: see `inspect`.
    """
    inspect(out, kind, flag)
    Path(out).mkdir(parents=True, exist_ok=True)
    with lock(out, command, flag, wait=True):
        return claim(out, kind, False, command, flag)


def writes_out(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates `fn(cfg, ...)` so that it runs inside `writer(cfg.out, kind)` on the main process.

    Under `torchrun` only rank 0 (environment `RANK`) claims and locks: the other ranks of the same
    job write nothing there and must not be refused as second writers.
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if os.environ.get("RANK", "0") != "0":
                return fn(cfg, *args, **kwargs)
            with writer(cfg.out, kind):
                return fn(cfg, *args, **kwargs)
        return wrapped
    return decorate


def _remove_if_untouched(folder: Path) -> None:
    """Removes a folder this command created when nothing but the marker and the lock went in
    (a command refused after claiming leaves no trace)."""
    try:
        if _entries(folder):
            return
        for name in (MARKER, LOCK):
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass
