"""The torch backend (dense and grouped forms, and its dispatcher) against the float64 reference
loop: outputs and every gradient, fp32 (atol 1e-4) and fp16 (5e-3), over adversarial routings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import assert_matches_reference, make_case, run

from molora.kernels import default_backend, routed_lora
from molora.kernels.dense import routed_lora_dense
from molora.kernels.grouped import routed_lora_grouped, routing_plan
from molora.kernels.torch_backend import routed_lora_torch, use_grouped



def routed_lora_grouped_loop(*args):
    """The grouped form's per-expert loop (small test cases would take the gathered form)."""
    return routed_lora_grouped(*args, gather=False)


def routed_lora_gathered(*args):
    """The gathered (batched GEMV) form."""
    return routed_lora_grouped(*args, gather=True)


SPARSE = [routed_lora_grouped_loop, routed_lora_gathered]
FORMS = [routed_lora_dense, *SPARSE, routed_lora_torch]
ROUTINGS = ["random", "empty_experts", "one_expert", "dropped", "zero_gates"]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shared", [False, True])
def test_routings_fp32(form, routing, shared):
    case = make_case(E=6, r=4, k=2, shared=shared, routing=routing, mixed_ranks=True)
    assert_matches_reference(case, torch.float32, form, atol=1e-4)


@pytest.mark.parametrize("form", [routed_lora_dense, *SPARSE], ids=lambda f: f.__name__)
@pytest.mark.parametrize("r", [1, 4, 12, 16])
@pytest.mark.parametrize("k", [1, 2, "E", None])
def test_ranks_and_k_fp32(form, r, k):
    E = 5
    case = make_case(E=E, r=r, k=E if k == "E" else k, seed=r)
    assert_matches_reference(case, torch.float32, form, atol=1e-4)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shared", [False, True])
