"""The torch path of routed_lora against the float64 reference loop (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from molora.kernels import routed_lora


def _case(T=7, d_in=10, d_out=9, E=4, r=3, k=None, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(*((r, d_in) if shared else (E, r, d_in)), generator=g, dtype=torch.float64)
    B = torch.randn(E, d_out, r, generator=g, dtype=torch.float64)
    if k is None:
        return x, A, B, torch.softmax(torch.randn(T, E, generator=g, dtype=torch.float64), -1), None
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    idx[0] = -1  # a token with no expert
    return x, A, B, torch.rand(T, k, generator=g, dtype=torch.float64), idx


@pytest.mark.parametrize("k", [None, 1, 2, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_torch_matches_reference_with_gradients(k, shared):
    x, A, B, gates, idx = _case(k=k, shared=shared)
    scaling = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.float64)
    mask[1, 2] = 0  # expert 1 has rank 2
    outs, grads = [], []
    for backend in ("reference", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
        y = routed_lora(*leaves, indices=idx, scaling=scaling, backend=backend, rank_mask=mask)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)


def test_reference_against_hand_computation():
    x = torch.tensor([[1.0, 2.0]])
    A = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # E=2, r=1
    B = torch.tensor([[[2.0]], [[3.0]]])  # d_out=1
    y = routed_lora(x, A, B, torch.tensor([[0.25, 0.75]]), scaling=2.0, backend="reference")
    # 2 * (0.25 * 2 * 1 + 0.75 * 3 * 2) = 2 * (0.5 + 4.5) = 10
    assert y.item() == 10.0


def test_gradcheck_reference():
    x, A, B, gates, idx = _case(T=3, d_in=4, d_out=3, E=3, r=2, k=2)
    torch.autograd.gradcheck(lambda *t: routed_lora(*t, indices=idx, backend="reference"),
                             [t.requires_grad_() for t in (x, A, B, gates)])


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(3)), "x must be"),
    (dict(A=torch.zeros(4, 3, 11)), "A must be"),
    (dict(gates=torch.zeros(7, 5)), "dense gates"),
    (dict(indices=torch.full((7, 2), 4), gates=torch.zeros(7, 2)), "indices must be in"),
    (dict(scaling=torch.ones(3)), "scaling"),
    (dict(backend="cuda-magic"), "unknown backend"),
])
def test_validation_errors(bad, match):
    x, A, B, gates, idx = _case()
    args = dict(x=x, A=A, B=B, gates=gates, indices=idx)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        routed_lora(**args)
