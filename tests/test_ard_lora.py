"""ARD-LoRA experts (molora.kinds.ard_lora): per-rank gates against float64 references, the l1
penalty reaching exact zeros on a toy regression, the depth total variation by hand, pruning,
persistence, PEFT export and task routing through the one kernel call."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import MoLoRAError
from molora.kinds import ARDLoRABank, ard_penalty, effective_rank, project_ard, prune_ard
from molora.kinds.ard_lora import depth_group

from helpers import model_inputs, peft_output, tiny_bert

TARGETS = ["query", "value"]


def _lin_model(*, num_experts: int = 3, rank: int = 4, router: str = "soft", top_k: int | None = None,
               bias: bool = True) -> molora.MoLoRAModel:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12, bias=bias))
    cfg = MoLoRAConfig(target_modules=["lin"], num_experts=num_experts, rank=rank, alpha=2 * rank, router=router,
                       top_k=top_k, expert_kind="ard_lora")
    return get_molora_model(base, cfg)


class _Blocks(nn.Module):
    """Two blocks of a q and a v projection: two depth groups of two layers each."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.q, block.v = nn.Linear(8, 8), nn.Linear(8, 8)
            self.layers.append(block)

    def forward(self, x):
        for block in self.layers:
            x = block.v(block.q(x))
        return x


