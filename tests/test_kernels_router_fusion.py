"""One GEMM for several linear maps of one input (``shared_input_linear``), the routed layer's
kernel steps (``project``: base output, shrink and router logits in one GEMM; the router decides;
``expand``) and the layer's use of them: every output and gradient against plain autograd / the
float64 reference loop."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_case
from torch import nn

from molora import context as molora_context
from molora.bank import ExpertBank
from molora import kernels
from molora.kernels import Plan, routed_lora, shared_input_linear
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


def _steps(x, A, B, Wr, route, s, mask, out=None, plan=Plan("torch", False), base=(None, None)):
    """The routed layer's three steps as the layer calls them."""
    proj = kernels.project(x, plan, A, *base, router_weight=Wr)
    gates, idx = route(proj.logits)
    return kernels.expand(x, plan, proj.shrink, A, B, gates, idx, s, out=proj.out if base[0] is not None else out,
                          rank_mask=mask)


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
    fn = lambda *a: _steps(*a, plan=Plan("torch", grouped))  # noqa: E731
    for use_out in (False, True):
        got = _with_router_run(fn, case, Wr, dtype, route, use_out)
        want = _with_router_run(_reference_with_router, case, Wr, torch.float64, route, use_out)
        for name, a, b in zip(["y", "dx", "dA", "dB", "dWr"], got, want):
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.double(), b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_steps_dispatch_and_checks(backend):
    x, A, B, _, _, s, _ = make_case(E=4, r=2, k=1)
    Wr = torch.randn(4, x.shape[1], dtype=torch.float64)
    plan = kernels.plan(backend, 4, 2, 2)
    y = _steps(x, A, B, Wr, _route_fn(2, "random"), s, None, plan=plan)
    torch.testing.assert_close(y, _reference_with_router(x, A, B, Wr, _route_fn(2, "random"), s, None, None))
    with pytest.raises(ValueError, match="shared_input_linear"):
        kernels.project(x, plan, A, router_weight=Wr[:, :3])
    with pytest.raises(ValueError, match=r"gates \[37, 1\] and indices \[37, 2\]"):  # decision shapes are checked
        kernels.expand(x, plan, None, A, B, torch.ones(37, 1, dtype=x.dtype), torch.zeros(37, 2, dtype=torch.long), s)
    assert kernels.plan("torch", 64, 8, 2, threads=1).grouped and not kernels.plan("torch", 8, 8, 2, threads=1).grouped
    assert not kernels.plan("torch", 64, 8, None, threads=1).grouped  # dense gates stay dense


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
    """The layer's fused paths (router logits and LoRA shrink in the base linear's GEMM; router
    logits in the shrink's GEMM only) give the same output, logits and gradients (x, router,
    experts) as routing first and calling routed_lora."""
    results = []
    calls = []
    real = kernels.project
    monkeypatch.setattr(kernels, "project", lambda *a, **kw: calls.append(
        (a[3] is not None if len(a) > 3 else kw.get("base_weight") is not None, kw.get("router_weight") is not None))
        or real(*a, **kw))
    for fusion in ("base", "router", "none"):
        router = make_router()
        torch.manual_seed(1)
        with torch.no_grad():
            router.proj.weight.normal_()
        layer = _layer(router, shared_a=shared_a)
        if fusion != "base":
            monkeypatch.setattr(layer, "_fusable_base", lambda *a: None)
        if fusion == "none":
            monkeypatch.setattr(layer, "_fusable_router_weight", lambda dtype: None)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
        torch.manual_seed(5)  # same router noise in every run
        with molora_context.forward_scope() as scope:
            y = layer(x)
        logits = scope.records["test"].decision.logits
        params = [x, router.proj.weight, *[p for p in layer.bank.parameters() if p.requires_grad]]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum()
                                    + logits.pow(2).sum(), params)
        results.append([y.detach(), logits.detach(), *grads])
    assert calls == [(True, True), (False, True), (False, False)]  # (base, logits) in the one GEMM
    for other in results[:2]:
        for a, b in zip(other, results[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_fusion_only_when_logits_are_of_x():
    """Router logits join the GEMM only when they are of x: not with input jitter in training
    (the router reads x * u), or sequence-level routing (one row per example). LoRA dropout
    keeps the logits (the router reads x) but not the shrink (the experts read dropout(x))."""
    assert _layer(TopKRouter(6, 20))._fusable_router_weight(torch.float32) is not None
    assert _layer(TopKRouter(6, 20), dropout=0.1)._fusable_router_weight(torch.float32) is not None
    jit = _layer(TopKRouter(6, 20, jitter=0.1))
    assert jit.train()._fusable_router_weight(torch.float32) is None
    assert jit.eval()._fusable_router_weight(torch.float32) is not None
    assert _layer(TopKRouter(6, 20, granularity="sequence"))._fusable_router_weight(torch.float32) is None
    assert _layer(TopKRouter(6, 20))._fusable_router_weight(torch.float64) is None  # dtypes differ


# --------------------------------------------------------------- the base linear in the same GEMM
def test_shared_input_linear_frozen_base_with_bias_and_in_place_add():
    """A frozen first weight with a bias (the base layer) next to trainable maps: outputs and
    gradients as separate linears; the base gets no gradient; an in-place add into the first
    output (the routed layer adds its delta there) leaves the other outputs and every gradient
    intact."""
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(9, 13, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    V1, V2 = (torch.randn(n, 13, generator=g, dtype=torch.float64).requires_grad_() for n in (4, 2))
    x = torch.randn(11, 13, generator=g, dtype=torch.float64, requires_grad=True)
    y, z1, z2 = shared_input_linear(x, W, V1, V2, bias=b)
    torch.testing.assert_close(y, x @ W.T + b)
    torch.testing.assert_close(z1, x @ V1.T)
    y.add_(z1.sum(1, keepdim=True))  # in place, as the delta is added into the base output
    torch.testing.assert_close(z2, x @ V2.T)
    want_y = x @ W.T + b + (x @ V1.T).sum(1, keepdim=True)
    torch.testing.assert_close(y, want_y)
    got = _grads([y, z2], [x, V1, V2])
    x.grad = V1.grad = V2.grad = None
    want = _grads([want_y, x @ V2.T], [x, V1, V2])
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)
    assert W.grad is None and b.grad is None
    with pytest.raises(ValueError, match="bias must be"):
        shared_input_linear(x, W, V1, bias=b[:3])
    with pytest.raises(ValueError, match="frozen base"):
        shared_input_linear(x, W, bias=b.clone().requires_grad_())


def _base_run(case, Wb0, bb0, Wr0, dtype, route, grouped, x_grad=True, transposed=False):
    """y and the gradients (x, A, B, W_r) of the routed layer with its frozen base linear,
    through the torch backend (``grouped``: the form) or, for ``grouped=None``, the float64
    reference: base linear, router, reference loop."""
    x, A, B, _, _, s, mask = case
    x = x.to(dtype).clone().requires_grad_(x_grad)
    A, B, Wr = (t.to(dtype).clone().requires_grad_() for t in (A, B, Wr0))
    # a Conv1D base stores W transposed: the kernel gets the non-contiguous W^T view
    Wb = Wb0.to(dtype).T.contiguous().T if transposed else Wb0.to(dtype)
    bb = None if bb0 is None else bb0.to(dtype)
    mask = None if mask is None else mask.to(dtype)
    if grouped is None:
        gates, idx = route(x @ Wr.T)
        y = torch.nn.functional.linear(x, Wb, bb) + routed_lora(x, A, B, gates, idx, scaling=s, rank_mask=mask,
                                                                backend="reference")
    else:
        y = _steps(x, A, B, Wr, route, s.to(dtype), mask, plan=Plan("torch", grouped), base=(Wb, bb))
    leaves = [x, A, B, Wr] if x_grad else [A, B, Wr]
    return [y.detach()] + _grads([y], leaves)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("shared, mixed, k, routing, bias, transposed, precision", [
    (False, False, 2, "random", True, False, FP32),
    (True, False, 2, "dropped", False, True, FP32),
    (False, True, 1, "zero_gates", True, True, FP32),
    (True, True, None, "random", True, False, FP32),
    (False, True, 2, "dropped", True, False, FP16),
])
def test_base_fused_matches_reference(grouped, shared, mixed, k, routing, bias, transposed, precision):
    """``x [W; A_cat; W_r]^T`` (dense form) or ``x [W; W_r]^T`` (grouped form) in one GEMM: the
    layer output and every gradient equal base linear + router + float64 reference loop."""
    dtype, atol = precision
    case = make_case(T=37, E=6, r=4, k=2, shared=shared, mixed_ranks=mixed)
    g = torch.Generator().manual_seed(4)
    d_in, d_out = case[0].shape[1], case[2].shape[1]
    Wb = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    bb = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    Wr = torch.randn(6, d_in, generator=g, dtype=torch.float64) / 4
    route = _route_fn(k, routing)
    for x_grad in (True, False):
        got = _base_run(case, Wb, bb, Wr, dtype, route, grouped, x_grad, transposed)
        want = _base_run(case, Wb, bb, Wr, torch.float64, route, None, x_grad)
        names = ["y", "dx", "dA", "dB", "dWr"] if x_grad else ["y", "dA", "dB", "dWr"]
        for name, a, b in zip(names, got, want):
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.double(), b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_steps_with_base_dispatch_and_checks(backend):
    x, A, B, _, _, s, _ = make_case(E=4, r=2, k=1)
    W = torch.randn(B.shape[1], x.shape[1], dtype=torch.float64)
    b = torch.randn(B.shape[1], dtype=torch.float64)
    Wr = torch.randn(4, x.shape[1], dtype=torch.float64)
    route = _route_fn(2, "random")
    plan = kernels.plan(backend, 4, 2, 2)
    y = _steps(x, A, B, Wr, route, s, None, plan=plan, base=(W, b))
    torch.testing.assert_close(y, x @ W.T + b + _reference_with_router(x, A, B, Wr, route, s, None, None))
    with pytest.raises(ValueError, match="must be frozen"):
        kernels.project(x, plan, A, W.clone().requires_grad_(), b, router_weight=Wr)
    with pytest.raises((ValueError, RuntimeError)):
        kernels.project(x, plan, A, W[:, :3], b, router_weight=Wr)
    with pytest.raises((ValueError, RuntimeError)):
        kernels.project(x, plan, A, W, b[:3], router_weight=Wr)
    with pytest.raises(ValueError, match="base_bias needs base_weight"):
        kernels.project(x, plan, A, None, b)


def test_layer_base_fusion_conditions_and_gpt2_conv1d():
    """The base GEMM is fused only for a frozen plain nn.Linear / Conv1D called without extra
    arguments; a GPT-2 Conv1D base (weight stored [d_in, d_out]) gives the unfused result."""
    from transformers.pytorch_utils import Conv1D

    layer = _layer(TopKRouter(6, 20, top_k=2))
    x = torch.randn(3, 20)
    assert layer._fusable_base(x, torch.float32, (), {}) is not None
    assert layer._fusable_base(x, torch.float32, (1,), {}) is None
    assert layer._fusable_base(x.double(), torch.float32, (), {}) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the output keeps the autocast dtype
        assert layer._fusable_base(x, torch.float32, (), {}) is None
        assert layer(x).dtype == layer.base_layer(x).dtype == torch.bfloat16
    layer.base_layer.weight.requires_grad_(True)
    assert layer._fusable_base(x, torch.float32, (), {}) is None

    torch.manual_seed(0)
    conv = Conv1D(12, 20)
    with torch.no_grad():
        conv.bias.normal_()
    outs = []
    for fused in (True, False):
        router = TopKRouter(6, 20, top_k=2)
        torch.manual_seed(1)
        with torch.no_grad():
            router.proj.weight.normal_()
        bank = ExpertBank(20, 12)
        for e in range(6):
            bank.add_expert(3, 6.0, B=None)
        with torch.no_grad():
            for p in bank.B:
                p.normal_()
        layer = RoutedLoRALinear(conv, bank, router, name="c_attn")
        if not fused:
            layer._fusable_base = lambda *a: None
        xx = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = layer(xx)
        outs.append([y.detach(), *torch.autograd.grad(y.pow(2).sum(), [xx, router.proj.weight, *bank.B])])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
