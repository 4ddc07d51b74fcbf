"""The routed layer and model: forward math, dtypes, merging, disabling, freezing, injection."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import MoLoRAError

from helpers import model_inputs, tiny_bert


def _randomize_experts(model: molora.MoLoRAModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _loop_reference(layer: molora.RoutedLoRALinear, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """float64 per-expert loop: W x + b + sum_e g_e s_e B_e A_e x."""
    bank = layer.bank
    base = layer.base_layer
    W = base.weight.double().T if layer.transposed else base.weight.double()
    y = x.double() @ W.T + base.bias.double()
    for e in range(bank.num_experts):
        A = (bank.A_shared if bank.shared_a else bank.A[e]).double()
        y = y + gates[..., e : e + 1].double() * float(bank.scaling[e]) * (x.double() @ A.T @ bank.B[e].double().T)
    return y


@pytest.mark.parametrize("shared_a", [False, True])
@pytest.mark.parametrize("router", ["soft", "topk"])
def test_layer_matches_float64_loop(shared_a, router):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12))
    cfg = MoLoRAConfig(target_modules=["lin"], num_experts=5, rank=3, alpha=6, shared_a=shared_a, router=router,
                       top_k=2 if router == "topk" else None)
    model = get_molora_model(base, cfg)
    _randomize_experts(model)
    layer = model.routed_layers()["lin"]
    x = torch.randn(2, 3, 4, 16)  # any leading dims
    with torch.no_grad():
        decision = layer.router(x, molora.RoutingSignals())
        gates = decision.gates
        if decision.indices is not None:
            gates = torch.zeros(gates.shape[0], 5).scatter(1, decision.indices, decision.gates)
        out = model(x)
    ref = _loop_reference(layer, x, gates.reshape(2, 3, 4, 5))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_conv1d_layer_matches_loop(gpt2):
    model = get_molora_model(gpt2, MoLoRAConfig(target_modules=["c_attn"], num_experts=3, rank=2))
    _randomize_experts(model)
    layer = model.routed_layers()["transformer.h.0.attn.c_attn"]
    assert layer.transposed
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        gates = layer.router(x, molora.RoutingSignals()).gates.reshape(2, 5, 3)
        torch.testing.assert_close(layer(x).double(), _loop_reference(layer, x, gates), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base(dtype, bert):
    inputs = model_inputs("bert")
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query", "value"], num_experts=3))
    _randomize_experts(model)
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    half = copy.deepcopy(model)
    half.base_model.to(dtype)
    for layer in half.routed_layers().values():  # experts stay float32 (adapter_dtype)
        layer.bank.float()
        if layer.router is not None:
            layer.router.float()
    with torch.no_grad():
        out = half(**inputs).last_hidden_state
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.05)


def test_disable_adapters_is_bit_exact(bert):
    inputs = model_inputs("bert")
    with torch.no_grad():
        ref = bert(**inputs).last_hidden_state.clone()
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query", "value", "dense"], num_experts=2))
    _randomize_experts(model)
    with torch.no_grad():
        routed = model(**inputs).last_hidden_state
        with model.disable_adapters():
            off = model(**inputs).last_hidden_state
        again = model(**inputs).last_hidden_state
    assert torch.equal(off, ref)
    assert not torch.allclose(routed, ref, atol=1e-4)
    assert torch.equal(again, routed)


def test_merge_equals_static_mixture_and_unmerge_restores(bert):
    inputs = model_inputs("bert")
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query", "value"], num_experts=3, router="task"))
    _randomize_experts(model)
    weights = {"expert_0": 0.5, "expert_2": -1.0}
    before = {n: layer.base_layer.weight.clone() for n, layer in model.routed_layers().items()}
    # Reference: base + the weighted deltas, computed as a float64 sum outside molora.
    ref_model = copy.deepcopy(bert)
    with torch.no_grad():
        for name, layer in model.routed_layers().items():
            W = ref_model.get_submodule(name).weight
            delta = sum(w * float(layer.bank.scaling[e]) * (layer.bank.B[e].double() @ layer.bank.A[e].double())
                        for e, w in ((0, 0.5), (2, -1.0)))
            W.copy_(W.double() + delta)
        ref = ref_model(**inputs).last_hidden_state
    model.merge(weights)
    with torch.no_grad():
        merged = model(**inputs).last_hidden_state  # no routing signal needed while merged
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(MoLoRAError, match="unmerge"):
        with model.disable_adapters():
            pass
    model.unmerge()
    for n, layer in model.routed_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, before[n], atol=1e-6, rtol=0)


def test_optimizer_step_changes_only_experts_and_router(bert):
    inputs = model_inputs("bert")
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query", "value"], num_experts=4, router="topk", top_k=2))
    base_names = {n for n, _ in model.named_parameters() if ".bank." not in n and ".router." not in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in base_names)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        loss = model(**inputs).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training must change something"
    assert changed.isdisjoint(base_names)
    assert any(".router." in n for n in changed) and any(".bank.B." in n for n in changed)


def test_frozen_expert_never_moves_even_with_weight_decay(bert):
    inputs = model_inputs("bert")
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query"], num_experts=3, expert_names=["a", "b", "c"]))
    _randomize_experts(model)
    model.set_experts_trainable(False, ["b"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".A.1", ".B.1"))}
    assert frozen
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.5)
    model(**inputs).last_hidden_state.sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_injection_targets_and_trainable_count(bert, capsys):
    model = get_molora_model(bert, MoLoRAConfig(target_modules=r".*\.attention\.self\.(query|key)", num_experts=2, rank=4))
    assert sorted(model.routed_layers()) == sorted(
        f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "key")
    )
    # per layer: 2 experts x (4x32 + 32x4) + router 2x32
    assert sum(p.numel() for p in model.trainable_parameters()) == 4 * (2 * (4 * 32 + 32 * 4) + 2 * 32)
    model.print_trainable_parameters()
    assert "trainable params: 2,304" in capsys.readouterr().out


def test_aux_loss_is_zero_without_coefficients_and_reaches_router(bert):
    inputs = model_inputs("bert")
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query"], num_experts=4, router="topk", top_k=2))
    model(**inputs)
    assert model.aux_loss().item() == 0.0
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query"], num_experts=4, router="topk", top_k=2,
                                                               aux_loss_coef=0.01, z_loss_coef=0.001))
    model(**inputs)
    loss = model.aux_loss()
    assert loss.item() > 0
    loss.backward()
    router = model.routed_layers()["encoder.layer.0.attention.self.query"].router
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0


def test_generate_passes_through_with_task_routing(gpt2):
    model = get_molora_model(gpt2, MoLoRAConfig(target_modules=["c_attn"], num_experts=2, router="task"))
    _randomize_experts(model)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad(), model.routing(task_ids=[0, 1]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 6)


@pytest.mark.parametrize("router", ["soft", "task"])
def test_add_expert_grows_every_layer_and_keeps_outputs(bert, tmp_path, router):
    inputs = model_inputs("bert")
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query", "value"], num_experts=2, router=router))
    _randomize_experts(model)
    old_params = {n: p for n, p in model.named_parameters() if ".bank." in n}
    with torch.no_grad(), model.routing(task_ids=[0, 1, 0]):
        before = model(**inputs).last_hidden_state
    assert model.add_expert("new") == 2
    assert model.expert_names == ["expert_0", "expert_1", "new"]
    for layer in model.routed_layers().values():
        assert layer.bank.num_experts == 3 and layer.expert_ids == [0, 1, 2]
    # Existing experts are the same tensors (optimizers keep them); the new B is zero.
    assert all(dict(model.named_parameters())[n] is p for n, p in old_params.items())
    with torch.no_grad(), model.routing(task_ids=[0, 1, 0]):
        after = model(**inputs).last_hidden_state
    if router == "task":  # the old tasks still go to their experts: outputs unchanged
        torch.testing.assert_close(after, before)
        with torch.no_grad(), model.routing(task_ids=["new", "new", "expert_0"]):
            model(**inputs).last_hidden_state.sum()
    model.save_pretrained(tmp_path / "c")
    loaded = molora.MoLoRAModel.from_pretrained(tiny_bert(), tmp_path / "c")
    assert loaded.expert_names == model.expert_names
    with pytest.raises(MoLoRAError, match="exists already"):
        model.add_expert("new")


def test_static_router_sums_experts_like_one_concatenated_lora(bert):
    """All-ones static gates = one LoRA whose A/B are the experts' concatenated (O-LoRA inference)."""
    inputs = model_inputs("bert")
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query"], num_experts=3, rank=2, router="static"))
    _randomize_experts(model)
    ref = copy.deepcopy(bert)
    with torch.no_grad():
        for name, layer in model.routed_layers().items():
            s = float(layer.bank.scaling[0])
            A = torch.cat(list(layer.bank.A)).double()
            B = torch.cat(list(layer.bank.B), dim=1).double()
            W = ref.get_submodule(name).weight
            W.copy_(W.double() + s * B @ A)
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref(**inputs).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_set_router_swaps_to_a_shared_router(bert, tmp_path):
    from molora.routers import build_router

    inputs = model_inputs("bert")
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query"], num_experts=2, router="task"))
    _randomize_experts(model)
    with torch.no_grad(), model.routing(task_ids=[1, 1, 1]):
        expert1 = model(**inputs).last_hidden_state
    model.set_router(build_router("static", num_experts=2, d_in=32, weights=[0.0, 1.0]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expert1)
    model.save_pretrained(tmp_path / "c")
    loaded = molora.MoLoRAModel.from_pretrained(tiny_bert(), tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, expert1)
    with pytest.raises(MoLoRAError, match="3 experts"):
        model.set_router(build_router("static", num_experts=3, d_in=32))
