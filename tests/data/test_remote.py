"""Shards on object storage: training from `memory://` and from a real S3-compatible server (moto,
started here on localhost) equals training from the local folder, resume included; the shard
cache verifies, prefetches, evicts, and refuses a corrupted remote shard by its URL."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from mmtool.data import remote
from mmtool.data import shards as store
from mmtool.data.loader import Loader, LoaderConfig
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.errors import MMToolError
from mmtool.models.model import ModelConfig
from mmtool.train import TrainConfig, train


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Two real folders with several shards each (a small --shard-size)."""
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessConfig("digits", root / "digits", max_samples=64, shard_size="8KB"))
    preprocess(PreprocessConfig("pydocs", root / "pydocs", options=["modules=json"], max_samples=30,
                                shard_size="8KB"))
    for name in ("digits", "pydocs"):
        assert len(store.load_manifest(root / name)["shards"]) >= 2, name
    return root


def upload(local_root: Path, url: str) -> list[str]:
    """Copies the folders to `url` with fsspec (what `preprocess --out URL` leaves there)."""
    fs, root = fsspec.core.url_to_fs(url)
    for folder in ("digits", "pydocs"):
        for f in sorted((local_root / folder).iterdir()):
            if f.is_file():
                fs.put_file(str(f), f"{root}/{folder}/{f.name}")
    return [f"{url}/digits", f"{url}/pydocs"]


