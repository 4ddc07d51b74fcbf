"""RiemannLoRA experts (molora.kinds.riemann_lora) and the Riemannian optimiser (molora.optim):
the probes' gradients and the tangent projection against float64 autograd, the retraction
against a float64 truncated SVD, orthonormality and rank after every step, invariance to the
factorisation, matrix recovery, the locally optimal init against the gradient's SVD, persistence,
routing through the one kernel call, merging and PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import MoLoRAError
from molora.kinds import RiemannLoRABank, loi_point, riemann_loi_
from molora.kinds.riemann_lora import random_orthonormal
from molora.optim import (RiemannianSGD, orthogonalize_tangent, project_tangent, retract, tangent_from_products,
                          tangent_matrix)

from helpers import model_inputs, peft_output, tiny_bert

TOL = 1e-5


def _lin_model(*, num_experts: int = 3, rank: int = 3, router: str = "topk", top_k: int | None = 2,
               d_in: int = 16, d_out: int = 12, bias: bool = True, **kwargs) -> molora.MoLoRAModel:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(d_in, d_out, bias=bias))
    cfg = MoLoRAConfig(target_modules=["lin"], num_experts=num_experts, rank=rank, alpha=2 * rank, router=router,
                       top_k=top_k if router == "topk" else None, expert_kind="riemann_lora", **kwargs)
    return get_molora_model(base, cfg)


def _random_points(bank: RiemannLoRABank, seed: int = 0) -> None:
    """Random orthonormal U, V and a random (full, non-diagonal) S for every expert."""
    g = torch.Generator().manual_seed(seed)
    for e in range(bank.num_experts):
        r = bank.ranks[e]
        U = torch.linalg.qr(torch.randn(bank.d_out, r, generator=g)).Q
        V = torch.linalg.qr(torch.randn(bank.d_in, r, generator=g)).Q
        bank.set_point_(e, U, torch.randn(r, r, generator=g), V)


def _point64(bank: RiemannLoRABank, e: int) -> torch.Tensor:
    U, S, V = (t.detach().double() for t in bank.point(e))
    X = U @ S @ V.T
    if bank.has_offset(e):
        X = X - bank.init_U[str(e)].double() @ bank.init_A[str(e)].double()
    return X


def _dense(decision, E: int) -> torch.Tensor:
    if decision.indices is None:
        return decision.gates
    return torch.zeros(decision.gates.shape[0], E).scatter(1, decision.indices, decision.gates)


def _tangent_ref(U: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """float64 P_T(G) = U U^T G + G V V^T - U U^T G V V^T."""
    U, V, G = U.double(), V.double(), G.double()
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


def _check_manifold(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, r: int) -> None:
    eye = torch.eye(r, dtype=torch.float64)
    assert (U.detach().double().T @ U.detach().double() - eye).abs().max() < TOL
    assert (V.detach().double().T @ V.detach().double() - eye).abs().max() < TOL
    X = U.detach().double() @ S.detach().double() @ V.detach().double().T
    assert int(torch.linalg.matrix_rank(X)) == r


# ---------------------------------------------------------------------------------------------- the kind
def test_zero_init_is_a_zero_delta_on_orthonormal_bases_and_only_the_probes_train():
    model = _lin_model()
    bank = model.routed_layers()["lin"].bank
    assert isinstance(bank, RiemannLoRABank) and bank.kind == "riemann_lora"
    assert torch.count_nonzero(bank.delta_weight([1.0, 1.0, 1.0])) == 0
    for e in range(3):
        U, S, V = bank.point(e)
        assert not (U.requires_grad or S.requires_grad or V.requires_grad) and torch.count_nonzero(S) == 0
        assert (U.T @ U - torch.eye(3)).abs().max() < TOL and (V.T @ V - torch.eye(3)).abs().max() < TOL
    assert {id(p) for p in model.trainable_parameters()} >= {id(p) for e in range(3) for p in bank.expert_parameters(e)}
    assert not any(k.split(".")[0] in ("Z_left", "Z_right") for k in bank.state_dict())  # the probes are not saved
    with pytest.raises(MoLoRAError, match="'riemann_lora'.*shared_a=True is not allowed"):
        MoLoRAConfig(target_modules=["lin"], expert_kind="riemann_lora", shared_a=True)
    with pytest.raises(ValueError, match="U must have orthonormal columns"):
        bank.add_expert(3, 6.0, U=torch.ones(12, 3), S=torch.eye(3), V=random_orthonormal(16, 3))
    assert bank.num_experts == 3


@pytest.mark.parametrize("router,top_k", [("soft", None), ("topk", 2)])
def test_probe_gradients_are_the_euclidean_products_and_give_the_float64_tangent_projection(router, top_k):
    model = _lin_model(router=router, top_k=top_k)
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    _random_points(bank)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        g = _dense(layer.router(x, molora.RoutingSignals()), 3).double().reshape(2, 7, 3)
    target = torch.randn(2, 7, 12)
    y = model(x)
    nn.functional.mse_loss(y, target).backward()
    # float64 reference: the experts as dense leaves X_e, the loss's gradient with respect to each
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    X = [_point64(bank, e).requires_grad_() for e in range(3)]
    ref = x.double() @ W.T + b
    for e in range(3):
        ref = ref + g[..., e:e + 1] * float(bank.scaling[e]) * (x.double() @ X[e].T)
    torch.testing.assert_close(y.detach().double(), ref.detach(), atol=TOL, rtol=TOL)
    nn.functional.mse_loss(ref, target.double()).backward()
    for e in range(3):
        U, _, V = (t.detach().double() for t in bank.point(e))
        G = X[e].grad
        GV, GtU = bank.euclidean_products(e)
        torch.testing.assert_close(GV.double(), G @ V, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(GtU.double(), G.T @ U, atol=1e-6, rtol=1e-4)
        dA, dB = tangent_from_products(*(t.detach().double() for t in (bank.U[e], GV, GtU)))
        torch.testing.assert_close(tangent_matrix(U, V, dA, dB), _tangent_ref(U, V, G), atol=1e-6, rtol=1e-4)
        assert (U.T @ dA).abs().max() < 1e-6  # the tangent parametrisation's gauge
        assert (_tangent_ref(U, V, G) - G).abs().max() > 1e-3  # the projection is not the identity here


def test_retraction_equals_the_float64_truncated_svd():
    g = torch.Generator().manual_seed(3)
    m, n, r = 20, 15, 4
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    S = torch.randn(r, r, generator=g)
    dA, dB = project_tangent(U, V, torch.randn(m, n, generator=g))
    U2, sigma, V2 = retract(U, S, V, 0.7 * dA, 0.7 * dB)
    Y = (U @ S @ V.T).double() + 0.7 * tangent_matrix(U, V, dA, dB).double()
    Uf, sf, Vhf = torch.linalg.svd(Y)
    ref = Uf[:, :r] @ torch.diag(sf[:r]) @ Vhf[:r]
    torch.testing.assert_close((U2 * sigma) @ V2.T, ref.float(), atol=TOL, rtol=0)
    torch.testing.assert_close(sigma.double(), sf[:r], atol=TOL, rtol=0)
    _check_manifold(U2, torch.diag(sigma), V2, r)
    # from S = 0 (the zero init: rank 0) the retraction lands on a rank-r point as well
    U3, s3, V3 = retract(U, torch.zeros(r, r), V, dA, dB)
    _check_manifold(U3, torch.diag(s3), V3, r)
    Uf, sf, Vhf = torch.linalg.svd(tangent_matrix(U, V, dA, dB).double())
    torch.testing.assert_close((U3 * s3) @ V3.T, (Uf[:, :r] * sf[:r] @ Vhf[:r]).float(), atol=TOL, rtol=0)


def test_riemannion_direction_is_the_projected_orthogonalisation():
    g = torch.Generator().manual_seed(4)
    m, n, r = 14, 11, 3
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q.double()
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q.double()
    dA, dB = project_tangent(U, V, torch.randn(m, n, generator=g).double())
    xi = tangent_matrix(U, V, dA, dB)
    Ux, sx, Vhx = torch.linalg.svd(xi)
    ortho = Ux[:, :2 * r] @ Vhx[:2 * r]  # the 2r non-zero singular values set to 1
    oA, oB = orthogonalize_tangent(U, V, dA, dB)
    torch.testing.assert_close(tangent_matrix(U, V, oA, oB), _tangent_ref(U, V, ortho), atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------- the optimiser
@pytest.mark.parametrize("options", [{}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.9, "normalize": True},
                                     {"momentum": 0.9, "orthogonalize": True, "weight_decay": 1e-3}])
def test_bank_steps_stay_orthonormal_rank_r_and_fit_a_routed_regression(options):
    model = _lin_model(num_experts=3, rank=3, router="soft", bias=False)
    layer = model.routed_layers()["lin"]
    with torch.no_grad():
        layer.base_layer.weight.zero_()
    gen = torch.Generator().manual_seed(1)
    target_W = torch.randn(12, 3, generator=gen) @ torch.randn(3, 16, generator=gen) / 3
    X = torch.randn(128, 16, generator=gen)
    Y = X @ target_W.T
    lr = 0.05 if options.get("orthogonalize") or options.get("normalize") else 0.5  # unit-scale directions
    opt = RiemannianSGD(model, lr=lr, **options)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        for e in range(3):
            _check_manifold(*layer.bank.point(e), 3)
    assert losses[-1] < 0.1 * losses[0]
    for e in range(3):  # the optimiser never writes the probes
        assert torch.count_nonzero(layer.bank.Z_left[e]) == 0 and torch.count_nonzero(layer.bank.Z_right[e]) == 0


@pytest.mark.parametrize("options", [{"momentum": 0.8}, {"momentum": 0.8, "orthogonalize": True},
                                     {"momentum": 0.5, "dampening": 0.5, "normalize": True, "weight_decay": 0.01}])
def test_a_step_does_not_depend_on_the_factorisation(options):
    """The same X = U S V^T factored with rotated bases takes the same steps (momentum included)."""
    g = torch.Generator().manual_seed(5)
    m, n, r = 18, 13, 3
    U = torch.linalg.qr(torch.randn(m, r, generator=g).double()).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g).double()).Q
    S = torch.randn(r, r, generator=g).double()
    Q1 = torch.linalg.qr(torch.randn(r, r, generator=g).double()).Q
    Q2 = torch.linalg.qr(torch.randn(r, r, generator=g).double()).Q
    a = (U.clone(), S.clone(), V.clone())
    b = (U @ Q1, Q1.T @ S @ Q2, V @ Q2)
    target = torch.randn(m, n, generator=g).double()
    opt_a = RiemannianSGD([a], lr=0.1, **options)
    opt_b = RiemannianSGD([b], lr=0.1, **options)

    def grad(p):  # a non-quadratic loss: its gradient at X
        X = p[0] @ p[1] @ p[2].T
        return torch.tanh(X) - target

    for _ in range(4):
        opt_a.step(grads=[grad(a)])
        opt_b.step(grads=[grad(b)])
        torch.testing.assert_close(a[0] @ a[1] @ a[2].T, b[0] @ b[1] @ b[2].T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.3])
def test_low_rank_matrix_recovery_converges_from_the_zero_init(momentum):
    g = torch.Generator().manual_seed(7)
    m, n, r = 30, 20, 3
    M = torch.randn(m, r, generator=g).double() @ torch.randn(r, n, generator=g).double()
    point = (random_orthonormal(m, r, dtype=torch.float64), torch.zeros(r, r, dtype=torch.float64),
             random_orthonormal(n, r, dtype=torch.float64))
    opt = RiemannianSGD([point], lr=0.5, momentum=momentum)
    losses = []
    for _ in range(60):
        X = point[0] @ point[1] @ point[2].T
        losses.append(0.5 * float((X - M).square().sum()))
        opt.step(grads=[X - M])
        _check_manifold(*point, r)
    if momentum == 0:
        above = [v for v in losses if v > 1e-18 * losses[0]]  # down to the float64 floor
        assert len(above) > 20 and all(b < a for a, b in zip(above, above[1:]))  # plain Riemannian GD: monotone
    assert losses[-1] < 1e-20 * losses[0]  # linear convergence to the exact rank-r target


def test_optimizer_state_round_trip_continues_the_same_trajectory():
    g = torch.Generator().manual_seed(9)
    m, n, r = 10, 8, 2
    M = torch.randn(m, n, generator=g).double()
    a = (random_orthonormal(m, r, dtype=torch.float64), torch.eye(r, dtype=torch.float64),
         random_orthonormal(n, r, dtype=torch.float64))
    opt_a = RiemannianSGD([a], lr=0.2, momentum=0.9, normalize=True)
    for _ in range(3):
        opt_a.step(grads=[a[0] @ a[1] @ a[2].T - M])
    b = tuple(t.clone() for t in a)
    opt_b = RiemannianSGD([b], lr=0.2, momentum=0.9, normalize=True)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    fresh = tuple(t.clone() for t in a)
    opt_fresh = RiemannianSGD([fresh], lr=0.2, momentum=0.9, normalize=True)  # no history: a different step
    for p, opt in ((a, opt_a), (b, opt_b), (fresh, opt_fresh)):
        opt.step(grads=[p[0] @ p[1] @ p[2].T - M])
    torch.testing.assert_close(a[0] @ a[1] @ a[2].T, b[0] @ b[1] @ b[2].T, atol=1e-12, rtol=0)
    assert (a[0] @ a[1] @ a[2].T - fresh[0] @ fresh[1] @ fresh[2].T).abs().max() > 1e-3


def test_mixed_ranks_pad_exactly_and_step_in_rank_batches():
    model = _lin_model(num_experts=2, rank=3, router="soft")
    model.add_expert("small", rank=2, alpha=4.0)
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    assert bank.ranks == [3, 3, 2]
    _random_points(bank)
    bank.init_loi_(2, torch.randn(12, 16, generator=torch.Generator().manual_seed(1)), scale=0.2)
    bank.set_point_(2, *(t.detach() for t in loi_point(torch.randn(12, 16), 2, 1.0)))
    x = torch.randn(6, 16)
    with torch.no_grad():
        g = layer.router(x, molora.RoutingSignals()).gates.double()
        y = model(x)
    ref = x.double() @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    for e in range(3):
        ref = ref + g[:, e:e + 1] * float(bank.scaling[e]) * (x.double() @ _point64(bank, e).T)
        torch.testing.assert_close(bank.delta_weight([float(e == k) for k in range(3)]).double(),
                                   float(bank.scaling[e]) * _point64(bank, e), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.double(), ref, atol=TOL, rtol=TOL)
    A, B = bank.expert_factors(2)
    assert A.shape == (4, 16) and B.shape == (12, 4)  # its point and its offset, no padding
    model(x).square().sum().backward()
    RiemannianSGD(model, lr=0.05, momentum=0.5).step()
    for e in range(3):
        _check_manifold(*bank.point(e), bank.ranks[e])


def test_euclidean_training_of_the_probes_is_refused():
    model = _lin_model(router="soft")
    bank = model.routed_layers()["lin"].bank
    _random_points(bank)
    x = torch.randn(5, 16)
    adam = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    model(x).square().sum().backward()
    adam.step()
    with torch.no_grad(), pytest.raises(MoLoRAError, match="probes Z_left/Z_right were written.*RiemannianSGD"):
        model(x)
    with pytest.raises(MoLoRAError, match="probes Z_left/Z_right were written"):
        RiemannianSGD(model, lr=0.1).step()
    with pytest.raises(MoLoRAError, match="1 \\(U, S, V\\) triples need grads="):
        RiemannianSGD([bank.point(0)], lr=0.1).step()


def test_frozen_experts_are_not_stepped_and_their_stack_is_cached():
    model = _lin_model(router="soft")
    bank = model.routed_layers()["lin"].bank
    _random_points(bank)
    bank.set_trainable(False, experts=[1])
    opt = RiemannianSGD(model, lr=0.1)
    before = [t.detach().clone() for t in bank.point(1)]
    model(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, bank.point(1)))
    assert not torch.equal(bank.S[0].detach(), torch.zeros(3, 3))
    bank.set_trainable(False)
    first = bank.stacked()
    assert bank.stacked() is first and first[0].shape == (3, 3, 16)  # frozen: rank r, no probe block


# ---------------------------------------------------------------------------------------------- LOI
def test_loi_point_is_theorem_5_1_and_maximises_the_projected_gradient():
    g = torch.Generator().manual_seed(11)
    G = torch.randn(12, 16, generator=g).double()
    r = 3
    U, S, V = loi_point(G, r, 0.25)
    Uf, sf, Vhf = torch.linalg.svd(G)
    # U spans the top-r left singular vectors, V the right singular vectors r+1..2r (signs free)
    torch.testing.assert_close(U @ U.T, Uf[:, :r] @ Uf[:, :r].T, atol=1e-10, rtol=0)
    torch.testing.assert_close(V @ V.T, Vhf[r:2 * r].T @ Vhf[r:2 * r], atol=1e-10, rtol=0)
    torch.testing.assert_close(S, 0.25 * torch.eye(r, dtype=torch.float64))
    best = float(_tangent_ref(U, V, G).square().sum())
    assert best == pytest.approx(float(sf[:2 * r].square().sum()), rel=1e-10)  # the Eckart-Young bound is reached
    top_r = float(_tangent_ref(Uf[:, :r], Vhf[:r].T, G).square().sum())
    assert top_r == pytest.approx(float(sf[:r].square().sum()), rel=1e-10) and top_r < best
    with pytest.raises(ValueError, match=r"2 \* rank must be <= min\(d_out, d_in\) = 12"):
        loi_point(G, 7, 0.1)


def test_bank_loi_with_and_without_the_offset():
    model = _lin_model(router="soft")
    bank = model.routed_layers()["lin"].bank
    G = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    bank.init_loi_(0, G, scale=0.1)  # the paper's W' = W - dW0: the delta stays 0
    bank.init_loi_(1, G, scale=0.1, subtract_init=False)  # the delta starts at dW0 itself
    assert bank.has_offset(0) and not bank.has_offset(1)
    assert float(bank.delta_weight([1.0, 0.0, 0.0]).abs().max()) < 1e-7
    U, S, V = loi_point(G, 3, 0.1)
    torch.testing.assert_close(bank.delta_weight([0.0, 1.0, 0.0]), U @ S @ V.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.S[1].detach(), torch.eye(3) * 0.1 / float(bank.scaling[1]))
    with torch.no_grad():
        A, B = bank.stacked()
    assert A.shape == (3, 6, 16) and B.shape == (3, 12, 6)  # the offset block: rank 2 r
    assert torch.count_nonzero(B[1][:, 3:]) == 0 and torch.count_nonzero(B[0][:, 3:]) > 0


def test_riemann_loi_takes_the_full_weight_gradient_and_the_first_step_sees_its_truncated_svd():
    model = _lin_model(num_experts=2, router="soft", rank=2)
    layer = model.routed_layers()["lin"]
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    t = torch.randn(32, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(x)

    def closure():
        return nn.functional.mse_loss(model(x), t)

    grads = riemann_loi_(model, closure, scale=-0.05)
    W = layer.base_layer.weight.detach().double().requires_grad_()
    nn.functional.mse_loss(x.double() @ W.T + layer.base_layer.bias.double(), t.double()).backward()
    torch.testing.assert_close(grads["lin"].double(), W.grad, atol=1e-6, rtol=1e-5)
    assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None
    assert all(p.grad is None for p in model.parameters())  # the gradients are as they were
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)  # subtract_init: the output is unchanged
    # at the LOI point the Riemannian gradient is the rank-2r truncated SVD of s g_e G (Appendix A)
    closure().backward()
    Uf, sf, Vhf = torch.linalg.svd(W.grad)
    trunc = Uf[:, :4] * sf[:4] @ Vhf[:4]
    gates = layer.router(x, molora.RoutingSignals()).gates.detach().double()
    for e in range(2):
        U, _, V = (p.detach().double() for p in layer.bank.point(e))
        dA, dB = tangent_from_products(U, *(p.double() for p in layer.bank.euclidean_products(e)))
        scale = float(layer.bank.scaling[e])
        # soft routing: G_e = s_e sum_t g_te (dL/dy_t) x_t^T, not a multiple of G; compare with its own reference
        Ge = scale * ((2 / t.numel()) * (model(x) - t).detach().double() * gates[:, e:e + 1]).T @ x.double()
        torch.testing.assert_close(tangent_matrix(U, V, dA, dB), _tangent_ref(U, V, Ge), atol=1e-6, rtol=1e-4)
    # one expert alone: its Riemannian gradient is exactly truncSVD_2r(s G)
    single = _lin_model(num_experts=1, router="soft", rank=2)
    riemann_loi_(single, lambda: nn.functional.mse_loss(single(x), t), scale=-0.05)
    nn.functional.mse_loss(single(x), t).backward()
    bank = single.routed_layers()["lin"].bank
    U, _, V = (p.detach().double() for p in bank.point(0))
    dA, dB = tangent_from_products(U, *(p.double() for p in bank.euclidean_products(0)))
    torch.testing.assert_close(tangent_matrix(U, V, dA, dB), float(bank.scaling[0]) * trunc, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- shared behaviour
def test_save_load_round_trip_keeps_points_and_offsets(tmp_path):
    model = _lin_model(router="topk", top_k=2)
    bank = model.routed_layers()["lin"].bank
    _random_points(bank)
    bank.init_loi_(2, torch.randn(12, 16), scale=0.3)
    bank.set_point_(2, *(t.detach() for t in bank.point(0)))  # moved away from its offset
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        ref = model(x)
    model.save_pretrained(str(tmp_path / "ck"))
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12))
    base.lin.load_state_dict(model.routed_layers()["lin"].base_layer.state_dict())
    loaded = molora.MoLoRAModel.from_pretrained(base, str(tmp_path / "ck"))
    bank2 = loaded.routed_layers()["lin"].bank
    assert type(bank2) is RiemannLoRABank and [bank2.has_offset(e) for e in range(3)] == [False, False, True]
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    for (k, v), (k2, v2) in zip(bank2.state_dict().items(), bank.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert all(torch.count_nonzero(p) == 0 and p.requires_grad for p in bank2.Z_left)


def test_topk_routing_is_one_kernel_call_with_the_probe_block_in_training(monkeypatch):
    from molora import layer as layer_module

    model = _lin_model(num_experts=4, rank=3, router="topk", top_k=2)
    layer = model.routed_layers()["lin"]
    _random_points(layer.bank)
    calls = []
    expand = layer_module.kernels.expand
    monkeypatch.setattr(layer_module.kernels, "expand", lambda *a, **k: calls.append(tuple(a[3].shape)) or expand(*a, **k))
    x = torch.randn(3, 5, 16)
    y = model(x)
    with torch.no_grad():
        y_eval = model(x)
        g = _dense(layer.router(x, molora.RoutingSignals()), 4).double().reshape(3, 5, 4)
    assert calls == [(4, 6, 16), (4, 3, 16)]  # training: [S V^T ; V^T] (rank 2r); evaluation: rank r
    torch.testing.assert_close(y.detach(), y_eval, atol=1e-6, rtol=0)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    ref = x.double() @ W.T + b
    for e in range(4):
        ref = ref + g[..., e:e + 1] * float(layer.bank.scaling[e]) * (x.double() @ _point64(layer.bank, e).T)
    torch.testing.assert_close(y_eval.double(), ref, atol=TOL, rtol=TOL)
    y.square().sum().backward()
    RiemannianSGD(model, lr=0.01, momentum=0.9).step()
    for e in range(4):
        _check_manifold(*layer.bank.point(e), 3)


def test_merge_equals_unmerged_and_peft_export_reloads_equal(tmp_path):
    bert = tiny_bert()
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query", "value"], num_experts=3, rank=4,
                                                               router="static", expert_kind="riemann_lora",
                                                               router_kwargs={"weights": [0.5, 0.0, -1.0]}))
    for i, layer in enumerate(model.routed_layers().values()):
        _random_points(layer.bank, seed=i)
        layer.bank.init_loi_(2, torch.randn(32, 32, generator=torch.Generator().manual_seed(i)), scale=0.2)
        layer.bank.set_point_(2, *(t.detach() for t in layer.bank.point(1)))
    inputs = model_inputs("bert")
    with torch.no_grad():
        routed = model(**inputs).last_hidden_state
    for layer in model.routed_layers().values():
        bank = layer.bank
        ref = sum(w * float(bank.scaling[e]) * _point64(bank, e) for e, w in ((0, 0.5), (2, -1.0)))
        torch.testing.assert_close(bank.delta_weight([0.5, 0.0, -1.0]).double(), ref, atol=1e-6, rtol=0)
    model.export_peft(tmp_path / "peft", [0.5, 0.0, -1.0])
    model.merge([0.5, 0.0, -1.0])
    with torch.no_grad():
        merged = model(**inputs).last_hidden_state
    torch.testing.assert_close(merged, routed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(peft_output(bert, tmp_path / "peft", inputs), merged, atol=1e-5, rtol=1e-5)


def test_loi_on_a_conv1d_model_reads_the_transposed_gradient_and_trains():
    from helpers import tiny_gpt2

    gpt2 = tiny_gpt2()
    model = get_molora_model(gpt2, MoLoRAConfig(target_modules=["c_attn"], num_experts=2, rank=2, router="topk",
                                                top_k=1, expert_kind="riemann_lora"))
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        before = model(**inputs).logits

    def closure():
        return model(**inputs).logits.square().mean()

    grads = riemann_loi_(model, closure)
    for name, layer in model.routed_layers().items():
        assert layer.transposed and grads[name].shape == (96, 32)  # [d_out, d_in], from Conv1D's [d_in, d_out]
        Uf = torch.linalg.svd(grads[name].double())[0]
        U = layer.bank.U[0].detach().double()
        torch.testing.assert_close(U @ U.T, Uf[:, :2] @ Uf[:, :2].T, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=0)
    opt = RiemannianSGD(model, lr=1.0, momentum=0.9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = closure()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    for layer in model.routed_layers().values():
        for e in range(2):
            _check_manifold(*layer.bank.point(e), 2)