def _randomize(model: molora.MoLoRAModel, seed: int = 0, dead: float = 0.4) -> None:
    """Random A, B and router weights; gates uniform in [0.5, 1.5] with a share ``dead`` of
    them exactly 0 and one stored negative (the forward reads it as 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            for a in layer.bank.rank_alpha:
                a.copy_(0.5 + torch.rand(a.shape, generator=g))
                a.masked_fill_(torch.rand(a.shape, generator=g) < dead, 0.0)
            layer.bank.rank_alpha[0][0] = -0.25


def _reference(layer, x: torch.Tensor, gates: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
    """float64 ``W0 x + b + sum_e g_e s_e B_e diag(max(alpha_e, 0)) A_e x`` by a loop over experts
    (``keep``: per expert, the channels that count; the others are taken as 0)."""
    bank = layer.bank
    x = x.double()
    ref = x @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    for e in range(bank.num_experts):
        a = bank.rank_alpha[e].detach().double().clamp_min(0)
        if keep is not None:
            a = a * keep[e]
        delta = bank.B[e].detach().double() @ torch.diag(a) @ bank.A[e].detach().double()
        ref = ref + gates[..., e:e + 1].double() * float(bank.scaling[e]) * (x @ delta.T)
    return ref


def _dense(decision, E: int) -> torch.Tensor:
    if decision.indices is None:
        return decision.gates
    return torch.zeros(decision.gates.shape[0], E).scatter(1, decision.indices, decision.gates)


# ---------------------------------------------------------------------------------------------- the expert
def test_init_is_a_zero_delta_with_unit_gates():
    model = _lin_model()
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    assert isinstance(bank, ARDLoRABank) and bank.kind == "ard_lora" and bank.num_experts == 3
    assert all(torch.equal(a, torch.ones(4)) for a in bank.rank_alpha)
    assert all(torch.count_nonzero(b) == 0 for b in bank.B)
    x = torch.randn(5, 16)
    assert torch.count_nonzero(bank.delta_weight([1.0] * 3)) == 0
    with torch.no_grad():  # the base GEMM fused with the shrink may round the base output differently
        torch.testing.assert_close(model(x), layer.base_layer(x), atol=1e-6, rtol=1e-6)
    assert effective_rank(model) == {"lin": [4, 4, 4]}
    # trainable: A, B and r gates per expert, plus the router
    assert sum(p.numel() for p in bank.parameters() if p.requires_grad) == 3 * (4 * 16 + 12 * 4 + 4)


def test_config_and_bank_refusals_name_the_problem():
    with pytest.raises(MoLoRAError, match="'ard_lora'.*shared_a=True is not allowed"):
        MoLoRAConfig(target_modules=["q"], expert_kind="ard_lora", shared_a=True)
    bank = ARDLoRABank(8, 4)
    with pytest.raises(ValueError, match="rank_alpha must be finite and >= 0"):
        bank.add_expert(2, 4.0, rank_alpha=torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"rank_alpha must have shape \[2\]"):
        bank.add_expert(2, 4.0, rank_alpha=torch.ones(3))
    assert bank.num_experts == 0 and len(bank.A) == 0 and len(bank.rank_alpha) == 0
    model = _lin_model()
    for call in (lambda: prune_ard(model, -1.0), lambda: effective_rank(model, float("nan")),
                 lambda: ard_penalty(model, l1=-0.1)):
        with pytest.raises(MoLoRAError, match="must be a finite number >= 0"):
            call()
    plain = get_molora_model(nn.Sequential(nn.Linear(4, 4)), MoLoRAConfig(target_modules=["0"], num_experts=2, rank=2))
    with pytest.raises(MoLoRAError, match="ard_penalty: the model has no 'ard_lora' experts"):
        ard_penalty(plain, l1=1.0)


@pytest.mark.parametrize("router,top_k", [("soft", None), ("topk", 2)])
def test_routed_output_and_gate_gradients_match_float64_loop(router, top_k):
    model = _lin_model(router=router, top_k=top_k)
    _randomize(model)
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    x = torch.randn(2, 7, 16)
    g = _dense(layer.router(x, molora.RoutingSignals()), 3).detach().reshape(2, 7, 3)
    y = model(x)
    torch.testing.assert_close(y.double(), _reference(layer, x, g), atol=1e-5, rtol=1e-5)
    # gate gradients against float64 autograd leaves (the clamped stored negative gets none)
    y.square().sum().backward()
    alphas = [a.detach().double().requires_grad_() for a in bank.rank_alpha]
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    ref = x.double() @ W.T + b
    for e in range(3):
        delta = bank.B[e].double().detach() @ torch.diag(alphas[e].clamp_min(0)) @ bank.A[e].double().detach()
        ref = ref + g[..., e:e + 1].double() * float(bank.scaling[e]) * (x.double() @ delta.T)
    ref.square().sum().backward()
    for a, ref_a in zip(bank.rank_alpha, alphas):
        torch.testing.assert_close(a.grad.double(), ref_a.grad, atol=1e-4, rtol=1e-4)
    assert bank.rank_alpha[0].grad[0] == 0  # stored -0.25: a dead gate


def test_kernel_sees_the_gates_folded_into_A():
    model = _lin_model()
    _randomize(model)
    bank = model.routed_layers()["lin"].bank
    A, B = bank.stacked()
    for e in range(3):
        torch.testing.assert_close(A[e], bank.rank_alpha[e].detach().clamp_min(0)[:, None] * bank.A[e].detach(),
                                   atol=0, rtol=0)
        assert torch.equal(B[e], bank.B[e].detach())


# ---------------------------------------------------------------------------------------------- sparsity
def _toy_run(l1: float, steps: int = 400, lr: float = 0.1) -> tuple[molora.MoLoRAModel, float, float]:
    """One rank-8 expert fitting a rank-2 linear map by SGD on mse + ard_penalty(l1), projecting
    the gates after every step. Returns the model, the final mse and the target's mean square."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12, bias=False))
    with torch.no_grad():
        base.lin.weight.zero_()
    model = get_molora_model(base, MoLoRAConfig(target_modules=["lin"], num_experts=1, rank=8, alpha=8, router="soft",
                                                expert_kind="ard_lora"))
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 2, generator=g) @ torch.randn(2, 16, generator=g) / 4  # rank 2
    X = torch.randn(256, 16, generator=g)
    Y = X @ W.T
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        (loss + ard_penalty(model, l1=l1)).backward()
        opt.step()
        project_ard(model)
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(model(X), Y))
    return model, mse, float(Y.square().mean())


