"""Expert banks: inits, given weights, mixed ranks, growth, per-expert freezing, dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import molora
from molora import ExpertBank, MoLoRAConfig, get_molora_model
from molora.kernels import routed_lora_reference


def test_kaiming_init_matches_nn_linear_bound_and_b_starts_at_zero():
    torch.manual_seed(0)
    bank = ExpertBank(256, 32)
    bank.add_expert(64, 16)
    # kaiming_uniform(a = sqrt(5)) as nn.Linear and PEFT: U(-1/sqrt(d_in), 1/sqrt(d_in)).
    bound = 1 / math.sqrt(256)
    A = bank.A[0].detach()
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(bank.B[0]) == 0
    assert bank.scaling.tolist() == [16 / 64]


def test_gaussian_and_orthogonal_inits():
    torch.manual_seed(0)
    bank = ExpertBank(512, 8)
    bank.add_expert(16, 16, init="gaussian")
    bank.add_expert(16, 16, init="orthogonal")
    assert bank.A[0].std().item() == pytest.approx(1 / 16, rel=0.05)  # PEFT's "gaussian": N(0, 1/r)
    A = bank.A[1].detach().double()
    torch.testing.assert_close(A @ A.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="init must be one of"):
        bank.add_expert(4, 4, init="xavier")


def test_given_weights_are_copied_and_shapes_checked():
    bank = ExpertBank(6, 5)
    A, B = torch.randn(3, 6), torch.randn(5, 3)
    bank.add_expert(3, 6, A=A, B=B)
    A.zero_()  # the bank holds a copy
    assert bank.A[0].abs().sum() > 0
    with pytest.raises(ValueError, match=r"A must have shape \[3, 6\]; got \[3, 7\]"):
        bank.add_expert(3, 6, A=torch.randn(3, 7), B=B)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        bank.add_expert(0, 1.0)
    assert bank.num_experts == 1  # nothing half-added


def test_mixed_ranks_pad_exactly_and_rslora_scaling():
    torch.manual_seed(0)
    bank = ExpertBank(10, 7)
    bank.add_expert(2, 4, A=torch.randn(2, 10), B=torch.randn(7, 2))
    bank.add_expert(5, 4, A=torch.randn(5, 10), B=torch.randn(7, 5), use_rslora=True)
    A, B = bank.stacked()
    assert A.shape == (2, 5, 10) and B.shape == (2, 7, 5)
    assert torch.count_nonzero(A[0, 2:]) == 0 and torch.count_nonzero(B[0, :, 2:]) == 0
    assert bank.scaling.tolist() == pytest.approx([4 / 2, 4 / math.sqrt(5)])
    x, gates = torch.randn(9, 10, dtype=torch.float64), torch.rand(9, 2, dtype=torch.float64)
    expected = sum(gates[:, e : e + 1] * float(bank.scaling[e]) * (x @ bank.A[e].double().T @ bank.B[e].double().T) for e in range(2))
    got = routed_lora_reference(x, A.double(), B.double(), gates, scaling=bank.scaling.double())
    torch.testing.assert_close(got, expected)
    # delta_weight is the same mixture as a matrix.
    w = torch.tensor([0.3, -1.2])
    dense = sum(w[e] * float(bank.scaling[e]) * (bank.B[e] @ bank.A[e]) for e in range(2)).detach()
    torch.testing.assert_close(bank.delta_weight(w), dense)


def test_shared_a_bank_and_per_expert_freezing():
    bank = ExpertBank(8, 4, shared_a=True, shared_rank=3)
    for _ in range(3):
        bank.add_expert(99, 6)  # the rank follows the shared A
    assert bank.ranks == [3, 3, 3] and bank.stacked()[0].shape == (3, 8)
    bank.set_trainable(False, [1])
    assert [b.requires_grad for b in bank.B] == [True, False, True] and bank.A_shared.requires_grad
    bank.set_trainable(False)
    assert not any(p.requires_grad for p in bank.parameters())
    with pytest.raises(ValueError, match="shared-A bank takes per-expert B only"):
        bank.add_expert(3, 6, A=torch.zeros(3, 8))


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(12, 6))
    model = get_molora_model(base, MoLoRAConfig(target_modules=["lin"], num_experts=2, rank=3, dropout=0.5))
    layer = model.routed_layers()["lin"]
    with torch.no_grad():
        for b in layer.bank.B:
            b.normal_()
    x = torch.randn(4, 12)
    model.train()
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    A, B = layer.bank.stacked()
    gates = torch.full((4, 2), 0.5)  # a fresh soft router mixes uniformly
    expected = layer.base_layer(x) + routed_lora_reference(dropped, A, B, gates, scaling=layer.bank.scaling)
    torch.testing.assert_close(out, expected)
    model.eval()
    expected_eval = layer.base_layer(x) + routed_lora_reference(x, A, B, gates, scaling=layer.bank.scaling)
    torch.testing.assert_close(model(x), expected_eval)
    assert isinstance(layer, molora.RoutedLoRALinear)


def test_frozen_bank_restacks_only_when_its_weights_change():
    """The stacked copy of a frozen bank is reused until a factor is written, replaced or moved;
    a trainable bank's stack stays in the autograd graph."""
    torch.manual_seed(0)
    bank = ExpertBank(6, 5)
    for r in (2, 3):
        bank.add_expert(r, 4.0, B=torch.randn(5, r))
    bank.set_trainable(False)

    def reference():
        A = torch.stack([torch.nn.functional.pad(a.detach(), (0, 0, 0, 3 - a.shape[0])) for a in bank.A])
        B = torch.stack([torch.nn.functional.pad(b.detach(), (0, 3 - b.shape[1])) for b in bank.B])
        return A, B

    first = bank.stacked()
    assert bank.stacked()[0] is first[0]  # reused
    with torch.no_grad():
        bank.B[1][0, 0] = 7.0  # in place: the version moves
    again = bank.stacked()
    assert again[1] is not first[1] and again[1][1, 0, 0] == 7.0
    torch.testing.assert_close(again, reference(), rtol=0, atol=0)
    bank.double()  # .data swapped by Module.to
    assert bank.stacked()[1].dtype == torch.float64
    torch.testing.assert_close(bank.stacked(), reference(), rtol=0, atol=0)
    torch.nn.Sequential(bank).float()  # a conversion of an enclosing module reaches the bank too
    assert bank.stacked()[1].dtype == torch.float32
    torch.testing.assert_close(bank.stacked(), reference(), rtol=0, atol=0)
    bank.add_expert(3, 4.0, trainable=False)
    assert bank.stacked()[1].shape[0] == 3
    bank.set_trainable(True)
    A, B = bank.stacked()
    assert A.requires_grad and B.grad_fn is not None and bank.stacked()[1] is not B
    with torch.no_grad():  # evaluation of a trainable bank: no graph, so the copy is kept
        kept = bank.stacked()
        assert bank.stacked()[1] is kept[1] and kept[1].grad_fn is None
    assert bank.stacked()[1].grad_fn is not None  # grad mode again: a fresh stack in the graph
