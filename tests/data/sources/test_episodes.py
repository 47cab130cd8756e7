"""`episodes`: LeRobot-style parquet step tables, D4RL-style and Minari-style HDF5, and jsonl npz keys."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmtool.data import shards as store
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import rows_to_samples
from mmtool.data.sources import build_source
from mmtool.errors import MMToolError, RecordError

h5py = pytest.importorskip("h5py")

LENGTHS = [4, 6, 3]  # steps per episode


def _obs(ep: int, t: int) -> list[float]:
    """Observation of step t of episode ep: encodes both, so order and boundaries are checkable."""
    return [ep * 100.0 + t, -float(t), 0.5]


def make_lerobot(folder, per_episode_files: bool = True):
    """LeRobot v2 layout: data/chunk-000/episode_00000N.parquet, rows shuffled within a file."""
    data = folder / "data" / "chunk-000"
    data.mkdir(parents=True)
    rows = []
    for ep, T in enumerate(LENGTHS):
        for t in range(T):
            rows.append({"episode_index": ep, "frame_index": t, "timestamp": t / 30,
                         "observation.state": _obs(ep, t), "action": [0.1 * t, -0.2 * ep],
                         "next.reward": float(ep + t), "index": len(rows)})
    rng = np.random.default_rng(0)
    if per_episode_files:
        for ep in range(len(LENGTHS)):
            part = [r for r in rows if r["episode_index"] == ep]
            part = [part[i] for i in rng.permutation(len(part))]  # step order comes from frame_index
            pq.write_table(pa.Table.from_pylist(part), data / f"episode_{ep:06d}.parquet")
    else:
        rows = [rows[i] for i in rng.permutation(len(rows))]
        pq.write_table(pa.Table.from_pylist(rows), data / "all.parquet")
    return folder / "data"


def _check_episode(rec, ep: int, T: int):
    obs, act, rew = rec.fields
    assert [f.role for f in rec.fields] == ["observation", "action", "reward"]
    assert obs.data.shape == (T, 3) and np.allclose(obs.data, [_obs(ep, t) for t in range(T)])
    assert act.data.shape[0] == T and rew.data.shape == (T,)


@pytest.mark.parametrize("per_file", [True, False])
def test_lerobot_parquet_groups_and_orders_steps(tmp_path, per_file):
    src = build_source("episodes", [f"path={make_lerobot(tmp_path, per_file)}"])
    assert [src.record_id(i) for i in range(len(src))] == ["0", "1", "2"] if per_file else \
        sorted(src.record_id(i) for i in range(len(src))) == ["0", "1", "2"]
    for i in range(len(src)):
        rec = src.read(i)
        ep = int(rec.id)
        _check_episode(rec, ep, LENGTHS[ep])
        assert np.allclose(rec.fields[2].data, [ep + t for t in range(LENGTHS[ep])])
        assert np.allclose(rec.fields[1].data[:, 0], [0.1 * t for t in range(LENGTHS[ep])], atol=1e-6)
    rows = {r.input: r.target for r in src.mapping()}
    assert rows == {"episode_index": "id", "frame_index": "order", "timestamp": "ignored", "index": "ignored",
                    "observation.state": "observation", "action": "action", "next.reward": "reward"}
    assert "frame_index → order: the episode's steps sorted by it" in src.describe_mapping()


def test_parquet_missing_column_lists_columns(tmp_path):
    folder = make_lerobot(tmp_path)
    with pytest.raises(MMToolError, match=r"no observations column 'obs' \(columns found: "
                                          r"episode_index, frame_index, timestamp, observation\.state"):
        build_source("episodes", [f"path={folder}", "keys=observations:obs"])


def make_d4rl(path, discrete: bool = False):
    """D4RL layout: flat arrays; episode 0 ends by terminal, 1 by timeout, 2 is unfinished."""
    obs = np.array([_obs(ep, t) for ep, T in enumerate(LENGTHS) for t in range(T)], np.float32)
    N = len(obs)
    ends = np.cumsum(LENGTHS) - 1
    terminals, timeouts = np.zeros(N, bool), np.zeros(N, bool)
    terminals[ends[0]], timeouts[ends[1]] = True, True
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["next_observations"] = obs + 1
        f["actions"] = np.arange(N) % 3 if discrete else np.random.default_rng(1).normal(size=(N, 2))
        f["rewards"] = np.arange(N, dtype=np.float32)
        f["terminals"], f["timeouts"] = terminals, timeouts
        f["infos/qpos"] = np.zeros((N, 2))
    return path


def test_d4rl_cuts_at_terminals_and_timeouts(tmp_path):
    src = build_source("episodes", [f"path={make_d4rl(tmp_path / 'hopper.hdf5', discrete=True)}"])
    assert len(src) == 3
    start = 0
    for ep, T in enumerate(LENGTHS):
        rec = src.read(ep)
        _check_episode(rec, ep, T)
        assert np.array_equal(rec.fields[1].data[:, 0], np.arange(start, start + T) % 3)
        assert np.allclose(rec.fields[2].data, np.arange(start, start + T))
        assert (rec.meta["start"], rec.meta["end"]) == (start, start + T)
        start += T
    assert [src.read(i).meta["ended"] for i in range(3)] == [True, True, False]
    assert [src.read(i).meta["terminated"] for i in range(3)] == [True, False, False]
    rows = {r.input: r.target for r in src.mapping()}
    assert rows["next_observations"] == rows["infos/qpos"] == "ignored"
    assert rows["terminals"] == rows["timeouts"] == "meta" and rows["observations"] == "observation"
    assert "timeouts → meta: ends an episode (meta.ended)" in src.describe_mapping()


def make_minari(path, n_obs_extra: int = 1):
    with h5py.File(path, "w") as f:
        for ep, T in enumerate(LENGTHS):
            g = f.create_group(f"episode_{ep}")
            g["observations"] = np.array([_obs(ep, t) for t in range(T + n_obs_extra)], np.float32)
            g["actions"] = np.arange(T) % 2
            g["rewards"] = np.ones(T)
            g["terminations"] = np.eye(T, dtype=bool)[-1] if ep == 0 else np.zeros(T, bool)
            g["truncations"] = np.zeros(T, bool)
    return path


def test_minari_t_plus_one_observations(tmp_path):
    path = make_minari(tmp_path / "main_data.hdf5")
    src = build_source("episodes", [f"path={path}"])
    for ep, T in enumerate(LENGTHS):
        rec = src.read(ep)
        _check_episode(rec, ep, T)  # the first T observations, aligned with the T actions
        assert rec.meta["dropped_last_observation"] is True and "final_observation" not in rec.meta
    assert src.read(0).meta["terminated"] and not src.read(1).meta["terminated"]
    keep = build_source("episodes", [f"path={path}", "drop_last_observation=false"])
    assert keep.read(1).meta["final_observation"] == _obs(1, LENGTHS[1])


def test_episodes_preprocess_content(tmp_path):
    out = tmp_path / "out"
    preprocess(PreprocessConfig(source="episodes", out=out,
                                options=[f"path={make_minari(tmp_path / 'm.hdf5')}"]))
    rows = {s.id: s for s in rows_to_samples(store.read_folder(out))}
    assert sorted(rows) == ["0", "1", "2"]
    for ep, T in enumerate(LENGTHS):
        obs, act, rew = rows[str(ep)].segments
        assert obs.shape[0] == act.shape[0] == rew.shape[0] == T
        assert act.ids.tolist() == (np.arange(T) % 2).tolist()


def test_cli_preprocess_d4rl_and_lerobot(tmp_path, cli):
    d4rl = make_d4rl(tmp_path / "d4rl.hdf5")
    cli("preprocess", "episodes", "--opt", f"path={d4rl}", "--out", tmp_path / "o1")
    lerobot = make_lerobot(tmp_path / "lr")
    cli("preprocess", "episodes", "--opt", f"path={lerobot}", "--out", tmp_path / "o2")
    for out in ("o1", "o2"):
        samples = sorted(rows_to_samples(store.read_folder(tmp_path / out)), key=lambda s: int(s.id))
        assert [s.segments[0].shape[0] for s in samples] == LENGTHS


# -- jsonl: .npz trajectories with other key names ---------------------------------------------
def test_jsonl_npz_keys(tmp_path):
    np.savez(tmp_path / "ep.npz", obs=np.ones((5, 2)), act=np.arange(5) % 2, rew=np.zeros(5))
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "e", "trajectory": "ep.npz"}) + "\n")
    plain = build_source("jsonl", [f"path={tmp_path / 'm.jsonl'}"])
    with pytest.raises(RecordError, match=r"none of the arrays observations, actions, rewards "
                                          r"\(keys found: act, obs, rew\); map them with --opt npz_keys="):
        plain.read(0)
    mapped = build_source("jsonl", [f"path={tmp_path / 'm.jsonl'}",
                                    "npz_keys=observations:obs,actions:act,rewards:rew"])
    rec = mapped.read(0)
    assert [f.role for f in rec.fields] == ["observation", "action", "reward"]
    assert rec.fields[0].data.shape == (5, 2) and rec.fields[1].data[:, 0].tolist() == [0, 1, 0, 1, 0]


def test_string_episodes_duplicate_steps_and_renamed_keys(tmp_path):
    table = pa.Table.from_pylist([
        {"ep": "run-b", "t": 1, "obs": [1.0], "act": 0}, {"ep": "run-a", "t": 0, "obs": [2.0], "act": 1},
        {"ep": "run-b", "t": 0, "obs": [3.0], "act": 1}, {"ep": "run-a", "t": 0, "obs": [4.0], "act": 0}])
    pq.write_table(table, tmp_path / "steps.parquet")
    src = build_source("episodes", [f"path={tmp_path / 'steps.parquet'}",
                                    "keys=episode:ep,step:t,observations:obs,actions:act"])
    assert [src.record_id(i) for i in range(2)] == ["run-b", "run-a"]
    rec = src.read(0)
    assert rec.fields[0].data[:, 0].tolist() == [3.0, 1.0] and rec.fields[1].data[:, 0].tolist() == [1, 0]
    assert len(rec.fields) == 2  # no reward column: no reward segment
    with pytest.raises(RecordError, match=r"steps\.parquet:episode run-a: step 0 occurs twice"):
        src.read(1)
    h5 = tmp_path / "d.hdf5"
    with h5py.File(h5, "w") as f:
        f["obs"], f["act"] = np.zeros((4, 2)), np.zeros(4, int)
    with pytest.raises(MMToolError, match=r"neither D4RL .* keys found: act, obs"):
        build_source("episodes", [f"path={h5}"])
    with pytest.raises(MMToolError, match=r"no actions key 'actions' \(keys found: act, obs\)"):
        build_source("episodes", [f"path={h5}", "format=d4rl", "keys=observations:obs"])
    ok = build_source("episodes", [f"path={h5}", "format=d4rl", "keys=observations:obs,actions:act"])
    assert len(ok) == 1 and ok.read(0).meta["ended"] is False and ok.read(0).meta["steps"] == 4
