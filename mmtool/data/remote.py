"""Shards anywhere fsspec reaches: URLs, a bounded local shard cache, and publishing a folder.

`--data` and `--out` accept URLs of any fsspec protocol (`s3://`, `gs://`, `hf://`, `memory://`,
...). `file://` URLs are plain local folders (memory-mapped in place, no copy). Everything else is
remote and training reads it through a `ShardCache`:

* a shard is fetched once into `CACHE_DIR/<sha256>.arrow`, keyed by the sha256 its manifest
  records, and its bytes are hashed on the way in: a mismatch is refused in one line naming the
  URL, and a file in the cache is therefore verified (it is only ever renamed into place after
  its hash matched), so a rerun or a resume reads it without hashing it again;
* a background thread fetches the shards the next batches need (`ShardCache.prefetch`);
* beyond `limit` bytes the least-recently-used shards are deleted, never one that is pinned
  (in use by a batch being assembled). The limit is per process: ranks sharing a cache folder
  share files but each keeps its own count.

Credentials are the backend's own (AWS_* variables or ~/.aws for s3, GOOGLE_APPLICATION_CREDENTIALS
for gs, HF_TOKEN for hf, ...): mmtool takes none as flags and prints URLs without any user:password
part (`redact`).
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

from mmtool.errors import MMToolError

__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_CACHE_LIMIT", "ShardCache", "ShardRef", "is_remote", "join",
           "local_path", "publish_folder", "read_bytes", "redact"]

DEFAULT_CACHE_DIR = "~/.cache/mmtool/shards"
DEFAULT_CACHE_LIMIT = "20GB"
DEFAULT_STAGING_DIR = "~/.cache/mmtool/staging"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CHUNK = 8 << 20


def is_remote(path: Any) -> bool:
    """True for a URL that is not `file://` (a str with a `scheme://` prefix)."""
    m = _SCHEME.match(str(path)) if isinstance(path, str) else None
    return bool(m) and m.group(1).lower() not in ("file", "local")


def local_path(path: str | Path) -> str | Path:
    """`file:///x` → Path("/x"); a remote URL unchanged (a str); anything else a Path."""
    if isinstance(path, str) and is_remote(path):
        return path
    text = str(path)
    m = _SCHEME.match(text)
    return Path(text[m.end():] if m else text)


def redact(url: str) -> str:
    """The URL without a `user:password@` part, for messages and logs."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@", r"\1", str(url))


def join(url: str, rel: str) -> str:
    """`url/rel` for a folder URL."""
    return url.rstrip("/") + "/" + rel


def _fs(url: str):
    import fsspec  # imported only when a URL is used

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise MMToolError(f"{redact(url)}: no fsspec backend for this URL ({exc}); install the "
                          "backend's package (s3fs for s3://, gcsfs for gs://, ...)") from None


