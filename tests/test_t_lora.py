"""T-LoRA (molora.kinds.ortho_lora + the "tlora" router): the Ortho-LoRA init against an independent
SVD, the zero delta at init, the timestep rank mask r(t) against the paper's formula in a tiny
UNet, exactly zero gradient for masked channels, frozen copies that never move, the orthogonality
penalty by hand, float64 references of the routed delta, persistence, merging and PEFT export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import molora
from molora.kernels import routed_lora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import MoLoRAError
from molora.kinds import OrthoLoRABank, ortho_init, ortho_penalty

from helpers import tiny_unet

T, R_MAX, R_MIN = 1000, 4, 1
UNET_TARGETS = ["to_q", "to_k"]  # self- and cross-attention (to_k of attn2 reads the 16-wide text)


def paper_rank(t: int, r: int = R_MAX, r_min: int = R_MIN, num_timesteps: int = T) -> int:
    """The paper's ``r(t) = floor((r - r_min)(T - t) / T) + r_min``, in integers."""
    return (r - r_min) * (num_timesteps - t) // num_timesteps + r_min


def _tlora_config(targets, **overrides) -> MoLoRAConfig:
    kw = dict(target_modules=targets, num_experts=R_MAX, rank=1, alpha=1.0, router="tlora", expert_kind="ortho_lora",
              router_kwargs={"num_timesteps": T, "min_rank": R_MIN})
    kw.update(overrides)
    if kw["router"] != "tlora":
        kw["router_kwargs"] = {}
    return MoLoRAConfig(**kw)


def _lin_model(**overrides) -> molora.MoLoRAModel:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12))
    return get_molora_model(base, _tlora_config(["lin"], **overrides))


