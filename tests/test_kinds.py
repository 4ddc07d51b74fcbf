"""Expert kinds (molora.kinds): QR-LoRA and MoSLoRA against independent float64 references,
their invariants (upper-triangular dR, shared Q, identity mixer), persistence and PEFT export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import molora
from molora import ExpertBank, MoLoRAConfig, get_molora_model
from molora.errors import CheckpointError, MoLoRAError
from molora.kinds import MoSLoRABank, QRLoRABank, qr_basis

from helpers import model_inputs, peft_output, tiny_bert

TARGETS = ["query", "value"]


def _lin_model(kind: str, *, num_experts: int = 4, rank: int = 3, router: str = "topk", top_k: int | None = 2,
               shared_a: bool = False, bias: bool = True) -> molora.MoLoRAModel:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12, bias=bias))
    cfg = MoLoRAConfig(target_modules=["lin"], num_experts=num_experts, rank=rank, alpha=2 * rank, router=router,
                       top_k=top_k if router == "topk" else None, expert_kind=kind, shared_a=shared_a)
    return get_molora_model(base, cfg)


def _randomize(model: molora.MoLoRAModel, seed: int = 0) -> None:
    """Random values in every trainable tensor (QR-LoRA's dR: its upper triangle)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if isinstance(layer.bank, QRLoRABank):
                for p in layer.bank.dR:
                    p.copy_(torch.triu(p))


def _dense(decision, E: int) -> torch.Tensor:
    if decision.indices is None:
        return decision.gates
    return torch.zeros(decision.gates.shape[0], E).scatter(1, decision.indices, decision.gates)


def _base64(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    W = layer.base_layer.weight.double()
    W = W.T if layer.transposed else W
    b = layer.base_layer.bias
    return W, None if b is None else b.double()


# ---------------------------------------------------------------------------------------------- config
def test_config_names_the_allowed_kinds():
    with pytest.raises(MoLoRAError, match=r"expert_kind must be one of \['lora', 'qr_lora', 'moslora', 'ard_lora', 'dora', 'ortho_lora', 'riemann_lora'\] or a list of one per expert; got 'vera'"):
        MoLoRAConfig(target_modules=["q"], expert_kind="vera")
    with pytest.raises(MoLoRAError, match="qr_lora.*shared_a=True is not allowed"):
        MoLoRAConfig(target_modules=["q"], expert_kind="qr_lora", shared_a=True)
    assert MoLoRAConfig(target_modules=["q"]).expert_kind == "lora"
    assert MoLoRAConfig.from_dict(MoLoRAConfig(target_modules=["q"], expert_kind="moslora").to_dict()).expert_kind == "moslora"


def test_qr_rank_larger_than_the_layer_is_an_error_naming_the_module():
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 4))
    with pytest.raises(MoLoRAError, match=r"module 'lin'.*rank must be an int in \[1, min\(d_in, d_out\) = 4\]"):
        get_molora_model(base, MoLoRAConfig(target_modules=["lin"], rank=5, expert_kind="qr_lora"))
    assert isinstance(base.lin, nn.Linear)  # nothing applied


