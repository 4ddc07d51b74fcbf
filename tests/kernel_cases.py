"""Routing cases shared by the kernel tests: random and adversarial top-k decisions.

Each case gives ``x [T, d_in]``, ``A`` (``[E, r, d_in]`` or shared ``[r, d_in]``), ``B``, gates
and indices (``None`` = dense gates), per-expert scaling and a rank mask, in float64; the
tests cast to the dtype under test and compare against the float64 reference loop.
"""

from __future__ import annotations

import torch

from molora.kernels import routed_lora


def make_case(T=37, d_in=45, d_out=29, E=4, r=4, k=2, shared=False, routing="random", mixed_ranks=False, seed=0):
    """T, d_in, d_out are deliberately not multiples of any block size (16, 32, 64)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(T, d_in, **f64) * 0.5
    A = torch.randn(*((r, d_in) if shared else (E, r, d_in)), **f64) / d_in**0.5
    B = torch.randn(E, d_out, r, **f64) * 0.3
    scaling = torch.linspace(0.5, 2.0, E, dtype=torch.float64)
    mask = None
    if mixed_ranks:  # expert e keeps its first max(1, r - e) rank components
        mask = torch.zeros(E, r, dtype=torch.float64)
        for e in range(E):
            mask[e, : max(1, r - e)] = 1
    if k is None:
        return x, A, B, torch.softmax(torch.randn(T, E, **f64), -1), None, scaling, mask
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, **f64)
    if routing == "empty_experts":  # only experts 0 and 1 (when k allows) get tokens
        idx = torch.stack([torch.randperm(min(E, max(k, 2)), generator=g)[:k] for _ in range(T)])
    elif routing == "one_expert":  # every token's first slot is expert E-1, others dropped
        idx = torch.full((T, k), -1)
        idx[:, 0] = E - 1
    elif routing == "dropped":  # some tokens have no expert at all, some one slot dropped
        idx[::3] = -1
        idx[1::5, 0] = -1
    elif routing == "zero_gates":
        gates[::2] = 0.0
    return x, A, B, gates, idx, scaling, mask


def run(case, dtype, backend, **kw):
    """Output and gradients (x, A, B, gates) of ``sum(y * w)`` for a fixed random ``w``.

    ``backend``: a ``routed_lora`` backend name, or a function with the backends' signature.
    """
    x, A, B, gates, idx, scaling, mask = case
    leaves = [t.to(dtype).clone().requires_grad_() for t in (x, A, B, gates)]
    mask = None if mask is None else mask.to(dtype)
    if callable(backend):
        y = backend(*leaves, idx, scaling.to(dtype), mask, **kw)
    else:
        y = routed_lora(*leaves, indices=idx, scaling=scaling.to(dtype), backend=backend, rank_mask=mask, **kw)
    # upstream gradient of O(0.25): with T ~ 40 the weight gradients stay O(1), where fp16's
    # ~3 significant digits make the 5e-3 tolerance meaningful
    w = 0.25 * torch.randn(y.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    (y * w.to(dtype)).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


def assert_matches_reference(case, dtype, backend, atol, rtol=0.0, **kw):
    got = run(case, dtype, backend, **kw)
    want = run(case, torch.float64, "reference")
    for name, a, b in zip(["y", "dx", "dA", "dB", "dgates"], got, want):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{getattr(backend, '__name__', backend)} {name}: {m}")
