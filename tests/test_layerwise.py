"""Layer-wise settings (MoLA): expert count, top-k and rank may differ between layers."""

from __future__ import annotations

import pytest
import torch

import molora
from molora import MoLoRAConfig, get_molora_model

from helpers import model_inputs, tiny_bert

# MoLA's "triangle": fewer experts in the lower layer, more in the upper one.
OVERRIDES = {r"layer\.0\..*": {"num_experts": 2, "top_k": 1, "rank": 2}}


def _mola_model() -> molora.MoLoRAModel:
    cfg = MoLoRAConfig(target_modules=["query", "value"], num_experts=4, rank=4, alpha=8, router="topk", top_k=2,
                       aux_loss_coef=0.01, layer_overrides=OVERRIDES)
    model = get_molora_model(tiny_bert(), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_layers_get_their_own_experts_top_k_and_rank():
    model = _mola_model()
    layers = model.routed_layers()
    lower = layers["encoder.layer.0.attention.self.query"]
    upper = layers["encoder.layer.1.attention.self.value"]
    assert (lower.bank.num_experts, lower.router.top_k, lower.bank.ranks) == (2, 1, [2, 2])
    assert (upper.bank.num_experts, upper.router.top_k, upper.bank.ranks) == (4, 2, [4] * 4)
    assert lower.expert_ids == [0, 1] and upper.expert_ids == [0, 1, 2, 3]
    # The router really picks one expert in the lower layer and two in the upper one.
    model(**model_inputs("bert"))
    decided = model.last_routing()
    assert decided["encoder.layer.0.attention.self.value"].decision.indices.shape[-1] == 1
    assert decided["encoder.layer.1.attention.self.value"].decision.indices.shape[-1] == 2
    # Balancing groups layers by expert count; the loss is finite and reaches both kinds of router.
    loss = model.aux_loss()
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert lower.router.proj.weight.grad.abs().sum() > 0 and upper.router.proj.weight.grad.abs().sum() > 0


def test_layerwise_checkpoint_round_trip(tmp_path):
    model = _mola_model().eval()
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    model.save_pretrained(tmp_path / "ckpt")
    restored = molora.MoLoRAModel.from_pretrained(tiny_bert(), tmp_path / "ckpt").eval()
    assert restored.molora_config.layer_overrides == OVERRIDES
    with torch.no_grad():
        assert torch.equal(restored(**inputs).last_hidden_state, expected)


def test_merge_with_fewer_experts_in_a_layer_uses_global_names():
    model = _mola_model().eval()
    inputs = model_inputs("bert")
    weights = {"expert_1": 0.5, "expert_3": 1.0}
    layer = model.routed_layers()["encoder.layer.0.attention.self.query"]
    W = layer.base_layer.weight.detach().clone()
    model.merge(weights)
    # The lower layer holds experts 0 and 1 only: its merged delta is 0.5 * s_1 B_1 A_1.
    bank = layer.bank
    expected = W + 0.5 * float(bank.scaling[1]) * (bank.B[1] @ bank.A[1]).detach()
    torch.testing.assert_close(layer.base_layer.weight, expected)
    model.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W)
    model(**inputs)  # routing works again after unmerge


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"layer.0": {"experts": 2}}, "unknown settings"),
        ({"layer.0": {"num_experts": 5}}, r"num_experts must be an int in \[1, num_experts=4\]"),
        ({"layer.0": {"num_experts": 2, "top_k": 3}}, r"top_k must be in \[1, 2\]"),
        ({"layer.0": {"rank": 0}}, "rank must be a positive int"),
        ({"(": {"rank": 2}}, "invalid regex"),
    ],
)
def test_bad_layer_overrides_name_the_pattern(overrides, match):
    with pytest.raises(ValueError, match=match):
        MoLoRAConfig(target_modules=["query"], num_experts=4, top_k=2, layer_overrides=overrides)
