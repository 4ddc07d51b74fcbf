"""One GEMM for several linear maps of one input (``shared_input_linear``), the router logits
computed in the dense shrink's GEMM (``routed_lora_with_router``) and the routed layer's use of
it: every output and gradient against plain autograd / the float64 reference loop."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_case
from torch import nn

from molora.bank import ExpertBank
from molora.kernels import routed_lora, routed_lora_with_router, shared_input_linear
from molora.kernels.torch_backend import routed_lora_torch_with_router
from molora.layer import RoutedLoRALinear
from molora.routers import SoftRouter, TopKRouter


def _grads(outputs, leaves, seed=7):
    # upstream gradients of O(0.25), as in kernel_cases.run: weight gradients stay O(1)
    g = torch.Generator().manual_seed(seed)
    ws = [0.25 * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]
    torch.autograd.backward(list(outputs), ws)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("sizes", [(5,), (12, 3), (1, 4, 2)])
def test_shared_input_linear_matches_separate_linears(dtype, atol, sizes):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(37, 45, generator=g, dtype=torch.float64)
    w0 = [torch.randn(n, 45, generator=g, dtype=torch.float64) / 7 for n in sizes]
    got, want = [], []
    for fn, sink in ((lambda x, ws: shared_input_linear(x, *ws), got), (lambda x, ws: [x @ w.T for w in ws], want)):
        x = x0.to(dtype).requires_grad_()
        ws = [w.to(dtype).requires_grad_() for w in w0]
        out = fn(x, ws)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        sink.extend([o.detach() for o in out] + _grads(out, [x, *ws]))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0)


def test_shared_input_linear_unused_output_and_frozen_weight():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 4, dtype=torch.float64)  # frozen
    z1, _ = shared_input_linear(x, w1, w2)  # the second output takes no part in the loss
    z1.sum().backward()
    torch.testing.assert_close(x.grad, w1.sum(0).expand(6, 4))
    torch.testing.assert_close(w1.grad, x.detach().sum(0).expand(3, 4))
    assert w2.grad is None
    with pytest.raises(ValueError, match="shared_input_linear"):
        shared_input_linear(x, torch.randn(3, 5))


def _route_fn(k, routing):
    """Softmax, top-k, renormalise; ``routing`` adds -1 slots or zero gates as the kernel cases do.
    The softmax runs in float64 (gates cast back to the logits' dtype) so that a low-precision run
    differs from the reference by the kernel's rounding, not by fp16 routing arithmetic."""
    def route(logits):
        probs = torch.softmax(logits.double(), -1)
        if k is None:
            return probs.to(logits.dtype), None
        gates, idx = probs.topk(k, -1)
        gates = (gates / gates.sum(-1, keepdim=True)).to(logits.dtype)
        if routing == "dropped":
            idx = idx.clone()
            idx[::3] = -1
            idx[1::5, 0] = -1
        elif routing == "zero_gates":
            gates = gates * (torch.arange(gates.shape[0]) % 2 == 1).unsqueeze(-1).to(gates.dtype)
        return gates, idx
    return route


def _with_router_run(fn, case, Wr0, dtype, route, use_out):
    x, A, B, _, _, s, mask = case
    leaves = [t.to(dtype).clone().requires_grad_() for t in (x, A, B, Wr0)]
    x, A, B, Wr = leaves
    out = x[:, : B.shape[1]] * 0.5 if use_out else None  # stands for the base output: tracked by autograd
    y = fn(x, A, B, Wr, route, s.to(dtype), None if mask is None else mask.to(dtype), out)
    grads = _grads([y], leaves)
    return [y.detach()] + grads


def _reference_with_router(x, A, B, Wr, route, s, mask, out):
    gates, idx = route(x @ Wr.T)
    y = routed_lora(x, A, B, gates, idx, scaling=s, rank_mask=mask, backend="reference")
    return y if out is None else out + y


FP32 = (torch.float32, 1e-4)
FP16 = (torch.float16, 5e-3)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("shared, mixed, k, routing, precision", [
    (False, False, 2, "random", FP32),
    (True, False, 2, "dropped", FP32),
    (False, True, 1, "zero_gates", FP32),
    (True, True, None, "random", FP32),
    (False, True, 2, "dropped", FP16),
    (True, False, 2, "zero_gates", FP16),
])
def test_with_router_matches_reference(grouped, shared, mixed, k, routing, precision):
    dtype, atol = precision
    case = make_case(T=37, E=6, r=4, k=2, shared=shared, mixed_ranks=mixed)
    Wr = torch.randn(6, case[0].shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) / 4
    route = _route_fn(k, routing)
    fn = lambda *a: routed_lora_torch_with_router(*a[:5], k, a[5], a[6], a[7], grouped=grouped)  # noqa: E731
    for use_out in (False, True):
        got = _with_router_run(fn, case, Wr, dtype, route, use_out)
        want = _with_router_run(_reference_with_router, case, Wr, torch.float64, route, use_out)
        for name, a, b in zip(["y", "dx", "dA", "dB", "dWr"], got, want):
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.double(), b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_with_router_dispatch_and_checks(backend):
    x, A, B, _, _, s, _ = make_case(E=4, r=2, k=1)
    Wr = torch.randn(4, x.shape[1], dtype=torch.float64)
    y = routed_lora_with_router(x, A, B, Wr, _route_fn(2, "random"), 2, scaling=s, backend=backend)
    torch.testing.assert_close(y, _reference_with_router(x, A, B, Wr, _route_fn(2, "random"), s, None, None))
    with pytest.raises(ValueError, match="router_weight must be"):
        routed_lora_with_router(x, A, B, Wr[:, :3], _route_fn(2, "random"), 2, backend=backend)
    with pytest.raises(ValueError, match="indices must be in"):  # what the router returns is checked
        routed_lora_with_router(x, A, B, Wr, lambda l: (l[:, :1], torch.full((x.shape[0], 1), 9)), 1, backend=backend)


def _layer(router, dropout=0.0, shared_a=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(20, 12)
    bank = ExpertBank(20, 12, shared_a=shared_a, shared_rank=4 if shared_a else None)
    for e in range(6):
        bank.add_expert(4 if shared_a else 2 + e % 3, 8.0, B=None)
    with torch.no_grad():
        for b in bank.B:
            b.normal_()
    return RoutedLoRALinear(base, bank, router, dropout=dropout, name="test")


@pytest.mark.parametrize("make_router", [
    lambda: TopKRouter(6, 20, top_k=2, noise_std=0.1),
    lambda: TopKRouter(6, 20, top_k=1),
    lambda: SoftRouter(6, 20),
], ids=["topk2-noise", "top1", "soft"])
@pytest.mark.parametrize("shared_a", [False, True])
@pytest.mark.parametrize("shape", [(7, 20), (2, 5, 20)])
def test_layer_fused_router_equals_unfused(monkeypatch, make_router, shared_a, shape):
    """The layer's fused path (router logits in the shrink's GEMM) gives the same output, logits
    and gradients (x, router, experts) as routing first and calling routed_lora."""
    results = []
    calls = []
    import molora.layer as layer_mod

    real = layer_mod.routed_lora_with_router
    monkeypatch.setattr(layer_mod, "routed_lora_with_router", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for fused in (True, False):
        router = make_router()
        torch.manual_seed(1)
        with torch.no_grad():
            router.proj.weight.normal_()
        layer = _layer(router, shared_a=shared_a)
        if not fused:
            monkeypatch.setattr(layer, "_fusable_router_weight", lambda dtype: None)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
        torch.manual_seed(5)  # same router noise in both runs
        y = layer(x)
        params = [x, router.proj.weight, *[p for p in layer.bank.parameters() if p.requires_grad]]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum()
                                    + layer.last_decision.logits.pow(2).sum(), params)
        results.append([y.detach(), layer.last_decision.logits.detach(), *grads])
    assert len(calls) == 1  # only the fused run took the fused path
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_fusion_only_when_logits_are_of_x():
    """No fusion with LoRA dropout (experts read dropout(x)), input jitter in training (the
    router reads x * u), or sequence-level routing (one row per example)."""
    assert _layer(TopKRouter(6, 20))._fusable_router_weight(torch.float32) is not None
    assert _layer(TopKRouter(6, 20), dropout=0.1)._fusable_router_weight(torch.float32) is None
    jit = _layer(TopKRouter(6, 20, jitter=0.1))
    assert jit.train()._fusable_router_weight(torch.float32) is None
    assert jit.eval()._fusable_router_weight(torch.float32) is not None
    assert _layer(TopKRouter(6, 20, granularity="sequence"))._fusable_router_weight(torch.float32) is None
    assert _layer(TopKRouter(6, 20))._fusable_router_weight(torch.float64) is None  # dtypes differ
