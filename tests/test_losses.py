"""Balancing losses: transformers parity, masks, gradients, LoRAMoE, and that balancing balances."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.routers.losses import (
    gate_entropy, load_balancing_loss, localized_balancing_loss, switch_loss, z_loss,
)

from helpers import model_inputs, tiny_bert

B, S, E = 3, 5, 6


def _logits(layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B * S, E, generator=g) * 2 for _ in range(layers))


def _mask():
    m = torch.ones(B, S, dtype=torch.long)
    m[0, -2:] = 0
    m[2, -4:] = 0
    return m


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_equals_transformers(top_k, masked):
    logits = _logits()
    mask = _mask() if masked else None
    ours = load_balancing_loss(logits, top_k, mask)
    ref = load_balancing_loss_func(logits, E, top_k, mask)
    assert torch.allclose(ours, ref, atol=1e-6), (ours, ref)
    assert torch.allclose(switch_loss(logits, mask), load_balancing_loss_func(logits, E, 1, mask), atol=1e-6)


def test_selected_indices_match_recomputed_top_k_and_handle_padding():
    logits = _logits()
    chosen = [t.softmax(-1).topk(2, dim=-1).indices for t in logits]
    assert torch.allclose(load_balancing_loss(logits, 0, _mask(), selected=chosen), load_balancing_loss(logits, 2, _mask()))
    # -1 entries (top-p padding, dropped tokens) count for no expert
    drop = [torch.where(torch.arange(B * S).unsqueeze(1) % 2 == 0, c, -1) for c in chosen]
    half = load_balancing_loss(logits, 0, None, selected=drop)
    assert half < load_balancing_loss(logits, 2, None)


def test_uniform_routing_gives_k():
    # f_e = k / E and P_e = 1 / E for every e: L = E * E * (k / E) * (1 / E) = k
    flat = (torch.zeros(8, 4),)
    assert torch.allclose(load_balancing_loss(flat, 1), torch.tensor(1.0))
    assert torch.allclose(gate_entropy(flat), torch.tensor(math.log(4)))
    # z-loss: logsumexp(0, 0, 0, 0) = ln 4
    assert torch.allclose(z_loss(flat), torch.tensor(math.log(4) ** 2))


def test_gradients_reach_the_router():
    w = torch.randn(8, E, requires_grad=True)
    x = torch.randn(B * S, 8)
    total = load_balancing_loss((x @ w,), 2, _mask()) + z_loss(x @ w) + gate_entropy(x @ w)
    total = total + localized_balancing_loss(x @ w, torch.tensor([0, 1, 0]), [0, 0, 0, 1, 1, 1])
    total.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_masked_losses_ignore_padding_values():
    logits, mask = _logits(1)[0], _mask()
    garbage = logits.clone()
    garbage[mask.reshape(-1) == 0] = 1e3  # padding positions carry nonsense
    for fn in (z_loss, gate_entropy, switch_loss):
        assert torch.allclose(fn(logits, mask), fn(garbage, mask))
    ex, types = torch.tensor([0, 1, 1]), [0, 0, 0, 1, 1, 1]
    assert torch.allclose(localized_balancing_loss(logits, ex, types, 0.2, mask),
                          localized_balancing_loss(garbage, ex, types, 0.2, mask))


def test_localized_balancing_hand_computed():
    # One token per example, 2 examples, 2 experts with types (0, 1); logits 0 -> p = (1/2, 1/2).
    # Example 0 is of type 0: Q = (1 + a, 1 - a); example 1 of type 1: Q = (1 - a, 1 + a); a = 0.5.
    # I * Q = [[0.75, 0.25], [0.25, 0.75]]: mean 0.5, unbiased var = 4 * 0.0625 / 3 = 1/12
    # L = (1/12) / 0.25 = 1/3
    loss = localized_balancing_loss(torch.zeros(2, 2), torch.tensor([0, 1]), [0, 1], alpha=0.5, eps=0.0)
    assert torch.allclose(loss, torch.tensor(1 / 3))
    # with a = 0 and balanced importance the constraint is 0
    assert localized_balancing_loss(torch.zeros(2, 2), torch.tensor([0, 1]), [0, 1], alpha=0.0) == 0
    with pytest.raises(ValueError, match="expert_types"):
        localized_balancing_loss(torch.zeros(2, 2), torch.tensor([0, 1]), [0, 1, 1])


def test_model_aux_loss_combines_configured_losses():
    cfg = MoLoRAConfig(target_modules=["query", "value"], num_experts=4, router="topk", top_k=2,
                       aux_loss_coef=0.01, z_loss_coef=0.001, entropy_loss_coef=0.01,
                       localized_loss_coef=0.1, expert_types=[0, 0, 1, 1])
    model = get_molora_model(tiny_bert(), cfg)
    inputs = model_inputs("bert")
    with model.routing(task_ids=[0, 1, 1]):
        model(**inputs)
    layers = list(model.routed_layers().values())
    logits = tuple(r.decision.logits for r in model.last_routing().values())
    mask = inputs["attention_mask"]
    expected = (0.01 * load_balancing_loss(logits, 2, mask) + 0.001 * z_loss(logits, mask)
                + 0.01 * gate_entropy(logits, mask)
                + 0.1 * localized_balancing_loss(logits, torch.tensor([0, 1, 1]), [0, 0, 1, 1], 0.1, mask))
    aux = model.aux_loss()
    assert torch.allclose(aux, expected, atol=1e-6)
    aux.backward()
    assert all(layer.router.proj.weight.grad is not None for layer in layers)
    # the localized constraint needs example types
    model(**inputs)
    with pytest.raises(molora.errors.RoutingError, match="task_ids"):
        model.aux_loss()


def test_config_validates_loss_fields():
    with pytest.raises(ValueError, match="expert_types"):
        MoLoRAConfig(target_modules=["q"], num_experts=2, localized_loss_coef=0.1)
    with pytest.raises(ValueError, match="localized_alpha"):
        MoLoRAConfig(target_modules=["q"], localized_alpha=1.5)
    with pytest.raises(ValueError, match="entropy_loss_coef"):
        MoLoRAConfig(target_modules=["q"], entropy_loss_coef=-1)


def test_balancing_loss_balances_the_load():
    """Top-2 router, E = 8, deliberately skewed inputs (benchmarks/balance.py): the aux loss must
    cut the coefficient of variation of the expert load by a clear margin."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "balance.py"
    spec = importlib.util.spec_from_file_location("molora_balance_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plain, balanced = bench.train(0.0), bench.train(0.1)
    print(f"load CV: without aux {plain['load_cv']:.3f}, with aux {balanced['load_cv']:.3f}")
    assert plain["load_cv"] > 1.0  # collapsed onto a few experts
    assert balanced["load_cv"] < 0.5 * plain["load_cv"] and balanced["load_cv"] < 0.4