# ---------------------------------------------------------------------------------------------- QR-LoRA
def test_qr_basis_is_the_official_rule():
    """Q = first r columns of the reduced QR (no pivoting) of the rank-r truncated SVD of W0,
    factorised whole as the official code does (independent float64 computation)."""
    torch.manual_seed(0)
    W = torch.randn(12, 16)
    r = 3
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    Q_ref, R_ref = torch.linalg.qr(U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], mode="reduced")
    Q = qr_basis(W, r)
    assert Q.shape == (12, r) and Q.dtype == torch.float32
    torch.testing.assert_close(Q.double(), Q_ref[:, :r], atol=1e-5, rtol=0)
    torch.testing.assert_close(Q.double().T @ Q.double(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    # Q R[:r] reproduces the rank-r matrix: the frozen part the official layer moves out of W0 and back
    torch.testing.assert_close(Q_ref[:, :r] @ R_ref[:r], U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-10, rtol=0)


def test_qr_init_is_a_zero_delta_and_q_is_shared_frozen_and_bit_identical():
    model = _lin_model("qr_lora")
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    assert isinstance(bank, QRLoRABank) and bank.num_experts == 4
    assert all(torch.count_nonzero(p) == 0 for p in bank.dR)
    x = torch.randn(5, 16)
    assert torch.count_nonzero(bank.delta_weight([1.0] * 4)) == 0
    with torch.no_grad():  # the base GEMM fused with the shrink may round the base output differently
        torch.testing.assert_close(model(x), layer.base_layer(x), atol=1e-6, rtol=1e-6)
    A, B = bank.stacked()
    assert A.shape == (4, 3, 16) and B.shape == (4, 12, 3)
    assert all(torch.equal(B[e], bank.Q) for e in range(4))
    torch.testing.assert_close(bank.Q, qr_basis(layer.base_layer.weight, 3), atol=0, rtol=0)
    assert "Q" in dict(bank.named_buffers()) and all(p is not bank.Q for p in model.parameters())
    # trainable: dR only (r * d_in stored per expert), the router and nothing of Q
    assert sum(p.numel() for p in bank.parameters() if p.requires_grad) == 4 * 3 * 16


def test_qr_dR_cannot_leave_the_upper_triangle():
    model = _lin_model("qr_lora", router="soft")
    bank = model.routed_layers()["lin"].bank
    Q0 = bank.Q.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1)
    x, target = torch.randn(32, 16), torch.randn(32, 12)
    lower = ~torch.ones(3, 16, dtype=torch.bool).triu()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        for p in bank.dR:
            assert torch.count_nonzero(p.grad[lower]) == 0 and torch.count_nonzero(p.grad[~lower]) > 0
        opt.step()
    for p in bank.dR:
        assert torch.count_nonzero(p[lower]) == 0 and torch.count_nonzero(p[~lower]) > 0
    assert torch.equal(bank.Q, Q0)
    with pytest.raises(ValueError, match="dR must be upper triangular"):
        bank.add_expert(3, 6.0, dR=torch.ones(3, 16))
    with pytest.raises(ValueError, match="rank 3"):
        bank.add_expert(2, 6.0)
    assert bank.num_experts == 4


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_qr_routed_output_equals_float64_loop(router):
    model = _lin_model("qr_lora", router=router)
    _randomize(model)
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        g = _dense(layer.router(x, molora.RoutingSignals()), 4).double().reshape(2, 7, 4)
        out = model(x)
    W, b = _base64(layer)
    Q = qr_basis(layer.base_layer.weight.double(), 3)  # recomputed in float64, not read from the bank
    ref = x.double() @ W.T + b
    for e in range(4):
        dR = torch.triu(bank.dR[e].double())
        ref = ref + g[..., e:e + 1] * float(bank.scaling[e]) * (x.double() @ dR.T @ Q.T)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_qr_merge_is_q_times_the_mixed_dR_and_equals_unmerged():
    bert = tiny_bert()
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=TARGETS, num_experts=3, rank=4,
                                                               router="static", expert_kind="qr_lora",
                                                               router_kwargs={"weights": [0.5, 0.0, -1.0]}))
    _randomize(model)
    inputs = model_inputs("bert")
    with torch.no_grad():
        routed = model(**inputs).last_hidden_state
    for layer in model.routed_layers().values():
        bank = layer.bank
        mixed = sum(w * float(bank.scaling[e]) * torch.triu(bank.dR[e].double()) for e, w in ((0, 0.5), (2, -1.0)))
        torch.testing.assert_close(bank.delta_weight([0.5, 0.0, -1.0]).double(), bank.Q.double() @ mixed, atol=1e-6, rtol=0)
    model.merge([0.5, 0.0, -1.0])
    with torch.no_grad():
        merged = model(**inputs).last_hidden_state
    torch.testing.assert_close(merged, routed, atol=1e-5, rtol=1e-5)


