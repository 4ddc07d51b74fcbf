"""LoFT (molora.optim.LoFT) against an independent float64 loop of the paper's update, its
full-rank limit (AdamW on the full weight), banks of experts, state_dict round trips, and the
refusals (non-finite gradients, bad input)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from molora import ExpertBank, MoLoRAConfig, get_molora_model
from molora.errors import MoLoRAError
from molora.kernels import routed_lora_reference
from molora.kinds import DoRABank
from molora.optim import LoFT

F64 = torch.float64


def regression(d_in: int, d_out: int, n: int = 24, seed: int = 0):
    """A random least-squares problem ``L(W) = mean((X (W0 + W)^T - Y)^2)`` and its gradient in ``W``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    Y = torch.randn(n, d_out, generator=g, dtype=F64)
    W0 = 0.3 * torch.randn(d_out, d_in, generator=g, dtype=F64)

    def loss(W: torch.Tensor) -> torch.Tensor:
        return ((X @ (W0 + W).T - Y) ** 2).mean()

    def grad(W: torch.Tensor) -> torch.Tensor:  # by hand, not autograd
        return 2.0 / (n * d_out) * (X @ (W0 + W).T - Y).T @ X

    return loss, grad


def loft_reference(A, B, grad_w, steps, *, s, lr, betas, eps, wd, ridge, alternate):
    """The paper's LoFT-AdamW, written out with loops: each factor's moments stay in the basis of
    the partner they were built with, and are carried to the current partner lazily at the start
    of the next step (as the official code keeps a copy of the partner). Returns (A, B) per step."""
    b1, b2 = betas
    dA, dB = ridge
    A, B = A.clone(), B.clone()
    r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
    eye = torch.eye(r, dtype=F64)
    mA, QA = torch.zeros(r, d_in, dtype=F64), torch.zeros(d_in, r, r, dtype=F64)
    mB, QB = torch.zeros(d_out, r, dtype=F64), torch.zeros(d_out, r, r, dtype=F64)
    basis_of_A = basis_of_B = None  # the partner the moments of A (of B) are expressed in
    out = []
    for t in range(1, steps + 1):
        G = grad_w(s * B @ A)
        gA, gB = s * B.T @ G, s * G @ A.T
        SB = torch.linalg.inv(B.T @ B + dA * eye)
        SA = torch.linalg.inv(A @ A.T + dB * eye)
        if basis_of_A is not None and not torch.equal(basis_of_A, B):
            R = SB @ B.T @ basis_of_A
            mA = R @ mA
            QA = torch.stack([R @ QA[j] @ R.T for j in range(d_in)])
        if basis_of_B is not None and not torch.equal(basis_of_B, A):
            R = basis_of_B @ A.T @ SA
            mB = mB @ R
            QB = torch.stack([R.T @ QB[i] @ R for i in range(d_out)])
        basis_of_A, basis_of_B = B.clone(), A.clone()
        hA, hB = SB @ gA / s, gB @ SA / s
        mA = b1 * mA + (1 - b1) * hA
        mB = b1 * mB + (1 - b1) * hB
        QA = torch.stack([b2 * QA[j] + (1 - b2) * torch.outer(hA[:, j], hA[:, j]) for j in range(d_in)])
        QB = torch.stack([b2 * QB[i] + (1 - b2) * torch.outer(hB[i], hB[i]) for i in range(d_out)])
        c1, c2 = 1 - b1**t, 1 - b2**t
        new_A, new_B = A, B
        if not alternate or t % 2 == 0:
            V = torch.tensor([[max(float(B[i] @ QA[j] @ B[i]), 0.0) for j in range(d_in)] for i in range(d_out)], dtype=F64)
            U = (B @ mA / c1) / ((V / c2).sqrt() + eps)
            new_A = (1 - lr * wd) * A - lr / s * SB @ B.T @ U
        if not alternate or t % 2 == 1:
            V = torch.tensor([[max(float(A[:, j] @ QB[i] @ A[:, j]), 0.0) for j in range(d_in)] for i in range(d_out)], dtype=F64)
            U = (mB @ A / c1) / ((V / c2).sqrt() + eps)
            new_B = (1 - lr * wd) * B - lr / s * U @ A.T @ SA
        A, B = new_A, new_B
        out.append((A.clone(), B.clone()))
    return out