def _perturb(model: molora.MoLoRAModel, seed: int = 0, scale: float = 0.3) -> None:
    """Move the trained factors off their start (the frozen copies stay): a non-zero delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for p in layer.bank.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def _delta64(bank: OrthoLoRABank, e: int) -> torch.Tensor:
    """float64 ``P diag(lam) Q - P0 diag(lam0) Q0`` of expert ``e``, from the stored factors."""
    P, lam, Q = (t.detach().double() for t in bank.factors(e))
    P0, lam0, Q0 = (t.detach().double() for t in bank.factors(e, frozen=True))
    return P @ torch.diag(lam) @ Q - P0 @ torch.diag(lam0) @ Q0


def _reference(layer, x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """float64 ``W0 x + b + sum_{j < r(t)} s_j delta_j x`` per example (``x [batch, seq, d_in]``)."""
    bank = layer.bank
    x = x.double()
    out = x @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    for b, r in enumerate(ranks):
        for j in range(r):
            out[b] += float(bank.scaling[j]) * (x[b] @ _delta64(bank, j).T)
    return out


# ---------------------------------------------------------------------------------------------- init
def test_init_is_the_last_singular_triples_of_one_gaussian_draw():
    torch.manual_seed(3)
    got = ortho_init(12, 16, [1, 2, 1])
    torch.manual_seed(3)
    M = (torch.randn(12, 16, dtype=torch.float64) / 4).numpy()  # std 1/R, R = 4
    U, S, Vh = np.linalg.svd(M, full_matrices=False)  # an independent SVD (LAPACK via numpy)
    P = torch.cat([p for p, _, _ in got], 1).numpy()
    lam = torch.cat([v for _, v, _ in got]).numpy()
    Q = torch.cat([q for _, _, q in got], 0).numpy()
    np.testing.assert_allclose(lam, S[-4:], rtol=1e-12, atol=0)  # the 4 smallest, decreasing
    assert (np.diff(lam) < 0).all()
    # the triples up to sign: P diag(lam) Q is M's projection on its last 4 singular directions
    np.testing.assert_allclose(P @ np.diag(lam) @ Q, U[:, -4:] @ np.diag(S[-4:]) @ Vh[-4:], atol=1e-12)
    np.testing.assert_allclose(P.T @ P, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(Q @ Q.T, np.eye(4), atol=1e-12)
    torch.manual_seed(3)
    principal = ortho_init(12, 16, [4], singular="principal")[0][1].numpy()
    np.testing.assert_allclose(principal, S[:4], rtol=1e-12)
    torch.manual_seed(3)
    middle = ortho_init(12, 16, [4], singular="middle")[0][1].numpy()
    np.testing.assert_allclose(middle, S[4:8], rtol=1e-12)  # start ceil((12 - 4) / 2) = 4


def test_init_is_a_zero_delta_with_frozen_copies_of_the_start():
    model = _lin_model()
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    assert isinstance(bank, OrthoLoRABank) and bank.kind == "ortho_lora" and bank.ranks == [1] * R_MAX
    for e in range(R_MAX):
        for trained, frozen in zip(bank.factors(e), bank.factors(e, frozen=True)):
            assert torch.equal(trained, frozen) and trained.requires_grad and not frozen.requires_grad
        assert torch.count_nonzero(_delta64(bank, e)) == 0  # exactly zero in float64
    assert torch.count_nonzero(bank.delta_weight([1.0] * R_MAX)) == 0  # and as merging computes it
    # the layer's experts split one draw: P [12, 4] and Q [4, 16] of the layer are orthonormal
    P = torch.cat(list(bank.P), 1).detach().double()
    Q = torch.cat(list(bank.Q), 0).detach().double()
    torch.testing.assert_close(P.T @ P, torch.eye(R_MAX, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q @ Q.T, torch.eye(R_MAX, dtype=torch.float64), atol=1e-6, rtol=0)
    lam = torch.cat(list(bank.lam)).detach()
    assert (lam[:-1] > lam[1:]).all()  # channel 0 (kept longest by the mask) has the largest value
    # only P, lam, Q train; the copies are buffers, saved with the bank
    trainable = {n for n, p in bank.named_parameters() if p.requires_grad}
    assert trainable == {f"{k}.{e}" for k in ("P", "lam", "Q") for e in range(R_MAX)}
    assert {f"lin.bank.{k}.{e}" for k in ("P0", "lam0", "Q0") for e in range(R_MAX)} <= set(model.adapter_state_dict())
    x = torch.randn(3, 5, 16)
    with torch.no_grad(), model.routing(timesteps=torch.tensor([0, 500, 999])):
        y = model(x)
    # through the kernel the two terms cancel up to the rounding of one product (an FMA)
    torch.testing.assert_close(y, layer.base_layer(x), atol=1e-6, rtol=0)
    assert float(ortho_penalty(model).detach()) < 1e-10 and float(ortho_penalty(model, scope="expert").detach()) < 1e-10


def test_refusals_name_the_problem_and_change_nothing():
    with pytest.raises(MoLoRAError, match="'ortho_lora'.*shared_a=True is not allowed"):
        MoLoRAConfig(target_modules=["lin"], expert_kind="ortho_lora", shared_a=True)
    base = nn.Sequential(nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"total rank sum\(ranks\) = 4 must be in \[1, min\(d_out, d_in\) = 3\]"):
        get_molora_model(base, MoLoRAConfig(target_modules=["0"], num_experts=4, rank=1, expert_kind="ortho_lora"))
    assert isinstance(base[0], nn.Linear)  # nothing wrapped
    bank = OrthoLoRABank(8, 6)
    with pytest.raises(ValueError, match="P, lam and Q are given together"):
        bank.add_expert(2, 2.0, P=torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"lam must have shape \[2\]"):
        bank.add_expert(2, 2.0, P=torch.zeros(6, 2), lam=torch.zeros(3), Q=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="singular must be one of"):
        OrthoLoRABank(8, 6, singular="first")
    assert bank.num_experts == 0 and len(bank.P) == len(bank.P0) == 0
    model = get_molora_model(nn.Sequential(nn.Linear(4, 4)), MoLoRAConfig(target_modules=["0"], num_experts=2, rank=2))
    with pytest.raises(MoLoRAError, match="ortho_penalty: the model has no 'ortho_lora' experts"):
        ortho_penalty(model)
    with pytest.raises(MoLoRAError, match="scope must be 'layer' or 'expert'"):
        ortho_penalty(_lin_model(), scope="bank")


# ---------------------------------------------------------------------------------------------- the mask
def test_unet_mask_gradients_and_frozen_copies_under_training():
    unet = tiny_unet()
    model = get_molora_model(unet, _tlora_config(UNET_TARGETS))
    layers = model.routed_layers()
    assert len(layers) == 16 and all(isinstance(layer.bank, OrthoLoRABank) for layer in layers.values())
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 16, generator=g)
    t = torch.tensor([0, T // 2, T - 1])
    ranks = [paper_rank(int(ti)) for ti in t]
    assert ranks == [4, 2, 1]
    with torch.no_grad(), model.routing(timesteps=t):
        y0 = model(latents, t, encoder_hidden_states=text).sample
    mask = torch.tensor([[1.0 if j < r else 0.0 for j in range(R_MAX)] for r in ranks])
    for record in model.last_routing().values():
        assert torch.equal(record.decision.gates, mask)
    with torch.no_grad(), model.disable_adapters():
        torch.testing.assert_close(y0, model(latents, t, encoder_hidden_states=text).sample, atol=1e-5, rtol=0)

    frozen = {n: [b.clone() for k in ("P0", "lam0", "Q0") for b in getattr(layer.bank, k)] for n, layer in layers.items()}
    start = {n: [p.detach().clone() for p in layer.bank.parameters()] for n, layer in layers.items()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    t_mid = torch.full((1,), T // 2)  # r = 2: channels 2, 3 are masked
    for _ in range(2):
        opt.zero_grad()
        with model.routing(timesteps=t_mid):
            out = model(latents[:1], t_mid, encoder_hidden_states=text[:1]).sample
        out.square().mean().backward()
        for name, layer in layers.items():
            bank = layer.bank
            for j in range(R_MAX):
                grads = [p.grad for p in bank.expert_parameters(j)]
                if j < 2:
                    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), (name, j)
                else:  # masked: exactly zero (or no) gradient
                    assert all(gr is None or torch.count_nonzero(gr) == 0 for gr in grads), (name, j)
        opt.step()
    for name, layer in layers.items():
        bank = layer.bank
        now = [b for k in ("P0", "lam0", "Q0") for b in getattr(bank, k)]
        assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(now, frozen[name])), name
        moved = [not torch.equal(p.detach(), q) for p, q in zip(bank.parameters(), start[name])]
        # parameters() order: P[0..3], lam[0..3], Q[0..3]; channels 0, 1 moved, 2, 3 did not
        assert moved == [True, True, False, False] * 3, (name, moved)


def test_routed_delta_matches_a_float64_loop_per_timestep():
    model = _lin_model()
    _perturb(model)
    layer = model.routed_layers()["lin"]
    x = torch.randn(4, 3, 16)
    t = torch.tensor([0, 300, 500, 999])
    with torch.no_grad(), model.routing(timesteps=t):
        y = model(x)
    ranks = [paper_rank(int(ti)) for ti in t]
    assert ranks == [4, 3, 2, 1]
    torch.testing.assert_close(y.double(), _reference(layer, x, ranks), atol=1e-5, rtol=1e-5)
    # the kernel sees rank-2 experts [lam Q; lam0 Q0] and [P, -P0]
    A, B = layer.bank.stacked()
    assert tuple(A.shape) == (R_MAX, 2, 16) and tuple(B.shape) == (R_MAX, 12, 2)


def test_kernel_rank_mask_zeroes_the_same_channels_of_both_terms():
    bank = OrthoLoRABank(10, 7)
    torch.manual_seed(0)
    for r in (3, 2):  # mixed ranks: the padding of both halves must line up
        bank.add_expert(r, float(r))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    x = torch.randn(6, 10)
    gates = torch.rand(6, 2)
    A, B = bank.stacked()
    got = routed_lora(x, A, B, gates, scaling=bank.scaling, backend="torch", rank_mask=bank.kernel_rank_mask(m))
    want = torch.zeros(6, 7, dtype=torch.float64)
    for e in range(2):
        P, lam, Q = (t.detach().double() for t in bank.factors(e))
        P0, lam0, Q0 = (t.detach().double() for t in bank.factors(e, frozen=True))
        keep = m[e, :bank.ranks[e]].double()
        d = P @ torch.diag(lam * keep) @ Q - P0 @ torch.diag(lam0 * keep) @ Q0
        want += gates[:, e:e + 1].double() * float(bank.scaling[e]) * (x.double() @ d.T)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"mask must be \[E=2, r_max=3\]"):
        bank.kernel_rank_mask(torch.ones(2, 2))
    # the unpadded factors (what merge and export write) are the rank-2r expert exactly
    for e in range(2):
        a, b = bank.expert_factors(e)
        assert tuple(a.shape) == (2 * bank.ranks[e], 10)
        torch.testing.assert_close((b.double() @ a.double()), _delta64(bank, e), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- penalty
def test_ortho_penalty_equals_a_hand_computation():
    model = _lin_model(num_experts=2, rank=2, alpha=2.0, router="soft")
    bank = model.routed_layers()["lin"].bank
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    P = [p.detach().double().numpy() for p in bank.P]
    Q = [q.detach().double().numpy() for q in bank.Q]

    def term(M):  # ||M^T M - I||_F^2 by a double loop
        k = M.shape[1]
        return sum((float(M[:, i] @ M[:, j]) - (i == j)) ** 2 for i in range(k) for j in range(k))

    layer_hand = term(np.concatenate(P, 1)) + term(np.concatenate(Q, 0).T)
    expert_hand = sum(term(p) + term(q.T) for p, q in zip(P, Q))
    assert layer_hand > expert_hand > 0  # the layer scope adds the cross terms between experts
    torch.testing.assert_close(ortho_penalty(model), torch.tensor(layer_hand, dtype=torch.float32), rtol=1e-5, atol=0)
    torch.testing.assert_close(ortho_penalty(model, scope="expert"), torch.tensor(expert_hand, dtype=torch.float32),
                               rtol=1e-5, atol=0)
    ortho_penalty(model).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*bank.P, *bank.Q])
    assert all(v.grad is None for v in bank.lam)  # the penalty does not involve lambda


# ---------------------------------------------------------------------------------------------- shared machinery
def test_save_load_round_trip(tmp_path):
    model = _lin_model()
    _perturb(model)
    x, t = torch.randn(3, 5, 16), torch.tensor([0, 500, 999])
    with torch.no_grad(), model.routing(timesteps=t):
        ref = model(x)
    model.save_pretrained(str(tmp_path / "ck"))
    torch.manual_seed(123)  # the fresh bank draws another start: the checkpoint must overwrite all of it
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12))
    base.lin.load_state_dict(model.routed_layers()["lin"].base_layer.state_dict())
    loaded = molora.MoLoRAModel.from_pretrained(base, str(tmp_path / "ck"))
    with torch.no_grad(), loaded.routing(timesteps=t):
        assert torch.equal(loaded(x), ref)
    a, b = loaded.routed_layers()["lin"].bank, model.routed_layers()["lin"].bank
    assert type(a) is OrthoLoRABank and a.singular == "last" and a.ranks == b.ranks
    for e in range(R_MAX):
        for u, v in zip(a.factors(e, frozen=True), b.factors(e, frozen=True)):
            assert torch.equal(u, v) and not u.requires_grad


def test_merge_at_one_timestep_equals_the_routed_forward():
    """Merging folds a static mixture: the mask at one timestep merges exactly (and then holds at
    every timestep: the merged weight cannot follow r(t))."""
    model = _lin_model()
    _perturb(model)
    x = torch.randn(2, 5, 16)
    t = torch.full((2,), 500)
    with torch.no_grad(), model.routing(timesteps=t):
        routed = model(x)
    weight = model.routed_layers()["lin"].base_layer.weight.detach().clone()
    model.merge([1.0, 1.0, 0.0, 0.0])  # r(500) = 2
    with torch.no_grad(), model.routing(timesteps=torch.full((2,), 0)):
        torch.testing.assert_close(model(x), routed, atol=1e-5, rtol=0)
    model.unmerge()
    assert torch.equal(model.routed_layers()["lin"].base_layer.weight, weight)


def test_export_to_peft_is_the_rank_2r_lora(tmp_path):
    from peft import PeftModel

    model = _lin_model()
    _perturb(model)
    base = copy.deepcopy(model.routed_layers()["lin"].base_layer)
    model.export_peft(tmp_path / "peft", [1.0, 1.0, 1.0, 0.0])  # r(t) = 3
    x = torch.randn(2, 5, 16)
    t = torch.full((2,), 300)
    with torch.no_grad(), model.routing(timesteps=t):
        routed = model(x)
    plain = nn.Sequential()
    plain.add_module("lin", base)
    pm = PeftModel.from_pretrained(plain, str(tmp_path / "peft")).eval()
    assert pm.base_model.model.lin.lora_A["default"].weight.shape == (6, 16)  # three rank-2 experts
    with torch.no_grad():
        torch.testing.assert_close(pm(x), routed, atol=1e-5, rtol=1e-5)


def test_a_grown_expert_is_its_own_draw_and_a_pure_zero_delta():
    model = _lin_model(router="soft", num_experts=2, rank=2, alpha=2.0)
    bank = model.routed_layers()["lin"].bank
    torch.manual_seed(9)
    e = bank.add_expert(3, 3.0)
    assert bank.ranks == [2, 2, 3] and torch.count_nonzero(_delta64(bank, e)) == 0
    P, lam, Q = (t.detach().double() for t in bank.factors(e))
    torch.testing.assert_close(P.T @ P, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q @ Q.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    A, B = bank.stacked()
    assert tuple(A.shape) == (3, 6, 16) and tuple(B.shape) == (3, 12, 6)
    _perturb(model)
    w = [0.5, 0.0, 2.0]
    want = sum(w[i] * float(bank.scaling[i]) * _delta64(bank, i) for i in range(3))
    torch.testing.assert_close(bank.delta_weight(w).double(), want, atol=1e-5, rtol=0)