def test_fp16(form, shared):
    case = make_case(E=6, r=12, k=2, shared=shared, routing="dropped", mixed_ranks=True)
    assert_matches_reference(case, torch.float16, form, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("form", [routed_lora_dense, *SPARSE], ids=lambda f: f.__name__)
@pytest.mark.parametrize("shared", [False, True])
def test_out_accumulates_in_place(form, shared):
    """``out=`` adds the delta into a tensor that autograd tracks (the base layer's output)."""
    x, A, B, gates, idx, s, mask = make_case(E=5, r=4, k=2, shared=shared, routing="dropped")
    W = torch.randn(B.shape[1], x.shape[1], dtype=torch.float64)
    grads = []
    for use_out in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
        base = leaves[0] @ W.T
        if use_out:
            y = form(*leaves, idx, s, mask, base)
            assert y is base
        else:
            y = base + form(*leaves, idx, s, mask)
        y.pow(2).sum().backward()
        grads.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("E, k", [(8, 2), (3, 2)])  # grouped and dense forms of the torch backend
def test_out_may_be_a_view(backend, E, k):
    """The routed layer passes a view of a [batch, seq, d_out] base output as ``out``."""
    x, A, B, gates, idx, s, mask = make_case(T=6, d_in=5, d_out=4, E=E, r=3, k=k)
    W = torch.randn(4, 5, dtype=torch.float64)
    grads = []
    for use_out in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
        x3 = leaves[0].view(2, 3, 5)
        base = x3 @ W.T
        if use_out:
            routed_lora(leaves[0], *leaves[1:], idx, scaling=s, backend=backend, out=base.view(-1, 4))
            y = base
        else:
            y = base + routed_lora(*leaves, idx, scaling=s, backend=backend).view(2, 3, 4)
        y.pow(2).sum().backward()
        grads.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_routed_lora_out_argument_checked():
    x, A, B, gates, idx, s, _ = make_case(E=4, r=2, k=1)
    with pytest.raises(ValueError, match="out must be"):
        routed_lora(x, A, B, gates, idx, out=torch.zeros(3, 3, dtype=torch.float64))


def test_routing_plan_is_a_stable_sort():
    idx = torch.tensor([[2, -1], [0, 2], [-1, -1], [2, 0]])
    plan = routing_plan(idx, 3)
    assert plan.experts == [0, 2] and plan.counts == [2, 3]  # only the active experts
    assert plan.order.tolist() == [2, 7, 0, 3, 6]  # expert 0: pairs 2, 7; expert 2: pairs 0, 3, 6
    assert plan.tokens.tolist() == [1, 3, 0, 1, 3]


def test_switch_rule():
    """grouped iff E r > 32 k threads (kernels/torch_backend.py)."""
    assert not use_grouped(64, 8, None, threads=1)  # dense gates always take the dense form
    assert not use_grouped(8, 8, 2, threads=1)  # E r = 64 = 32 k: dense (the E=8 target shape)
    assert use_grouped(16, 8, 2, threads=1)
    assert use_grouped(8, 8, 1, threads=1) and not use_grouped(4, 8, 1, threads=1)
    assert use_grouped(8, 16, 2, threads=1)
    assert not use_grouped(16, 8, 2, threads=2) and use_grouped(32, 8, 2, threads=2)  # dense GEMMs use both threads
    assert use_grouped(64, 8, 2, threads=2)  # the E=64 target shape stays grouped
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert use_grouped(16, 8, 2) and not use_grouped(8, 8, 2)
    finally:
        torch.set_num_threads(n)


def test_default_backend_and_env_override(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("MOLORA_KERNEL", raising=False)
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert default_backend(x) == "torch"  # CPU tensors: the interpreter is never a default
    monkeypatch.setenv("MOLORA_KERNEL", "reference")
    assert default_backend(x) == "reference"
    case = make_case(E=3, r=2, k=1)
    # the override really routes the call: an unknown name fails in the dispatcher
    monkeypatch.setenv("MOLORA_KERNEL", "no-such-kernel")
    with pytest.raises(ValueError, match="unknown backend 'no-such-kernel'"):
        run(case, torch.float64, None)


def test_gradcheck_reference_shared_a_and_rank_mask():
    x, A, B, gates, idx, s, mask = make_case(T=4, d_in=3, d_out=3, E=3, r=2, k=2, shared=True, mixed_ranks=True, routing="dropped")
    torch.autograd.gradcheck(
        lambda *t: routed_lora(*t, indices=idx, scaling=s, rank_mask=mask, backend="reference"),
        [t.clone().requires_grad_() for t in (x, A, B, gates)],
    )


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 20),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    E=st.integers(1, 9),
    r=st.integers(1, 6),
    k=st.integers(0, 9),
    shared=st.booleans(),
    mixed=st.booleans(),
    routing=st.sampled_from(ROUTINGS),
    seed=st.integers(0, 2**16),
)
def test_torch_path_property(T, d_in, d_out, E, r, k, shared, mixed, routing, seed):
    """Any shape, any k (0 = dense gates), any routing: the torch backend equals the reference."""
    k = None if k == 0 else min(k, E)
    case = make_case(T=T, d_in=d_in, d_out=d_out, E=E, r=r, k=k, shared=shared, routing=routing, mixed_ranks=mixed, seed=seed)
    for form in FORMS:
        assert_matches_reference(case, torch.float64, form, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("routing", ["random", "one_expert"])
def test_grouped_segments_split_into_chunks(monkeypatch, shared, routing):
    """Segments longer than CHUNK_ROWS are processed in pieces; weight grads sum over them."""
    import molora.kernels.grouped as grouped

    monkeypatch.setattr(grouped, "CHUNK_ROWS", 3)
    case = make_case(T=23, E=4, r=4, k=2, shared=shared, routing=routing, mixed_ranks=True)
    assert_matches_reference(case, torch.float64, routed_lora_grouped_loop, atol=1e-10, rtol=1e-10)


def test_grouped_loop_runs_on_one_thread_and_restores(monkeypatch):
    """The per-expert loop runs with one intra-op thread (its ops are too small to split) and
    the caller's thread count is restored, the result unchanged."""
    import molora.kernels.grouped as grouped

    seen = []
    real = grouped._segments
    monkeypatch.setattr(grouped, "_segments", lambda plan: (seen.append(torch.get_num_threads()), real(plan))[1])
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = make_case(E=5, r=3, k=2, routing="dropped", mixed_ranks=True)
        assert_matches_reference(case, torch.float64, routed_lora_grouped_loop, atol=1e-10, rtol=1e-10)
        assert torch.get_num_threads() == 2
        assert seen and set(seen) == {1}  # forward and backward loops
    finally:
        torch.set_num_threads(n)


def test_gather_rule_and_dispatch(monkeypatch):
    """The grouped form hands few rows per active expert to the gathered form:
    ``pairs r (d_in + d_out) <= 64k * active experts`` (kernels/grouped.py)."""
    import molora.kernels.grouped as grouped

    assert grouped.use_gather(64, 64, 8, 1024, 1024)  # decoding: one row per expert
    assert grouped.use_gather(256, 64, 8, 1024, 1024) and not grouped.use_gather(512, 64, 8, 1024, 1024)
    assert grouped.use_gather(1024, 64, 8, 256, 256) and not grouped.use_gather(1088, 64, 8, 256, 256)
    assert not grouped.use_gather(128, 64, 8, 4096, 4096)
    calls = []
    real = grouped.routed_lora_gather
    monkeypatch.setattr(grouped, "routed_lora_gather", lambda *a: (calls.append(1), real(*a))[1])
    x, A, B, gates, idx, s, _ = make_case(T=4, d_in=8, d_out=8, E=64, r=2, k=1)
    routed_lora_grouped(x, A, B, gates, idx, s)
    x, A, B, gates, idx, s, _ = make_case(T=8192, d_in=8, d_out=8, E=2, r=2, k=1)
    routed_lora_grouped(x, A, B, gates, idx, s)
    assert calls == [1]


def test_active_experts_only():
    """The plan and the loop see only the experts some pair routes to (cost in m, not E)."""
    idx = torch.tensor([[900], [3], [900], [-1]])
    plan = routing_plan(idx, 1024)
    assert plan.experts == [3, 900] and plan.counts == [1, 2]
    assert plan.pair_experts.tolist() == [3, 900, 900]


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_per_group_decisions_equal_per_token_float64_loop(gather, shared, k):
    """``group_rows``: one decision per group of consecutive rows (a per-example router's
    sequences) gives, with and without out, what a float64 loop over the rows with the group's
    decision gives, in both forms, with dropped slots and a rank mask; gradients too."""
    groups, rows = 5, 7
    x, A, B, gates, idx, s, _ = make_case(T=groups, E=6, r=4, k=k, shared=shared, routing="dropped", seed=k)
    x = torch.randn(groups * rows, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(6, 4, generator=torch.Generator().manual_seed(2)) > 0.3).double()
    ref = torch.zeros(groups * rows, B.shape[1], dtype=torch.float64)
    for t in range(groups * rows):
        for j in range(k):
            e = int(idx[t // rows, j])
            if e >= 0:
                a = A if shared else A[e]
                ref[t] += gates[t // rows, j] * s[e] * (B[e] @ (mask[e] * (a @ x[t])))
    xg, Bg = x.clone().requires_grad_(), B.clone().requires_grad_()
    got = routed_lora_grouped(xg, A, Bg, gates, idx, s, mask, gather=gather, group_rows=rows)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    out = torch.ones_like(ref)
    torch.testing.assert_close(routed_lora_grouped(x, A, B, gates, idx, s, mask, out=out, gather=gather, group_rows=rows),
                               ref + 1, rtol=1e-10, atol=1e-12)
    got.sum().backward()
    xr, Br = x.clone().requires_grad_(), B.clone().requires_grad_()
    per_token = routed_lora_grouped(xr, A, Br, gates.repeat_interleave(rows, 0), idx.repeat_interleave(rows, 0), s, mask,
                                    gather=not gather)
    per_token.sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Bg.grad, Br.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not cover"):
        routed_lora_grouped(x[:-1], A, B, gates, idx, s, gather=True, group_rows=rows)