def run_loft(opt, A, B, s, loss, steps):
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss(s * B @ A).backward()
        opt.step()
        out.append((A.detach().clone(), B.detach().clone()))
    return out


@pytest.mark.parametrize("alternate", [True, False])
@pytest.mark.parametrize("b_init", ["zero", "random"])
def test_matches_float64_reference_loop(alternate, b_init):
    d_in, d_out, r, s = 6, 5, 2, 2.5
    loss, grad_w = regression(d_in, d_out)
    g = torch.Generator().manual_seed(1)
    A0 = torch.randn(r, d_in, generator=g, dtype=F64) / d_in**0.5
    B0 = torch.zeros(d_out, r, dtype=F64) if b_init == "zero" else 0.5 * torch.randn(d_out, r, generator=g, dtype=F64)
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, ridge=(1e-6, 1e-8), alternate=alternate)
    expected = loft_reference(A0, B0, grad_w, 7, s=s, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                              wd=hyper["weight_decay"], ridge=hyper["ridge"], alternate=alternate)
    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    got = run_loft(LoFT([(A, B, s)], **hyper), A, B, s, loss, 7)
    for t, ((ea, eb), (ga, gb)) in enumerate(zip(expected, got)):
        torch.testing.assert_close(ga, ea, atol=1e-10, rtol=0, msg=f"A after step {t + 1}")
        torch.testing.assert_close(gb, eb, atol=1e-10, rtol=0, msg=f"B after step {t + 1}")
    # the schedule: B moves on odd steps, A on even ones
    if alternate:
        assert torch.equal(got[0][0], A0) and not torch.equal(got[0][1], B0)
        assert torch.equal(got[1][1], got[0][1]) and not torch.equal(got[1][0], got[0][0])
    assert loss(s * B @ A) < loss(s * B0 @ A0)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_full_rank_limit_is_adamw_on_the_full_weight(betas):
    # The paper's sanity check: r = d_in = d_out, invertible factors, no ridge: s B A follows AdamW on W.
    d, s = 5, 1.5
    loss, _ = regression(d, d, seed=3)
    g = torch.Generator().manual_seed(4)
    A0 = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    B0 = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    W = nn.Parameter((s * B0 @ A0).clone())
    kw = dict(lr=2e-2, betas=betas, eps=1e-4, weight_decay=0.05)
    loft, adamw = LoFT([(A, B, s)], ridge=0.0, **kw), torch.optim.AdamW([W], **kw)
    for t in range(8):
        for opt, w in ((loft, lambda: s * B @ A), (adamw, lambda: W)):
            opt.zero_grad()
            loss(w()).backward()
            opt.step()
        torch.testing.assert_close(s * B.detach() @ A.detach(), W.detach(), atol=1e-10, rtol=0, msg=f"step {t + 1}")
    assert not torch.allclose(W.detach(), s * B0 @ A0, atol=1e-3)  # it moved


