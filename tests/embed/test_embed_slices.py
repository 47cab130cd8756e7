"""`mmtool embed` in slices: K slices merged are the bytes of one embed run, and merge refuses
embedding slices that do not belong together."""

from __future__ import annotations

import pytest

from mmtool.data.merge import merge
from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.embed import EmbedConfig, embed
from mmtool.errors import MMToolError

from tests.folder_state import snapshot


def test_embedding_slices_merge_to_the_bytes_of_one_run(tmp_path):
    preprocess(PreprocessConfig(source="digits", out=tmp_path / "digits", max_samples=64))
    cfg = dict(data=tmp_path / "digits", encoder="minilm-l6", part_rows=16)  # 4 parts
    one = embed(EmbedConfig(out=tmp_path / "one", **cfg))
    docs = [embed(EmbedConfig(out=tmp_path / f"s{i}", num_slices=3, slice=i, **cfg)) for i in range(3)]
    assert [d["part_range"] for d in docs] == [[0, 1], [1, 2], [2, 4]]
    assert [d["rows"] for d in docs] == [16, 16, 32]
    assert not (tmp_path / "s0" / "manifest.json").exists()

    with pytest.raises(MMToolError, match="slice 1 of 3 missing"):
        merge(tmp_path / "m", [tmp_path / "s0", tmp_path / "s2"])
    merged = merge(tmp_path / "merged", [tmp_path / f"s{i}" for i in range(3)])
    assert merged["shards"] == one["shards"]
    data = lambda d: {k: v for k, v in snapshot(d).items() if not k.startswith(".mmtool")}  # noqa: E731
    assert data(tmp_path / "merged") == data(tmp_path / "one")  # shards and manifest, byte for byte

    # A slice of another job (other pooling) is refused, naming its folder.
    other = embed(EmbedConfig(out=tmp_path / "tokens", num_slices=3, slice=1, pool="tokens", **cfg))
    assert other["part_range"] == [1, 2]
    with pytest.raises(MMToolError, match=f"^{tmp_path / 'tokens'}: slice 1 of 3 was made with other "
                                          "settings than"):
        merge(tmp_path / "m", [tmp_path / "s0", tmp_path / "tokens", tmp_path / "s2"])
