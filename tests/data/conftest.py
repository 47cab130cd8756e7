"""Preprocessed folders of real sample data, built once per test session, and their reference rows.

The folders mix every modality the loader must handle: images + captions (`digits`), audio +
transcripts (`spoken-digits`), Gato trajectories with discrete and mu-law actions and float rewards
(`cartpole`, `pendulum`), long documents (`pydocs`), the mixed `jsonl` sample manifest, and one
trajectory with a text prompt before its timesteps (`prompted`, a one-line jsonl written here,
since the sample manifest has none).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmtool.data import shards as store
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import Sample, rows_to_samples

from mmtool.data.sources.base import SAMPLE_DATA

# The sample manifest's images are RGB and the digits gray: both are patched as 3 channels so that
# their patch vectors have one size and the folders mix.
RGB = ["image=patches:channels=3"]

FOLDERS = {
    "digits": dict(source="digits", max_samples=300, tokenizers=RGB),
    "spoken-digits": dict(source="spoken-digits"),
    "cartpole": dict(source="cartpole", options=["episodes=30"]),
    "pendulum": dict(source="pendulum", options=["episodes=10", "max_steps=50"]),
    "pydocs": dict(source="pydocs", max_samples=300),
    "jsonl": dict(source="jsonl", options=[f"path={SAMPLE_DATA / 'jsonl' / 'records.jsonl'}"],
                  tokenizers=RGB),
    "prompted": dict(source="jsonl"),  # path filled in below
}

PROMPTED = {"id": "prompted-cartpole", "task": "control/cartpole", "text": "balance the pole",
            "observations": [[-0.02, -0.02, 0.03, -0.04], [-0.02, 0.17, 0.03, -0.32],
                             [-0.02, -0.02, 0.02, -0.02]],
            "actions": [1, 0, 1], "rewards": [1.0, 0.5, 0.25], "num_actions": 2}


@dataclass
class Data:
    """The session's folders: `dirs[name]`, all names in mixing order, and reference samples."""

    root: Path
    dirs: dict[str, Path]

    @property
    def all(self) -> list[str]:
        return [str(p) for p in self.dirs.values()]

    def paths(self, *names: str) -> list[str]:
        return [str(self.dirs[n]) for n in names]

    def samples(self, *names: str) -> list[Sample]:
        """Reference samples of folders, in TokenIndex's global order (folder, shard, row)."""
        out: list[Sample] = []
        for name in names or self.dirs:
            out.extend(_samples_of(self.dirs[name]))
        return out

    def options(self, name: str) -> list[str]:
        """The `--opt` values a folder was preprocessed with."""
        return list(FOLDERS[name].get("options", []))

    def copy(self, name: str, dest: Path) -> Path:
        """A private copy of a folder, to corrupt."""
        return Path(shutil.copytree(self.dirs[name], dest / name))


_CACHE: dict[Path, list[Sample]] = {}


def _samples_of(folder: Path) -> list[Sample]:
    if folder not in _CACHE:
        manifest = store.load_manifest(folder)
        rows: list[Sample] = []
        for shard in manifest["shards"]:
            rows.extend(rows_to_samples(store.read_shard(folder / shard["path"])))
        _CACHE[folder] = rows
    return _CACHE[folder]


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("preprocessed")
    prompt = root / "prompted.jsonl"
    prompt.write_text(json.dumps(PROMPTED) + "\n")
    dirs = {}
    for name, kw in FOLDERS.items():
        kw = dict(kw)
        if name == "prompted":
            kw["options"] = [f"path={prompt}"]
        manifest = preprocess(PreprocessConfig(out=root / name, **kw))
        assert manifest["rejected"] == 0, name
        dirs[name] = root / name
    return Data(root, dirs)
