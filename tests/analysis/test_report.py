"""`report.modality_shares`: each modality's late share of the loss and trunk gradient, with intervals."""

from __future__ import annotations

import pytest

from mmtool.cli.report import share_cell
from mmtool.analysis.report import modality_shares


def lines():
    """8 steps; the last quarter (steps 7, 8): audio 0.8 then absent (0), text 0.2 then 1.0.
    grad_share on steps 1, 4, 8 only: its last quarter is step 8 alone."""
    out = [{"step": s, "loss_share": {"audio": 0.5, "text": 0.5}} for s in range(1, 7)]
    out += [{"step": 7, "loss_share": {"audio": 0.8, "text": 0.2}}, {"step": 8, "loss_share": {"text": 1.0}}]
    for x, g in zip((out[0], out[3], out[7]), (0.9, 0.6, 0.3)):
        x["grad_share"] = {"audio": g, "text": 1 - g}
    return out


def test_last_quarter_means_count_absent_as_zero_with_bootstrap_intervals():
    res = modality_shares(lines())
    assert (res["steps"], res["grad_steps"]) == (2, 1)
    audio, text = res["modalities"]["audio"], res["modalities"]["text"]
    assert audio["loss"] == pytest.approx(0.4) and text["loss"] == pytest.approx(0.6)
    # Two steps resampled: the bootstrap means are 0, 0.4 or 0.8 (audio): the interval spans them.
    assert audio["loss_ci95"] == pytest.approx([0.0, 0.8]) and text["loss_ci95"] == pytest.approx([0.2, 1.0])
    assert audio["grad"] == pytest.approx(0.3) and audio["grad_ci95"] == pytest.approx([0.3, 0.3])
    assert text["grad"] == pytest.approx(0.7)
    assert share_cell(res).splitlines() == ["audio 0.40 [0.00, 0.80] / 0.30 [0.30, 0.30]",
                                            "text 0.60 [0.20, 1.00] / 0.70 [0.70, 0.70]"]


def test_runs_without_shares():
    assert modality_shares([{"step": 1, "loss": 2.0}]) is None and share_cell(None) == "–"
    res = modality_shares([{"step": 1, "loss_share": {"text": 1.0}}])
    assert res["modalities"]["text"] == {"loss": 1.0, "loss_ci95": [1.0, 1.0], "grad": None, "grad_ci95": None}