def run_config(data, out, cache, **kw):
    base = dict(data=data, out=out, batch_tokens=1024, max_steps=6, save_every=3, warmup=2, lr=3e-3,
                num_workers=1, model=ModelConfig(size="tiny"), cache_dir=str(cache))
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> list[tuple]:
    return [(x["step"], x["loss"], x["losses"]) for x in
            map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def train_and_resume(data, tmp, cache, **kw) -> list[tuple]:
    """6 steps straight, and 6 steps in a run killed (NaN) after the step-3 checkpoint then resumed:
    both must log the same losses; returns them."""
    straight = tmp / "straight"
    train(run_config(data, straight, cache, **kw))
    broken = tmp / "broken"
    with pytest.raises(MMToolError, match="at step 5"):
        train(run_config(data, broken, cache, fault_nan_step=5, **kw))
    train(run_config(data, broken, cache, **kw), resume=True)
    assert losses(straight) == losses(broken)
    return losses(straight)


@pytest.fixture(scope="module")
def reference(local, tmp_path_factory):
    """The losses of the run on the local folders."""
    tmp = tmp_path_factory.mktemp("ref")
    return train_and_resume([str(local / "digits"), str(local / "pydocs")], tmp, tmp / "unused")


def test_memory_url_trains_and_resumes_like_local(local, reference, tmp_path):
    data = upload(local, f"memory://mmtool-{uuid.uuid4().hex}")
    cache = tmp_path / "cache"
    assert train_and_resume(data, tmp_path, cache) == reference
    names = sorted(p.name for p in cache.glob("*.arrow"))
    shas = sorted(f"{s['sha256']}.arrow" for n in ("digits", "pydocs")
                  for s in store.load_manifest(local / n)["shards"])
    assert names == shas  # keyed by sha256, each fetched once, all kept (under the default limit)


def test_file_url_is_the_local_folder(local):
    url = f"file://{local / 'digits'}"
    assert remote.local_path(url) == local / "digits"
    loader = Loader(LoaderConfig([url], batch_tokens=1024))
    assert loader.index.cache is None  # read in place: no copy, no cache


def test_tiny_cache_limit_evicts_and_keeps_batches_exact(local, tmp_path):
    data = upload(local, f"memory://mmtool-{uuid.uuid4().hex}")
    sizes = [s["bytes"] for n in ("digits", "pydocs") for s in store.load_manifest(local / n)["shards"]]
    limit = max(sizes) + 1  # room for about one shard: every other one is evicted
    ref = Loader(LoaderConfig([str(local / "digits"), str(local / "pydocs")], batch_tokens=1024, seed=3))
    small = Loader(LoaderConfig(data, batch_tokens=1024, seed=3, cache_dir=str(tmp_path / "c"),
                                cache_limit=str(limit), num_workers=2))
    n = 0
    for a, b in zip(ref, small):
        assert a.names() == b.names() and np.array_equal(a.buffer.numpy(), b.buffer.numpy())
        n += 1
    assert n == len(ref) > 3
    cache = small.index.cache
    small.close()
    assert cache.stats["evicted"] > 0 and cache.stats["fetched"] > len(sizes)  # some fetched twice
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.arrow"))
    assert on_disk == cache.cached_bytes() <= limit


def test_cache_pins_prefetches_and_trusts_verified_files(local, tmp_path):
    data = upload(local, f"memory://mmtool-{uuid.uuid4().hex}")
    entries = store.load_manifest(data[0])["shards"]
    refs = [remote.ShardRef(store.shard_path(data[0], e), e["sha256"], e["bytes"]) for e in entries]
    cache = remote.ShardCache(tmp_path / "c", limit=1)  # nothing fits: only pins keep files
    held = cache.acquire(refs[0])
    cache.acquire(refs[1])
    cache.release(refs[1])
    assert held.is_file() and not cache.path(refs[1].sha256).exists()  # pinned stays, unpinned goes
    cache.release(refs[0])
    assert not held.exists()
    big = remote.ShardCache(tmp_path / "c", limit=10**9)
    big.prefetch(refs)
    big._thread.join(timeout=0.01)
    for r in refs:
        big.acquire(r)  # waits for the background fetch of r if it is under way
        big.release(r)
    assert big.stats["fetched"] == len(refs) and big.stats["prefetched"] >= 1
    again = remote.ShardCache(tmp_path / "c", limit=10**9)  # a new process: files already verified
    again.acquire(refs[0])
    assert again.stats == {"hits": 1}


def test_corrupted_remote_shard_is_refused_naming_its_url(local, tmp_path):
    data = upload(local, f"memory://mmtool-{uuid.uuid4().hex}")
    entry = store.load_manifest(data[1])["shards"][1]
    url = f"{data[1]}/{entry['path']}"
    fs, path = fsspec.core.url_to_fs(url)
    blob = bytearray(fs.cat_file(path))
    blob[len(blob) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(blob))
    with pytest.raises(MMToolError) as err:
        Loader(LoaderConfig(data, batch_tokens=1024, cache_dir=str(tmp_path / "c")))
    msg = str(err.value)
    assert msg.startswith(f"{url}: shard is corrupt") and "\n" not in msg
    assert not list((tmp_path / "c").glob("*")) or all(p.name != f"{entry['sha256']}.arrow"
                                                        for p in (tmp_path / "c").iterdir())


def test_manifest_may_not_leave_a_remote_folder(local):
    url = f"memory://mmtool-{uuid.uuid4().hex}/x"
    with pytest.raises(MMToolError, match="leaves the folder"):
        store.shard_path(url, {"path": "../other/shard-00000.arrow"})
    with pytest.raises(MMToolError, match="no manifest.json"):
        store.load_manifest(url)


def test_redact_hides_credentials():
    assert remote.redact("s3://KEY:SECRET@bucket/data") == "s3://bucket/data"
    assert remote.is_remote("s3://b/x") and not remote.is_remote("file:///x") and not remote.is_remote("/x")


# -- a real S3-compatible server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(monkeypatch_module=None):
    """A moto S3 server on a free localhost port; its endpoint and dummy credentials in the env."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("mmtool-test")
    yield env
    mp.undo()
    server.stop()


@pytest.mark.slow
def test_s3_trains_and_resumes_like_local(local, reference, s3, tmp_path):
    fsspec.filesystem("s3").invalidate_cache()
    data = upload(local, f"s3://mmtool-test/{uuid.uuid4().hex}")
    assert train_and_resume(data, tmp_path, tmp_path / "cache") == reference