def read_bytes(url: str) -> bytes:
    """The bytes of one remote file.

    Raises:
        FileNotFoundError: no such file. MMToolError: any other failure, naming the URL.
    """
    fs, path = _fs(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # backends raise their own types (botocore, aiohttp, ...)
        raise MMToolError(f"{redact(url)}: cannot be read ({type(exc).__name__}: {exc})") from None


class ShardRef:
    """One remote shard: its URL, the sha256 and size its manifest records."""

    __slots__ = ("url", "sha256", "bytes")

    def __init__(self, url: str, sha256: str, size: int):
        self.url, self.sha256, self.bytes = url, sha256, size


class ShardCache:
    """A folder of verified shards named by sha256, bounded in bytes, least-recently-used out.

    Args:
        root: the cache folder (`--cache-dir`).
        limit: bytes kept (`--cache-limit`); pinned shards are kept even beyond it.
    """

    def __init__(self, root: str | Path, limit: int):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.limit = int(limit)
        self.stats = Counter()  # fetched, bytes_fetched, hits, evicted
        self._lru: OrderedDict[str, int] = OrderedDict()  # sha256 → bytes, least recent first
        files = sorted(self.root.glob("*.arrow"), key=lambda p: p.stat().st_mtime)
        for p in files:
            if re.fullmatch(r"[0-9a-f]{64}", p.stem):
                self._lru[p.stem] = p.stat().st_size
        self._pins: Counter = Counter()
        self._on_evict: list[Callable[[str], None]] = []
        self._start_process()

    def _start_process(self) -> None:
        """Fresh locks and prefetch thread (at construction and in a forked worker process)."""
        self._pid = os.getpid()
        self._lock = threading.Condition(threading.RLock())
        self._fetching: set[str] = set()
        self._queue: queue.Queue = queue.Queue()
        self._queued: set[str] = set()
        self._thread: threading.Thread | None = None

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            self._start_process()

    def path(self, sha256: str) -> Path:
        """Where a shard with this sha256 lives in the cache."""
        return self.root / f"{sha256}.arrow"

    def on_evict(self, callback: Callable[[str], None]) -> None:
        """Calls `callback(sha256)` (under the cache lock) before a shard's file is deleted."""
        self._on_evict.append(callback)

    def cached_bytes(self) -> int:
        """Bytes of shards in the cache now."""
        with self._lock:
            return sum(self._lru.values())

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._lru

    # -- fetching --------------------------------------------------------------------------------
    def acquire(self, ref: ShardRef) -> Path:
        """Pins `ref` (it will not be evicted until `release`) and returns its local file, fetching
        and verifying it first when it is not cached."""
        self._check_process()
        with self._lock:
            self._pins[ref.sha256] += 1
        try:
            return self._fetch(ref)
        except BaseException:
            self.release(ref)
            raise

    def release(self, ref: ShardRef) -> None:
        """Unpins `ref`; evicts whatever now lies beyond the limit."""
        with self._lock:
            self._pins[ref.sha256] -= 1
            if self._pins[ref.sha256] <= 0:
                del self._pins[ref.sha256]
            self._evict()

    def _fetch(self, ref: ShardRef) -> Path:
        path = self.path(ref.sha256)
        with self._lock:
            while ref.sha256 in self._fetching:  # another thread is bringing it
                self._lock.wait()
            if ref.sha256 in self._lru and path.is_file():
                self._lru.move_to_end(ref.sha256)
                self.stats["hits"] += 1
                return path
            self._lru.pop(ref.sha256, None)
            self._fetching.add(ref.sha256)
        try:
            self._download(ref, path)
        finally:
            with self._lock:
                self._fetching.discard(ref.sha256)
                self._lock.notify_all()
        with self._lock:
            self._lru[ref.sha256] = ref.bytes
            self.stats["fetched"] += 1
            self.stats["bytes_fetched"] += ref.bytes
            self._evict()
        return path

    def _download(self, ref: ShardRef, path: Path) -> None:
        """Copies the remote file to `path`, hashing as it goes; renamed into place only if its
        size and sha256 are those of the manifest."""
        tmp = self.root / f".{ref.sha256}.{os.getpid()}.{threading.get_ident()}.part"
        digest, size = hashlib.sha256(), 0
        fs, rpath = _fs(ref.url)
        try:
            with fs.open(rpath, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            if size != ref.bytes or digest.hexdigest() != ref.sha256:
                raise MMToolError(
                    f"{redact(ref.url)}: shard is corrupt (sha256 {digest.hexdigest()[:12]}…, {size} bytes; "
                    f"its manifest says {ref.sha256[:12]}…, {ref.bytes} bytes); preprocess it again")
            os.replace(tmp, path)
        except FileNotFoundError:
            raise MMToolError(f"{redact(ref.url)}: shard listed in manifest.json is missing") from None
        except MMToolError:
            raise
        except Exception as exc:  # backend errors: one line naming the URL, never the credentials
            raise MMToolError(f"{redact(ref.url)}: cannot be fetched ({type(exc).__name__}: {exc})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Deletes least-recently-used unpinned shards until the cache fits its limit (lock held)."""
        total = sum(self._lru.values())
        for sha in list(self._lru):
            if total <= self.limit:
                break
            if self._pins.get(sha) or sha in self._fetching:
                continue
            for callback in self._on_evict:
                callback(sha)
            self.path(sha).unlink(missing_ok=True)
            total -= self._lru.pop(sha)
            self.stats["evicted"] += 1

    # -- prefetching -----------------------------------------------------------------------------
    def prefetch(self, refs: Iterable[ShardRef]) -> None:
        """Fetches `refs` in a background thread (those not cached and not queued yet). A failure
        there is dropped: the fetch that needs the shard raises it."""
        self._check_process()
        with self._lock:
            todo = [r for r in refs if r.sha256 not in self._lru and r.sha256 not in self._queued]
            self._queued.update(r.sha256 for r in todo)
            if todo and self._thread is None:
                self._thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                name="mmtool-shard-prefetch")
                self._thread.start()
        for ref in todo:
            self._queue.put(ref)

    def _prefetch_loop(self) -> None:
        while True:
            ref = self._queue.get()
            try:
                self._fetch(ref)
                self.stats["prefetched"] += 1
            except Exception:  # noqa: BLE001 — reported by the foreground fetch
                pass
            finally:
                with self._lock:
                    self._queued.discard(ref.sha256)


def publish_folder(staging: Path, url: str, files: list[str], manifest: str = "manifest.json") -> None:
    """Uploads a finished local folder to `url`: the old manifest is removed first, then every file
    of `files` (the shards, rejected.jsonl) is put, and the manifest last, so that a reader never
    sees a manifest naming a shard that is missing or not yet rewritten. Each put is one object
    write (atomic on object stores). Every file is sent again on a rerun: shard names are positions,
    not contents, so a file of the same name and size may still differ.

    Raises:
        MMToolError: a failed upload, naming the URL.
    """
    fs, root = _fs(url)
    target = lambda name: root.rstrip("/") + "/" + name  # noqa: E731
    try:
        if fs.exists(target(manifest)):
            fs.rm_file(target(manifest))
        for name in files:
            fs.put_file(str(staging / name), target(name))
        fs.put_file(str(staging / manifest), target(manifest))
    except Exception as exc:  # noqa: BLE001 — backend errors in one line, never the credentials
        raise MMToolError(f"--out {redact(url)}: upload failed ({type(exc).__name__}: {exc}); "
                          "rerun the same command to finish it") from None


def staging_dir(url: str, staging: str | Path | None = None) -> Path:
    """The local folder in which a job bound for `url` is built: `staging`, or
    `~/.cache/mmtool/staging/<first 16 hex of sha256(url without credentials)>`, kept so that a
    rerun of the same command resumes there."""
    key = hashlib.sha256(redact(url).encode()).hexdigest()[:16]
    return Path(staging or Path(DEFAULT_STAGING_DIR) / key).expanduser()


def publish_dataset(staging: Path, url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Uploads the finished dataset folder `staging` (its manifest's shards, `rejected.jsonl` if
    there is one, the manifest last: `publish_folder`) to `url`; returns the manifest with
    `staging` and the redacted `url` added."""
    files = [s["path"] for s in manifest["shards"]]
    files += ["rejected.jsonl"] if (staging / "rejected.jsonl").is_file() else []
    publish_folder(staging, url, files, "manifest.json")
    return {**manifest, "staging": str(staging), "url": redact(url)}