def test_first_step_is_the_sign_like_step_of_the_projected_gradient():
    # Step 1 moves B only: with A's rows orthonormal, U = P / (|P| + eps) for P = G A^T A and
    # B_1 = -(lr / s) U A^T (bias corrections cancel at t = 1: m / c1 = h, V / c2 = h^2).
    d_in, d_out, r, s, lr, eps = 7, 4, 3, 2.0, 0.1, 1e-3
    loss, grad_w = regression(d_in, d_out, seed=5)
    A0 = torch.linalg.qr(torch.randn(d_in, r, generator=torch.Generator().manual_seed(6), dtype=F64)).Q.T.contiguous()
    A, B = nn.Parameter(A0.clone()), nn.Parameter(torch.zeros(d_out, r, dtype=F64))
    run_loft(LoFT([(A, B, s)], lr=lr, eps=eps, ridge=(1e-6, 0.0)), A, B, s, loss, 1)
    P = grad_w(torch.zeros(d_out, d_in, dtype=F64)) @ A0.T @ A0
    torch.testing.assert_close(B.detach(), -(lr / s) * (P / (P.abs() + eps)) @ A0.T, atol=1e-12, rtol=0)
    assert torch.equal(A.detach(), A0)


def routed_loss(bank: ExpertBank, x: torch.Tensor, gates: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    A, B = bank.stacked()
    return ((routed_lora_reference(x, A, B, gates, scaling=bank.scaling.to(x.dtype)) - y) ** 2).mean()


def test_bank_steps_each_expert_as_its_own_pair():
    torch.manual_seed(0)
    bank = ExpertBank(6, 5, dtype=F64)
    for r, alpha in [(2, 4.0), (3, 3.0), (2, 1.0), (2, 2.0)]:
        bank.add_expert(r, alpha, B=0.1 * torch.randn(5, r, dtype=F64))
    bank.set_trainable(False, [2])
    frozen = [p.detach().clone() for p in bank.expert_parameters(2)]
    start = [p.detach().clone() for p in bank.parameters()]
    x, y, gates = torch.randn(16, 6, dtype=F64), torch.randn(16, 5, dtype=F64), torch.rand(16, 4, dtype=F64)
    opt = LoFT(bank, lr=5e-2, weight_decay=0.01)
    assert opt.param_groups[0]["names"] == ["bank expert 0", "bank expert 1", "bank expert 3"]
    assert opt.param_groups[0]["scalings"] == [2.0, 1.0, 1.0]
    # the same experts as separate pairs, each under its own optimizer
    clones = {e: (nn.Parameter(bank.A[e].detach().clone()), nn.Parameter(bank.B[e].detach().clone()))
              for e in (0, 1, 3)}
    singles = {e: LoFT([(a, b, float(bank.scaling[e]))], lr=5e-2, weight_decay=0.01) for e, (a, b) in clones.items()}
    for _ in range(5):
        opt.zero_grad()
        routed_loss(bank, x, gates, y).backward()
        for e, (a, b) in clones.items():  # the clones equal the bank's factors, so these are their gradients
            a.grad, b.grad = bank.A[e].grad.clone(), bank.B[e].grad.clone()
            singles[e].step()
        opt.step()
        for e, (a, b) in clones.items():
            assert torch.equal(a, bank.A[e]) and torch.equal(b, bank.B[e]), e
    assert all(torch.equal(p, f) for p, f in zip(bank.expert_parameters(2), frozen))
    moved = [not torch.equal(p, q) for p, q in zip(bank.parameters(), start)]
    assert sum(moved) == 6 and opt.state[bank.A[0]]["step"] == 5  # the 3 trainable experts' A and B


def test_model_banks_are_collected_by_path():
    model = get_molora_model(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)),
                             MoLoRAConfig(target_modules=r"^[02]$", num_experts=3, rank=2, router="topk", top_k=2))
    opt = LoFT(model, lr=1e-3)
    names = opt.param_groups[0]["names"]
    assert len(names) == 6 and len(opt.param_groups[0]["params"]) == 12
    assert names[0].endswith("0.bank expert 0") and names[5].endswith("2.bank expert 2"), names
    x = torch.randn(5, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(opt.state[p]["step"] == 2 for p in opt.param_groups[0]["params"])


def test_state_dict_round_trip_continues_identically():
    d_in, d_out, r, s = 6, 4, 2, 0.5
    loss, _ = regression(d_in, d_out, seed=7)
    g = torch.Generator().manual_seed(8)
    A0, B0 = torch.randn(r, d_in, generator=g, dtype=F64), torch.randn(d_out, r, generator=g, dtype=F64)
    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    opt = LoFT([(A, B, s)], lr=1e-2, betas=(0.7, 0.9), weight_decay=0.1)
    run_loft(opt, A, B, s, loss, 3)  # odd: the next step moves A
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    A2, B2 = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())
    opt2 = LoFT([(A2, B2, 99.0)], lr=1.0)  # hyperparameters and scaling come from the saved state
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["scalings"] == [s] and opt2.param_groups[0]["lr"] == 1e-2
    assert opt2.state[A2]["step"] == 3
    ours, theirs = run_loft(opt, A, B, s, loss, 3), run_loft(opt2, A2, B2, s, loss, 3)
    for (a, b), (a2, b2) in zip(ours, theirs):
        assert torch.equal(a, a2) and torch.equal(b, b2)


