"""Routing statistics: hand-computed shares, CV and dropped tokens; the heatmap helper."""

from __future__ import annotations

import math

import pytest
import torch

from molora import MoLoRAConfig, get_molora_model
from molora.routers import RoutingDecision
from molora.stats import decision_stats, plot_routing_heatmap, routing_stats

from helpers import model_inputs, tiny_bert


def test_decision_stats_hand_computed():
    # 4 tokens, top-1 over 3 experts: experts (0, 0, 1, -1 dropped), gates (0.5, 1.0, 1.0, 0), token 2 is padding.
    d = RoutingDecision(gates=torch.tensor([[0.5], [1.0], [1.0], [0.0]]), indices=torch.tensor([[0], [0], [1], [-1]]),
                        dropped=1)
    s = decision_stats(d, torch.tensor([[1, 1, 0, 1]]), 3)
    # real tokens 0, 1, 3: counts (2, 0, 0) -> fraction (2/3, 0, 0); mass (1.5, 0, 0) -> share (1, 0, 0)
    assert s["tokens"] == 3 and s["token_fraction"] == pytest.approx([2 / 3, 0, 0])
    assert s["gate_share"] == pytest.approx([1.0, 0.0, 0.0])
    # counts (2, 0, 0): mean 2/3, population std sqrt(((4/3)^2 + 2 (2/3)^2) / 3) = 0.9428 -> CV sqrt(2)
    assert s["load_cv"] == pytest.approx(math.sqrt(2)) and s["dropped_tokens"] == 1
    # dense gates: every expert with a non-zero gate is chosen
    s = decision_stats(RoutingDecision(gates=torch.tensor([[0.25, 0.75], [0.25, 0.75]])), None, 2)
    assert s["token_fraction"] == [1.0, 1.0] and s["gate_share"] == pytest.approx([0.25, 0.75]) and s["load_cv"] == 0


def test_model_routing_stats(tmp_path):
    model = get_molora_model(tiny_bert(), MoLoRAConfig(target_modules=["query", "value"], num_experts=4, router="switch",
                                                       router_kwargs={"capacity_factor": 0.5}))
    assert routing_stats(model)["layers"] == {}
    inputs = model_inputs("bert")
    with torch.no_grad():
        model(**inputs)
    stats = model.routing_stats()
    assert set(stats["layers"]) == set(model.routed_layers()) and stats["experts"] == model.expert_names
    real = int(inputs["attention_mask"].sum())  # 19 of 21 positions
    for s in stats["layers"].values():
        assert s["tokens"] == real and sum(s["gate_share"]) == pytest.approx(1.0)
        # capacity ceil(0.5 * 19 / 4) = 3 per expert: at most 12 of 19 tokens run, >= 7 dropped
        assert s["dropped_tokens"] >= real - 12
        assert sum(s["token_fraction"]) == pytest.approx((real - s["dropped_tokens"]) / real)
    assert stats["dropped_tokens"] == sum(s["dropped_tokens"] for s in stats["layers"].values())


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = get_molora_model(tiny_bert(), MoLoRAConfig(target_modules=["query"], num_experts=3, router="topk", top_k=2))
    with torch.no_grad():
        model(**model_inputs("bert"))
    path = plot_routing_heatmap(model.routing_stats(), tmp_path / "routing.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