def test_qr_conv1d_takes_q_from_the_transposed_weight(gpt2):
    model = get_molora_model(gpt2, MoLoRAConfig(target_modules=["c_attn"], num_experts=2, rank=4, expert_kind="qr_lora"))
    layer = model.routed_layers()["transformer.h.0.attn.c_attn"]
    assert layer.transposed and layer.bank.Q.shape == (96, 4)
    torch.testing.assert_close(layer.bank.Q, qr_basis(layer.base_layer.weight.T, 4), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- MoSLoRA
def test_moslora_init_follows_the_official_code():
    torch.manual_seed(0)
    bank = MoSLoRABank(256, 32)
    bank.add_expert(64, 16)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on [r, r]: U(-1/sqrt(r), 1/sqrt(r))
    M = bank.M[0].detach()
    assert M.shape == (64, 64) and bound * 0.95 < M.abs().max() <= bound
    assert bank.A[0].abs().max() <= 1 / math.sqrt(256)
    assert torch.count_nonzero(bank.B[0]) == 0 and torch.count_nonzero(bank.delta_weight([1.0])) == 0


def _copy_plain_into(model_plain, model_mos) -> None:
    with torch.no_grad():
        for name, layer in model_mos.routed_layers().items():
            plain = model_plain.routed_layers()[name]
            for e in range(layer.bank.num_experts):
                if not layer.bank.shared_a:
                    layer.bank.A[e].copy_(plain.bank.A[e])
                    layer.bank.M[e].copy_(torch.eye(layer.bank.ranks[e]))
                layer.bank.B[e].copy_(plain.bank.B[e])
            if layer.bank.shared_a:
                layer.bank.A_shared.copy_(plain.bank.A_shared)
                layer.bank.M_shared.copy_(torch.eye(layer.bank.fixed_rank))
            layer.router.load_state_dict(plain.router.state_dict())


@pytest.mark.parametrize("shared_a", [False, True])
def test_moslora_with_identity_mixer_frozen_is_plain_lora_exactly(shared_a):
    plain = _lin_model("lora", shared_a=shared_a)
    _randomize(plain)
    mos = _lin_model("moslora", shared_a=shared_a)
    _copy_plain_into(plain, mos)
    bank = mos.routed_layers()["lin"].bank
    for m in ([bank.M_shared] if shared_a else list(bank.M)):
        m.requires_grad_(False)
    x = torch.randn(3, 5, 16)
    for p, q in zip(plain.routed_layers()["lin"].bank.stacked(), bank.stacked()):
        assert torch.equal(p, q)
    y_plain, y_mos = plain(x), mos(x)
    assert torch.equal(y_plain, y_mos)
    y_plain.square().sum().backward()
    y_mos.square().sum().backward()
    pb = plain.routed_layers()["lin"].bank
    for p, q in zip([pb.A_shared] if shared_a else list(pb.A), [bank.A_shared] if shared_a else list(bank.A)):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("shared_a", [False, True])
def test_moslora_forward_merge_and_mixer_gradients_match_float64(shared_a):
    model = _lin_model("moslora", router="soft", shared_a=shared_a)
    _randomize(model)
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    x = torch.randn(6, 16)
    g = layer.router(x, molora.RoutingSignals()).gates.detach().double()
    y = model(x)
    y.square().sum().backward()
    # float64 reference with its own autograd leaves
    Ms = [bank.M_shared] * 4 if shared_a else list(bank.M)
    As = [bank.A_shared] * 4 if shared_a else list(bank.A)
    M64 = [m.detach().double().requires_grad_() for m in ({id(m): m for m in Ms}.values())]
    pick = (lambda e: M64[0]) if shared_a else (lambda e: M64[e])
    W, b = _base64(layer)
    ref = x.double() @ W.T + b
    for e in range(4):
        ref = ref + g[:, e:e + 1] * float(bank.scaling[e]) * (x.double() @ (bank.B[e].double() @ pick(e) @ As[e].double()).T)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    ref.square().sum().backward()
    grads = [bank.M_shared.grad] if shared_a else [m.grad for m in bank.M]
    for got, want in zip(grads, M64):
        torch.testing.assert_close(got.double(), want.grad, atol=1e-4, rtol=1e-4)
    # merged weight: B (M A)
    w = [0.3, -1.0, 0.0, 2.0]
    want = sum(w[e] * float(bank.scaling[e]) * (bank.B[e].double() @ (pick(e).detach() @ As[e].double())) for e in range(4))
    torch.testing.assert_close(bank.delta_weight(w).double(), want, atol=1e-5, rtol=0)


def test_moslora_mixed_ranks_pad_exactly():
    torch.manual_seed(0)
    bank = MoSLoRABank(10, 7)
    f = [(r, torch.randn(r, 10), torch.randn(7, r), torch.randn(r, r)) for r in (2, 5)]
    for r, A, B, M in f:
        bank.add_expert(r, 4, A=A, B=B, M=M)
    A, B = bank.stacked()
    assert A.shape == (2, 5, 10) and B.shape == (2, 7, 5)
    for e, (r, A_e, B_e, M_e) in enumerate(f):
        torch.testing.assert_close(B[e] @ A[e], B_e @ M_e @ A_e, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"M must have shape \[3, 3\]"):
        bank.add_expert(3, 4, M=torch.randn(2, 2))
    assert bank.num_experts == 2 and len(bank.M) == 2


# ---------------------------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("kind", ["qr_lora", "moslora", "ard_lora", "ortho_lora"])
def test_save_load_round_trip(kind, tmp_path):
    bert = tiny_bert()
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=TARGETS, num_experts=3, rank=4,
                                                               router="topk", top_k=2, expert_kind=kind))
    _randomize(model)
    inputs = model_inputs("bert")
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    model.save_pretrained(str(tmp_path / "ck"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(bert), str(tmp_path / "ck"))
    with torch.no_grad():
        out = loaded(**inputs).last_hidden_state
    assert torch.equal(out, ref)
    for name, layer in loaded.routed_layers().items():
        assert layer.bank.kind == kind and type(layer.bank) is type(model.routed_layers()[name].bank)
        for (k, v), (k2, v2) in zip(layer.bank.state_dict().items(), model.routed_layers()[name].bank.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)


def test_checkpoint_with_an_unknown_kind_is_refused(tmp_path):
    import json

    from molora.persistence import CONFIG_NAME

    model = _lin_model("qr_lora")
    model.save_pretrained(str(tmp_path / "ck"))
    path = tmp_path / "ck" / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["layers"]["lin"]["bank"]["kind"] = "vera"
    path.write_text(json.dumps(meta))
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12))
    torch.manual_seed(0)
    base.lin.load_state_dict(model.routed_layers()["lin"].base_layer.state_dict())
    with pytest.raises(CheckpointError, match=r"expert kind must be one of \['lora', 'qr_lora', 'moslora', 'ard_lora', 'dora', 'ortho_lora', 'riemann_lora', 'mixed'\]; got 'vera'"):
        molora.MoLoRAModel.from_pretrained(base, str(tmp_path / "ck"))
    assert isinstance(base.lin, nn.Linear)