def test_state_dict_of_another_optimizer_or_layout_is_refused():
    A, B = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(3, 2))
    opt = LoFT([(A, B)])
    adamw = torch.optim.AdamW([A, B])
    (B @ A).sum().backward()
    adamw.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(MoLoRAError, match="not a LoFT group"):
        opt.load_state_dict(adamw.state_dict())
    other = LoFT([(nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(3, 3)))])
    other.param_groups[0]["params"][0].grad = torch.ones(3, 5)
    other.param_groups[0]["params"][1].grad = torch.ones(3, 3)
    other.step()
    with pytest.raises(MoLoRAError, match="expected"):
        opt.load_state_dict(other.state_dict())
    assert opt.state_dict() == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_is_refused_and_nothing_changes(bad):
    loss, _ = regression(5, 4, seed=9)
    pairs = [(nn.Parameter(torch.randn(2, 5, dtype=F64)), nn.Parameter(torch.randn(4, 2, dtype=F64))) for _ in range(2)]
    opt = LoFT(pairs, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum(loss(B @ A) for A, B in pairs).backward()
        opt.step()
    params, state = [p.detach().clone() for pr in pairs for p in pr], copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    sum(loss(B @ A) for A, B in pairs).backward()
    pairs[1][1].grad[0, 1] = bad
    with pytest.raises(MoLoRAError, match=r"pair 1: the gradient of B \[4, 2\] has 1 NaN/inf entries; step refused"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip([p for pr in pairs for p in pr], params))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, st in state["state"].items():
        assert after["state"][k]["step"] == st["step"]
        assert all(torch.equal(after["state"][k][n], st[n]) for n in ("exp_avg", "row_products"))


def test_pairs_without_gradients_are_skipped_and_half_gradients_refused():
    (A, B), (C, D) = [(nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(3, 2))) for _ in range(2)]
    opt = LoFT([(A, B), (C, D)])
    (B @ A).sum().backward()
    opt.step()
    assert opt.state[A]["step"] == 1 and len(opt.state[C]) == 0  # C, D got no gradient: skipped
    A.grad = None
    before = B.detach().clone()
    with pytest.raises(MoLoRAError, match="pair 0: A has no gradient but its partner has one"):
        opt.step()
    assert torch.equal(B, before)