def test_l1_drives_the_unused_channels_to_exact_zero():
    model, mse, power = _toy_run(l1=0.1)
    gates = model.routed_layers()["lin"].bank.rank_alpha[0].detach()
    assert int((gates == 0).sum()) == 6 and (gates[gates != 0] > 0.1).all()  # exactly 0, not small
    assert effective_rank(model) == {"lin": [2]}
    assert mse < 0.02 * power  # the two live channels still fit the rank-2 target
    # control: without the penalty every channel stays live
    control, mse0, _ = _toy_run(l1=0.0)
    assert effective_rank(control) == {"lin": [8]} and mse0 < 1e-3 * power
    # and the sparse expert prunes to rank 2 with the same output
    x = torch.randn(9, 16)
    with torch.no_grad():
        before = model(x)
        assert prune_ard(model) == {"lin": [2]}
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def test_sgd_step_then_projection_is_the_proximal_step():
    """``alpha <- max(alpha - lr (grad_task + l1), 0)``: the prox of l1 |.| + [alpha >= 0]."""
    model = _lin_model(num_experts=1)
    _randomize(model, dead=0.0)
    bank = model.routed_layers()["lin"].bank
    with torch.no_grad():
        bank.rank_alpha[0].copy_(torch.tensor([0.0, 0.01, 0.8, 1.2]))
    x, target = torch.randn(32, 16), torch.randn(32, 12)
    nn.functional.mse_loss(model(x), target).backward()
    g_task = bank.rank_alpha[0].grad.clone()
    before = bank.rank_alpha[0].detach().clone()
    lr, l1 = 0.5, 0.3
    opt = torch.optim.SGD([bank.rank_alpha[0]], lr=lr)
    opt.zero_grad()
    (nn.functional.mse_loss(model(x), target) + ard_penalty(model, l1=l1)).backward()
    opt.step()
    project_ard(model)
    assert g_task[0] != 0  # a gate at exactly 0 still sees the task gradient: it may revive
    want = (before - lr * (g_task + l1)).clamp_min(0)
    torch.testing.assert_close(bank.rank_alpha[0].detach(), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- total variation
def _blocks_model(**overrides) -> molora.MoLoRAModel:
    torch.manual_seed(0)
    return get_molora_model(_Blocks(), MoLoRAConfig(target_modules=["q", "v"], num_experts=2, rank=3, alpha=3,
                                                    router="soft", expert_kind="ard_lora", **overrides))


def _set_gates(model, values: dict[str, list[list[float]]]) -> None:
    with torch.no_grad():
        for name, per_expert in values.items():
            for a, v in zip(model.routed_layers()[name].bank.rank_alpha, per_expert):
                a.copy_(torch.tensor(v))


def test_tv_and_l1_equal_hand_computed_values():
    model = _blocks_model(layer_overrides={r"layers\.1\.v": {"rank": 2}})
    assert [depth_group(n) for n in model.routed_layers()] == ["layers.*.q", "layers.*.v"] * 2
    _set_gates(model, {
        "layers.0.q": [[1.0, 0.5, 0.0], [2.0, 2.0, 2.0]],
        "layers.1.q": [[1.0, 1.0, 0.0], [2.0, 0.0, 2.5]],
        "layers.0.v": [[0.2, 0.0, 3.0], [-1.0, 1.0, 1.0]],  # -1 is read as 0
        "layers.1.v": [[0.2, 0.4], [0.0, 1.0]],  # rank 2: its missing third channel counts as 0
    })
    # q: |1-1| + |.5-1| + 0 + |2-2| + |2-0| + |2-2.5| = 3.0 ; v: 0 + .4 + 3 + 0 + 0 + 1 = 4.4
    # (q and v of one block are different groups: never compared)
    torch.testing.assert_close(ard_penalty(model, tv=1.0), torch.tensor(7.4), atol=1e-6, rtol=0)
    l1 = (1.5 + 6 + 2 + 4.5) + (3.2 + 2) + (0.6 + 1)
    torch.testing.assert_close(ard_penalty(model, l1=0.1), torch.tensor(0.1 * l1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ard_penalty(model, l1=0.1, tv=2.0), torch.tensor(0.1 * l1 + 14.8), atol=1e-5, rtol=0)


def test_tv_penalises_jumps_and_its_gradient_closes_them():
    model = _blocks_model()
    flat = {n: [[1.0, 0.5, 0.25]] * 2 for n in model.routed_layers()}
    _set_gates(model, flat)
    assert ard_penalty(model, tv=1.0).item() == 0.0  # equal gates along the depth: no variation
    jump = dict(flat, **{"layers.1.q": [[1.0, 1.5, 0.25], [1.0, 0.5, 0.25]]})
    _set_gates(model, jump)
    tv = ard_penalty(model, tv=1.0)
    torch.testing.assert_close(tv, torch.tensor(1.0), atol=1e-6, rtol=0)
    tv.backward()
    lo, hi = (model.routed_layers()[n].bank.rank_alpha[0].grad for n in ("layers.0.q", "layers.1.q"))
    assert lo.tolist() == [0.0, -1.0, 0.0] and hi.tolist() == [0.0, 1.0, 0.0]  # a descent step pulls them together


def test_tv_compares_only_the_experts_both_layers_hold():
    model = _blocks_model(layer_overrides={r"layers\.1\.q": {"num_experts": 1}})  # MoLA: expert_0 only
    assert model.routed_layers()["layers.1.q"].expert_ids == [0]
    flat = {n: [[1.0, 1.0, 1.0], [5.0, 5.0, 5.0]] for n in ("layers.0.v", "layers.1.v")}
    _set_gates(model, {**flat, "layers.0.q": [[1.0, 1.0, 1.0], [5.0, 5.0, 5.0]], "layers.1.q": [[0.0, 1.0, 1.0]]})
    torch.testing.assert_close(ard_penalty(model, tv=1.0), torch.tensor(1.0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- pruning
def test_prune_keeps_outputs_shrinks_storage_and_keeps_scaling():
    model = _lin_model(router="topk", top_k=2, rank=6)
    _randomize(model, dead=0.5)
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    with torch.no_grad():
        bank.rank_alpha[2].zero_()  # an expert without any live channel
        bank.rank_alpha[2][4] = -1.0
        bank.A[0].requires_grad_(False)
    live = bank.effective_ranks()
    assert live[2] == 0
    scaling = bank.scaling.clone()
    n_before = sum(p.numel() for p in bank.parameters())
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        before = model(x)
    new_ranks = prune_ard(model)
    assert new_ranks == {"lin": [live[0], live[1], 1]} and bank.ranks == [live[0], live[1], 1]
    assert sum(p.numel() for p in bank.parameters()) < n_before
    assert [tuple(a.shape) for a in bank.A] == [(r, 16) for r in bank.ranks]
    assert [tuple(b.shape) for b in bank.B] == [(12, r) for r in bank.ranks]
    assert all(bool((a > 0).all()) for a in list(bank.rank_alpha)[:2])
    torch.testing.assert_close(bank.scaling, scaling, atol=0, rtol=1e-7)
    assert not bank.A[0].requires_grad and bank.B[0].requires_grad and bank.rank_alpha[0].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)
    assert effective_rank(model) == {"lin": [live[0], live[1], 0]}


def test_prune_above_a_threshold_drops_exactly_the_small_channels():
    model = _lin_model(router="soft")
    _randomize(model, dead=0.0)
    layer = model.routed_layers()["lin"]
    x = torch.randn(6, 16)
    g = layer.router(x, molora.RoutingSignals()).gates.detach()
    keep = [a.detach().clamp_min(0) > 0.9 for a in layer.bank.rank_alpha]
    assert all(k.any() and not k.all() for k in keep)  # every expert loses some, keeps some
    ref = _reference(layer, x, g, keep)
    assert prune_ard(model, threshold=0.9) == {"lin": [int(k.sum()) for k in keep]}
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_prune_refuses_a_merged_layer_and_changes_nothing():
    model = _lin_model()
    _randomize(model)
    model.merge([1.0, 0.0, 0.0])
    bank = model.routed_layers()["lin"].bank
    ranks, params = list(bank.ranks), [p.clone() for p in bank.parameters()]
    with pytest.raises(MoLoRAError, match=r"prune_ard: modules \['lin'\] are merged; unmerge\(\) first"):
        prune_ard(model)
    assert bank.ranks == ranks and all(torch.equal(p, q) for p, q in zip(bank.parameters(), params))


# ---------------------------------------------------------------------------------------------- shared machinery
def test_save_load_round_trip_after_pruning(tmp_path):
    bert = tiny_bert()
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=TARGETS, num_experts=3, rank=4,
                                                               router="topk", top_k=2, expert_kind="ard_lora"))
    _randomize(model)
    prune_ard(model)
    assert any(len(set(layer.bank.ranks)) > 1 for layer in model.routed_layers().values())  # mixed ranks now
    inputs = model_inputs("bert")
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    model.save_pretrained(str(tmp_path / "ck"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(bert), str(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, ref)
    for name, layer in loaded.routed_layers().items():
        src = model.routed_layers()[name].bank
        assert type(layer.bank) is ARDLoRABank and layer.bank.ranks == src.ranks
        assert all(torch.equal(a, b) for a, b in zip(layer.bank.rank_alpha, src.rank_alpha))
        assert torch.equal(layer.bank.scaling, src.scaling)


def test_export_to_peft_folds_the_gates_into_A(tmp_path):
    bert = tiny_bert()
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=TARGETS, num_experts=3, rank=4,
                                                               router="task", expert_kind="ard_lora"))
    _randomize(model)
    model.export_peft(tmp_path / "peft", {"expert_1": 1.0})
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for name, layer in model.routed_layers().items():
        bank = layer.bank
        A = state[f"base_model.model.{name}.lora_A.weight"]
        B = state[f"base_model.model.{name}.lora_B.weight"]
        # "cat" with one expert: s_e is written into A (the adapter's own scaling is 1)
        want_A = float(bank.scaling[1]) * bank.rank_alpha[1].detach().clamp_min(0)[:, None] * bank.A[1].detach()
        torch.testing.assert_close(A, want_A, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(B, bank.B[1].detach(), atol=0, rtol=0)
    inputs = model_inputs("bert")
    with torch.no_grad(), model.routing(task_ids=[1, 1, 1]):
        routed = model(**inputs).last_hidden_state
    torch.testing.assert_close(peft_output(bert, tmp_path / "peft", inputs), routed, atol=1e-5, rtol=1e-5)


def test_task_routing_over_three_experts_is_one_kernel_call_per_layer(monkeypatch):
    from molora import layer as layer_module

    model = _lin_model(router="task")
    _randomize(model)
    layer = model.routed_layers()["lin"]
    calls, stacks = [], []
    expand = layer_module.kernels.expand
    monkeypatch.setattr(layer_module.kernels, "expand",
                        lambda *a, **k: calls.append(tuple(a[3].shape)) or expand(*a, **k))
    stack = ARDLoRABank._stack
    monkeypatch.setattr(ARDLoRABank, "_stack", lambda self: stacks.append(1) or stack(self))
    x = torch.randn(3, 5, 16)
    with model.routing(task_ids=[2, 0, 1]):
        y = model(x)
    assert calls == [(3, 4, 16)] and stacks == [1]  # every expert in one stacked call, no loop over experts
    onehot = torch.eye(3)[[2, 0, 1]][:, None, :].expand(3, 5, 3)
    torch.testing.assert_close(y.double(), _reference(layer, x, onehot), atol=1e-5, rtol=1e-5)
    y.sum().backward()  # the gates train through the routed op
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in layer.bank.rank_alpha)


def test_add_expert_and_frozen_cache():
    model = _lin_model(router="soft")
    _randomize(model)
    model.set_experts_trainable(False)
    bank = model.routed_layers()["lin"].bank
    first = bank.stacked()
    assert bank.stacked() is first  # frozen: the stack is cached
    with torch.no_grad():
        bank.rank_alpha[1].mul_(0.5)
    assert bank.stacked() is not first  # a written gate invalidates it
    model.add_expert("new")
    assert bank.num_experts == 4 and torch.equal(bank.rank_alpha[3].detach(), torch.ones(4))
    assert torch.count_nonzero(bank.delta_weight([0, 0, 0, 1.0])) == 0
    assert all(p.requires_grad for p in bank.expert_parameters(3))
    assert not any(p.requires_grad for e in range(3) for p in bank.expert_parameters(e))