@pytest.mark.parametrize("kind", ["qr_lora", "moslora", "ard_lora", "ortho_lora"])
def test_export_to_peft_reloads_equal(kind, tmp_path):
    bert = tiny_bert()
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=TARGETS, num_experts=3, rank=4,
                                                               router="task", expert_kind=kind))
    _randomize(model)
    weights = {"expert_0": 0.7, "expert_2": -0.4}
    model.export_peft(tmp_path / "peft", weights)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for name, layer in model.routed_layers().items():
        A = state[f"base_model.model.{name}.lora_A.weight"]
        B = state[f"base_model.model.{name}.lora_B.weight"]
        if kind == "qr_lora":  # "cat": each expert's (triu(dR_e), Q) side by side, rank 2 r
            assert A.shape == (8, 32) and torch.equal(B, torch.cat([layer.bank.Q] * 2, dim=1))
            assert all(torch.equal(a, torch.triu(a)) for a in A.split(4))
    inputs = model_inputs("bert")
    model.merge([0.7, 0.0, -0.4])
    with torch.no_grad():
        merged = model(**inputs).last_hidden_state
    torch.testing.assert_close(peft_output(bert, tmp_path / "peft", inputs), merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["qr_lora", "moslora", "ard_lora", "ortho_lora"])
def test_add_expert_keeps_outputs_and_the_kind(kind):
    model = _lin_model(kind, router="soft")
    _randomize(model)
    model.set_experts_trainable(False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = model.routed_layers()["lin"].bank.stacked()
    model.add_expert("new")
    bank = model.routed_layers()["lin"].bank
    assert bank.num_experts == 5 and type(bank).kind == kind
    assert torch.count_nonzero(bank.delta_weight([0, 0, 0, 0, 1.0])) == 0  # a fresh expert adds nothing yet
    assert all(p.requires_grad for p in bank.expert_parameters(4))
    assert not any(p.requires_grad for e in range(4) for p in bank.expert_parameters(e))
    A, B = bank.stacked()
    torch.testing.assert_close(A[:4], before[0], atol=0, rtol=0)
    if kind == "qr_lora":
        assert torch.equal(B[4], bank.Q)
    model(x)


def test_frozen_kind_banks_keep_their_stacked_copy():
    for kind in ("qr_lora", "moslora"):
        model = _lin_model(kind)
        _randomize(model)
        bank = model.routed_layers()["lin"].bank
        bank.set_trainable(False)
        first = bank.stacked()
        assert bank.stacked() is first  # cached: no restacking per forward
        with torch.no_grad():
            (bank.dR[0] if kind == "qr_lora" else bank.M[0]).mul_(2.0)
        assert bank.stacked() is not first  # a written source invalidates it


def test_a_checkpoint_without_a_kind_loads_as_plain_lora(tmp_path):
    """Checkpoints written before expert kinds existed have no ``kind`` field."""
    import json

    from molora.persistence import CONFIG_NAME

    model = _lin_model("lora")
    _randomize(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    model.save_pretrained(str(tmp_path / "ck"))
    path = tmp_path / "ck" / CONFIG_NAME
    meta = json.loads(path.read_text())
    del meta["layers"]["lin"]["bank"]["kind"]
    del meta["config"]["expert_kind"]
    path.write_text(json.dumps(meta))
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12))
    base.lin.load_state_dict(model.routed_layers()["lin"].base_layer.state_dict())
    loaded = molora.MoLoRAModel.from_pretrained(base, str(tmp_path / "ck"))
    assert type(loaded.routed_layers()["lin"].bank) is ExpertBank
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_kind_specific_refusals_change_nothing():
    from molora.adapter_pool import AdapterPool

    model = _lin_model("qr_lora", router="task")
    with pytest.raises(MoLoRAError, match=r"add_expert 'x'.*own rank only; got rank 2, modules have \{'lin': 3\}"):
        model.add_expert("x", rank=2)
    assert model.expert_names == [f"expert_{i}" for i in range(4)] and model.routed_layers()["lin"].bank.num_experts == 4
    with pytest.raises(MoLoRAError, match="AdapterPool: module 'lin' must hold every slot as a plain LoRA expert.*'qr_lora'"):
        AdapterPool(model)
    with pytest.raises(ValueError, match="shares its mixer"):
        MoSLoRABank(8, 4, shared_a=True, shared_rank=2).add_expert(2, 1.0, M=torch.eye(2))