def test_bad_input_is_refused():
    A, B = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(3, 2))
    with pytest.raises(MoLoRAError, match="lone tensor"):
        LoFT([A, B])
    with pytest.raises(MoLoRAError, match="lone tensor"):
        LoFT(A)
    with pytest.raises(MoLoRAError, match=r"A must be \[r, d_in\] and B \[d_out, r\]; got A \[2, 5\], B \[2, 3\]"):
        LoFT([(A, nn.Parameter(torch.randn(2, 3)))])
    with pytest.raises(MoLoRAError, match="lr must be a finite number"):
        LoFT([(A, B)], lr=float("nan"))
    with pytest.raises(MoLoRAError, match="lr must be >= 0"):
        LoFT([(A, B)], lr=-1e-3)
    with pytest.raises(MoLoRAError, match=r"betas\[0\] must be < 1"):
        LoFT([(A, B)], betas=(1.0, 0.9))
    with pytest.raises(MoLoRAError, match="eps must be > 0"):
        LoFT([(A, B)], eps=0.0)
    with pytest.raises(MoLoRAError, match="alternate must be True or False"):
        LoFT([(A, B)], alternate=1)
    with pytest.raises(MoLoRAError, match="scaling of pair 0 must be > 0"):
        LoFT([(A, B, 0.0)])
    with pytest.raises(MoLoRAError, match="already optimised"):
        LoFT([(A, B), (A, nn.Parameter(torch.randn(3, 2)))])
    with pytest.raises(MoLoRAError, match="requires grad"):
        LoFT([(A, torch.randn(3, 2))])
    with pytest.raises(MoLoRAError, match="unknown options"):
        LoFT([{"params": [(A, B)], "momentum": 0.9}])
    hydra = ExpertBank(5, 3, shared_a=True, shared_rank=2)
    hydra.add_expert(2, 2.0)
    with pytest.raises(MoLoRAError, match="shares one A"):
        LoFT(hydra)
    dora = DoRABank(5, 3)
    with pytest.raises(MoLoRAError, match="kind 'dora'"):
        LoFT(dora)
    half = ExpertBank(5, 3)
    half.add_expert(2, 2.0)
    half.B[0].requires_grad_(False)
    with pytest.raises(MoLoRAError, match="only A is trainable"):
        LoFT(half)
    with pytest.raises(MoLoRAError, match="holds no expert bank"):
        LoFT(nn.Linear(3, 3))


def test_singular_gram_with_zero_ridge_is_refused_without_changes():
    A, B = nn.Parameter(torch.randn(2, 5, dtype=F64)), nn.Parameter(torch.zeros(3, 2, dtype=F64))
    opt = LoFT([(A, B)], ridge=0.0)
    (B @ A).sum().backward()
    with pytest.raises(MoLoRAError, match=r"B\^T B \+ 0 I is singular; use ridge > 0"):
        opt.step()
    assert len(opt.state[A]) == 0 and torch.count_nonzero(B) == 0


def test_bfloat16_factors_step_in_float32_and_stay_bfloat16():
    # The same factors and gradients in bfloat16 and float32: LoFT computes in float32, so one
    # bfloat16 step is the float32 step rounded; the factors and the state stay bfloat16.
    g = torch.Generator().manual_seed(10)
    A16 = nn.Parameter(torch.randn(3, 8, generator=g).to(torch.bfloat16))
    B16 = nn.Parameter((0.1 * torch.randn(6, 3, generator=g)).to(torch.bfloat16))
    A32, B32 = nn.Parameter(A16.detach().float()), nn.Parameter(B16.detach().float())
    grads = [torch.randn(3, 8, generator=g).to(torch.bfloat16), torch.randn(6, 3, generator=g).to(torch.bfloat16)]
    opt16, opt32 = LoFT([(A16, B16, 2.0)], lr=1e-2), LoFT([(A32, B32, 2.0)], lr=1e-2)
    B_start = B32.detach().clone()
    for params, opt in (((A16, B16), opt16), ((A32, B32), opt32)):
        for p, gr in zip(params, grads):
            p.grad = gr.to(p.dtype)
        opt.step()
    assert torch.equal(B16.detach(), B32.detach().to(torch.bfloat16)) and not torch.equal(B32.detach(), B_start)
    assert A16.dtype == B16.dtype == opt16.state[A16]["row_products"].dtype == opt16.state[B16]["exp_avg"].dtype == torch.bfloat16
    opt16.step()  # A moves, from bfloat16 state
    assert torch.isfinite(A16).all() and A16.dtype == torch.bfloat16
