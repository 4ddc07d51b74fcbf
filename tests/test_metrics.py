"""Continual-learning metrics against hand-computed matrices."""

from __future__ import annotations

import json
import math

import pytest
import torch

from molora.continual.metrics import as_matrix, plot_matrix, summarize, to_json

# Rows: after training task i; columns: evaluated task j.
R3 = [
    [0.90, 0.10, 0.20],
    [0.95, 0.80, 0.30],  # task 0 improved after task 1 (max != diagonal): forgetting differs from -BWT
    [0.50, 0.70, 0.95],
]
B3 = [0.10, 0.20, 0.25]


def test_hand_computed_3x3():
    s = summarize(R3, untrained=B3)
    # ACC = (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3 = 0.716666...
    assert s["acc"] == pytest.approx(2.15 / 3)
    # BWT = ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = (-0.40 - 0.10) / 2 = -0.25
    assert s["bwt"] == pytest.approx(-0.25)
    # FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.10 - 0.20) + (0.30 - 0.25)) / 2 = -0.025
    assert s["fwt"] == pytest.approx(-0.025)
    # forgetting: task 0: max(0.90, 0.95) - 0.50 = 0.45; task 1: max(0.10, 0.80) - 0.70 = 0.10
    # mean = 0.275 (not 0.25 = -BWT, because task 0 peaked after task 1, not on its diagonal)
    assert s["forgetting"] == pytest.approx(0.275)


def test_no_untrained_means_no_fwt_and_tensor_input():
    s = summarize(torch.tensor(R3))
    assert s["fwt"] is None
    assert s["acc"] == pytest.approx(2.15 / 3, abs=1e-6)  # float32 tensor round-off
    assert s["bwt"] == pytest.approx(-0.25, abs=1e-6)


def test_2x2_perfect_retention():
    # No forgetting: last row equals diagonal. ACC = (1.0 + 0.8)/2 = 0.9; BWT = 1.0 - 1.0 = 0;
    # FWT = R[0,1] - b1 = 0.5 - 0.5 = 0; forgetting = max(1.0) - 1.0 = 0.
    s = summarize([[1.0, 0.5], [1.0, 0.8]], untrained=[0.3, 0.5])
    assert s == pytest.approx({"acc": 0.9, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0})


def test_single_task_metrics_are_undefined():
    s = summarize([[0.7]], untrained=[0.2])
    assert s["acc"] == pytest.approx(0.7)
    assert s["bwt"] is None and s["fwt"] is None and s["forgetting"] is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[0.1, 0.2]], r"square.*1 rows"),
        ([[0.1, 0.2], [0.3]], r"square"),
        ([[0.1, float("nan")], [0.3, 0.4]], r"2x2.*non-finite"),
        ([], r"non-empty"),
        ([0.1, 0.2], r"2-D"),
    ],
)
def test_validation_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        summarize(bad)


def test_untrained_length_checked():
    with pytest.raises(ValueError, match="length T=3"):
        summarize(R3, untrained=[0.1, 0.2])


def test_to_json_roundtrip(tmp_path):
    s = summarize(R3, untrained=B3)
    p = to_json(s, R3, tmp_path / "sub" / "cl.json", task_names=["a", "b", "c"], untrained=B3, extra={"method": "x"})
    rec = json.loads(p.read_text())
    assert rec["matrix"] == as_matrix(R3)
    assert rec["task_names"] == ["a", "b", "c"] and rec["method"] == "x"
    assert math.isclose(rec["summary"]["forgetting"], 0.275)


def test_plot_matrix_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (optional: molora[demo])")
    p = plot_matrix(R3, ["a", "b", "c"], tmp_path / "m.png", title="t")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
