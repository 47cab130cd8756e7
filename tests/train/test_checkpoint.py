"""Checkpoints: exact round trip through safetensors + JSON, pruning, corruption detection."""

from __future__ import annotations

import pytest
import torch

from mmtool.train import checkpoint
from mmtool.errors import MMToolError


def tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = tiny()
    path = checkpoint.save(tmp_path, 7, model, opt, {"loader": [{"epoch": 1}]})
    assert path.name == "step-00000007"
    state, opt_state, doc = checkpoint.load(path)
    assert doc["step"] == 7 and doc["loader"] == [{"epoch": 1}]
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    model2, opt2 = tiny()
    opt2.load_state_dict(opt_state)
    for (a, b) in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"])
    assert opt2.param_groups[0]["lr"] == 0.1


def test_keep_last_prunes_oldest(tmp_path):
    model, opt = tiny()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, opt, {}, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_corruption_is_detected(tmp_path):
    model, opt = tiny()
    path = checkpoint.save(tmp_path, 1, model, opt, {})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(MMToolError, match="model.safetensors is missing or corrupt"):
        checkpoint.load(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(MMToolError, match="state.json"):
        checkpoint.load(path)


def _edit_state(path, **changes):
    """Rewrites state.json with `changes` (None deletes a key), leaving the digest as it was."""
    import json

    doc = json.loads((path / "state.json").read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (path / "state.json").write_text(json.dumps(doc))
    return doc


@pytest.mark.parametrize("changes, message", [
    ({"sha256": None}, "has no 'sha256'.*integrity is mandatory"),
    ({"digest": None}, "has no 'digest'.*integrity is mandatory"),
    ({"step": 8}, "modified after it was written"),
    ({"loader": [{"epoch": 1, "batch": 999}]}, "modified after it was written"),
    ({"optimizer": []}, "'optimizer' is list, expected dict"),
])
def test_integrity_is_mandatory(tmp_path, changes, message):
    model, opt = tiny()
    path = checkpoint.save(tmp_path, 7, model, opt, {"loader": [{"epoch": 1, "batch": 3}]})
    doc = _edit_state(path, **changes)
    with pytest.raises(MMToolError, match=message):
        checkpoint.load(path)
    if "sha256" not in doc:  # and a flipped byte that nothing could then catch is never loaded
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (path / "model.safetensors").write_bytes(bytes(data))
        with pytest.raises(MMToolError, match="integrity is mandatory"):
            checkpoint.load(path)


def test_step_must_match_its_folder(tmp_path):
    model, opt = tiny()
    path = checkpoint.save(tmp_path, 7, model, opt, {})
    moved = path.with_name("step-00000009")
    path.rename(moved)  # state.json is intact (digest holds) but names another step
    with pytest.raises(MMToolError, match="says step 7, its folder step 9"):
        checkpoint.load(moved)
