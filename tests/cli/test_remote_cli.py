"""`mmtool preprocess --out s3://...` then `mmtool train --data s3://...` (killed and resumed), as real
subprocesses against a real S3-compatible server (moto) started here on localhost: the losses equal
those of the same commands on local folders, and a shard corrupted on the server is refused by URL."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server")
fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs")

TRAIN = ("--batch-tokens", "1024", "--max-steps", "6", "--save-every", "3", "--warmup", "2",
         "--model.size", "tiny", "--device", "cpu")
PREP = ("--max-samples", "48", "--shard-size", "8KB")


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free port, with a bucket; the env a subprocess needs to reach it
    (dummy credentials: the backend reads them from the environment, mmtool never sees them)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("mmtool-cli")
    yield env, fs
    mp.undo()
    server.stop()


def losses(run: Path) -> list[tuple]:
    return [(x["step"], x["loss"], x["losses"]) for x in
            map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def train_killed_and_resumed(cli, data: str, run: Path, env: dict, *extra: str) -> list[tuple]:
    """Trains 6 steps, dying of a NaN at step 5 (after the step-3 checkpoint), then resumes."""
    dead = cli("train", "--data", data, "--out", run, *TRAIN, *extra, "fault_nan_step=5", env=env, check=False)
    assert dead.returncode != 0 and len(losses(run)) == 4, dead.stderr
    cli("train", "--data", data, "--out", run, *TRAIN, *extra, "--resume", "fault_nan_step=null", env=env)
    return losses(run)


@pytest.mark.slow
def test_preprocess_train_resume_on_s3_equal_local(cli, s3_env, tmp_path):
    env, fs = s3_env
    url = f"s3://mmtool-cli/{uuid.uuid4().hex}/digits"
    cli("preprocess", "digits", "--out", tmp_path / "local", *PREP, env=env)
    out = cli("preprocess", "digits", "--out", url, "--staging", tmp_path / "staging", *PREP, env=env)
    assert f"uploaded to {url}" in out.stdout and "testing-secret" not in out.stdout + out.stderr
    local_manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    remote_manifest = json.loads(fs.cat_file(f"{url[5:]}/manifest.json"))
    assert len(local_manifest["shards"]) >= 2
    assert remote_manifest["shards"] == local_manifest["shards"]  # byte-identical shards, same sha256
    for s in local_manifest["shards"]:
        assert fs.cat_file(f"{url[5:]}/{s['path']}") == (tmp_path / "local" / s["path"]).read_bytes()

    cli("train", "--data", tmp_path / "local", "--out", tmp_path / "run-local", *TRAIN, env=env)
    cache = tmp_path / "cache"
    got = train_killed_and_resumed(cli, url, tmp_path / "run-s3", env, "--cache-dir", cache,
                                   "--cache-limit", "1MB")
    assert got == losses(tmp_path / "run-local")
    assert sorted(p.stem for p in cache.glob("*.arrow")) == sorted(s["sha256"] for s in local_manifest["shards"])
    for name in ("config.json", "metrics.jsonl"):
        assert "testing-secret" not in (tmp_path / "run-s3" / name).read_text()

    # One byte overwritten on the server: a fresh cache refuses the shard, naming its URL.
    shard = local_manifest["shards"][-1]
    blob = bytearray(fs.cat_file(f"{url[5:]}/{shard['path']}"))
    blob[100] ^= 0xFF
    fs.pipe_file(f"{url[5:]}/{shard['path']}", bytes(blob))
    bad = cli("train", "--data", url, "--out", tmp_path / "run-bad", *TRAIN, "--cache-dir",
              tmp_path / "cache2", env=env, check=False)
    assert bad.returncode != 0 and f"{url}/{shard['path']}: shard is corrupt" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_slices_merge_and_embed_upload_to_s3(cli, s3_env, tmp_path):
    """`mmtool merge s3://...` uploads the bytes a local merge writes; `mmtool embed --out s3://...`
    uploads the bytes a local embed writes, and `train --data` reads that embedding folder back."""
    env, fs = s3_env
    base = f"s3://mmtool-cli/{uuid.uuid4().hex}"
    for i in range(2):
        cli("preprocess", "digits", "--num-slices", "2", "--slice", i, "--out", tmp_path / f"s{i}",
            *PREP, env=env)
    cli("merge", tmp_path / "local", tmp_path / "s0", tmp_path / "s1", env=env)
    out = cli("merge", f"{base}/digits", tmp_path / "s0", tmp_path / "s1", env=env)
    assert f"uploaded to {base}/digits" in out.stdout
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert json.loads(fs.cat_file(f"{base[5:]}/digits/manifest.json"))["shards"] == local["shards"]
    for s in local["shards"]:
        assert fs.cat_file(f"{base[5:]}/digits/{s['path']}") == (tmp_path / "local" / s["path"]).read_bytes()

    cli("embed", tmp_path / "local", "--encoder", "minilm-l6", "--out", tmp_path / "emb", env=env)
    out = cli("embed", tmp_path / "local", "--encoder", "minilm-l6", "--out", f"{base}/emb",
              "--staging", tmp_path / "emb-staging", env=env)
    assert f"uploaded to {base}/emb" in out.stdout
    emb = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert [s["sha256"] for s in json.loads(fs.cat_file(f"{base[5:]}/emb/manifest.json"))["shards"]] == \
        [s["sha256"] for s in emb["shards"]]
    refused = cli("embed", tmp_path / "local", "--encoder", "minilm-l6", "--out", f"{base}/emb2",
                  "--num-slices", "2", "--slice", "0", env=env, check=False)
    assert refused.returncode == 2 and "a slice is written to a local" in refused.stderr

    cli("train", "--data", tmp_path / "emb", "--out", tmp_path / "run-local", *TRAIN, env=env)
    cli("train", "--data", f"{base}/emb", "--out", tmp_path / "run-s3", *TRAIN, "--cache-dir",
        tmp_path / "cache", env=env)
    assert losses(tmp_path / "run-s3") == losses(tmp_path / "run-local")
