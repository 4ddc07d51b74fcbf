"""The sorted/segmented (grouped) torch form of the routed LoRA op, for many experts and small k.

Grouping as in vLLM's LoRA kernels, Punica SGMV and ScatterMoE: the valid ``(token, slot)`` pairs
of a top-k decision are stably sorted by expert id, giving per-expert counts and contiguous
segments. Each expert then runs two small GEMMs on exactly its own rows (no padding)::

    X_s = X[tok]                                  (gather, [N, d_in], N = valid pairs)
    H_e = X_s[seg_e] A_e^T * m_e                  (shrink, [n_e, r]; m_e = rank mask)
    H'_e = (g s_e) * H_e                          (gate and scale at rank r, not at d_out)
    Y = index_add(tok, H'_e B_e^T)                (expand, scatter-add back to the tokens)

so the work is ``k r (d_in + d_out)`` per token instead of the dense form's ``E r (d_in + d_out)``.
With a shared ``A`` (HydraLoRA) ``H = X A^T`` is computed once for all tokens and gathered.

Hand-written backward (``dY`` gathered once as ``dY_s``)::

    U_e  = dY_s[seg_e] B_e                        ([n_e, r])
    dg   = s_e <U_e, H_e>                         (per pair, scattered back to [T, k])
    dH_e = (g s_e) m_e * U_e
    dB_e = dY_s[seg_e]^T H'_e                     (weight grads reduced over the expert's segment)
    dA_e = dH_e^T X_s[seg_e]
    dX   = index_add(tok, dH_e A_e)               (shared A: dX = (index_add(tok, dH)) A)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .gather import routed_lora_gather


class RoutingPlan(NamedTuple):
    """Sorted metadata of a top-k decision (valid pairs only, ``-1`` slots dropped).

    Only the *active* experts (those some pair routes to) appear in ``experts``/``counts``: every
    later step loops over these, so a batch touching m of E experts costs in m, not in E."""

    order: Tensor  # [N] flat pair ids ``t * k + j`` sorted by expert (stable)
    tokens: Tensor  # [N] the token of each sorted pair
    experts: list[int]  # the active experts, ascending (host ints)
    counts: list[int]  # pairs of each active expert (host ints: segment bounds of the loop)
    pair_experts: Tensor  # [N] the expert of each sorted pair


def routing_plan(indices: Tensor, num_experts: int) -> RoutingPlan:
    """Stable sort of the flattened expert ids; ``-1`` (no expert) sorts last and is dropped."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    order = torch.argsort(key, stable=True)
    ids, counts = torch.unique_consecutive(key.index_select(0, order), return_counts=True)
    ids, counts = ids.tolist(), counts.tolist()
    if ids and ids[-1] == num_experts:  # the dropped slots
        ids, counts = ids[:-1], counts[:-1]
    order = order[: sum(counts)]
    return RoutingPlan(order, torch.div(order, k, rounding_mode="floor"), ids, counts, key.index_select(0, order))


def _scaling_vector(scaling: float | Tensor, E: int, like: Tensor) -> Tensor:
    if isinstance(scaling, Tensor):
        return scaling.to(device=like.device, dtype=like.dtype)
    return torch.full((E,), float(scaling), dtype=like.dtype, device=like.device)


def _seg(buf: Tensor, r: int, start: int, n: int) -> Tensor:
    """Segment ``[start, start + n)`` of a flat rank-major buffer as ``[r, n]`` (contiguous)."""
    return buf[r * start : r * (start + n)].view(r, n)


def _views(t: Tensor, experts: list[int]) -> dict[int, Tensor]:
    """``t[e]`` for the active experts only (a view each; ``unbind`` would make E of them)."""
    return {e: t[e] for e in experts}


#: Rows per chunk: an expert's segment is processed in equal pieces of at most this many rows,
#: so the chunk buffers (``CHUNK_ROWS x d`` each, 1 MiB at d = 1024, fp32) stay in cache and
#: their size does not grow with a skewed routing.
CHUNK_ROWS = 256


def _segments(plan: RoutingPlan):
    """``(expert, start, n, tokens)`` of each segment piece (``n <= CHUNK_ROWS``) of the active
    experts, in sorted order."""
    start = 0
    for e, n, tok in zip(plan.experts, plan.counts, plan.tokens.split(plan.counts)):
        size = -(-n // -(-n // CHUNK_ROWS))  # ceil(n / pieces), pieces = ceil(n / CHUNK_ROWS)
        for c in range(0, n, size):
            m = min(size, n - c)
            yield e, start + c, m, tok[c : c + m]
        start += n


#: Run the per-expert loop on one intra-op thread (see :func:`_one_thread`).
LOOP_ONE_THREAD = True


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 for the block (restored after).

    The loop's ops are small (a chunk of <= CHUNK_ROWS rows, rank-``r`` GEMMs): splitting each
    over threads costs more in fork/join than it saves. Measured with two threads on an idle
    machine (``benchmarks/results/kernels-cpu-threads2.json`` of the previous version, E = 64,
    d = 1024, T = 4096, k = 2, r = 8): the routed layer's overhead over the base linear was
    103 ms, against 78 ms with one thread."""
    n = torch.get_num_threads()
    if n == 1 or not LOOP_ONE_THREAD:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _grouped_forward(x: Tensor, A: Tensor, B: Tensor, gates: Tensor, plan: RoutingPlan, s: Tensor,
                     rank_mask: Tensor | None, y: Tensor, h: Tensor, hp: Tensor) -> Tensor:
    """The forward of :class:`_GroupedRoutedLoRA`: adds the delta into ``y`` in place, fills the
    rank-major ``h``/``hp`` (``>= r N`` elements) and returns ``coef`` ``[N]`` (gate times ``s_e``
    of each sorted pair), all the backward needs besides the inputs."""
    r = B.shape[2]
    d_out = B.shape[1]
    shared = A.dim() == 2
    order, tokens, experts, counts, pair_experts = plan
    coef = gates.reshape(-1).index_select(0, order) * s.index_select(0, pair_experts)
    cmax = min(CHUNK_ROWS, max(counts, default=0))
    # views of the active experts only, taken once (indexing in the loop costs per piece)
    A_e = None if shared else _views(A, experts)
    B_e = _views(B, experts)
    m_e = None if rank_mask is None else _views(rank_mask.unsqueeze(-1), experts)
    if shared:
        HT = A @ x.T  # [r, T]: A x once per token, gathered per segment below
    else:
        cx = x.new_empty(cmax, x.shape[1])
    co = x.new_empty(cmax, d_out)
    for e, start, n, tok in _segments(plan):
        seg = slice(start, start + n)
        hT = _seg(h, r, start, n)
        if shared:
            torch.index_select(HT, 1, tok, out=hT)
        else:
            torch.index_select(x, 0, tok, out=cx[:n])
            torch.mm(A_e[e], cx[:n].T, out=hT)
        if m_e is not None:
            hT *= m_e[e]
        hpT = torch.mul(hT, coef[None, seg], out=_seg(hp, r, start, n))
        torch.mm(hpT.T, B_e[e].T, out=co[:n])
        y.index_add_(0, tok, co[:n])
    return coef


def _grouped_backward(dy: Tensor, x: Tensor, A: Tensor, B: Tensor, s: Tensor, rank_mask: Tensor | None, h: Tensor,
                      hp: Tensor, coef: Tensor, plan: RoutingPlan, gates_shape: torch.Size,
                      needs: tuple[bool, bool, bool, bool]) -> tuple[Tensor | None, ...]:
    """The backward of :class:`_GroupedRoutedLoRA`: ``(dx, dA, dB, dgates)`` (``None`` where
    ``needs`` says the input takes no gradient)."""
    order, tokens, experts, counts, pair_experts = plan
    need_x, need_a, need_b, need_g = needs
    E, d_out, r = B.shape
    shared = A.dim() == 2
    N = tokens.shape[0]
    cmax = min(CHUNK_ROWS, max(counts, default=0))
    dy = dy.contiguous()
    U = dy.new_empty(r * N)
    cdy = dy.new_empty(cmax, d_out)
    dBt = B.new_zeros(E, r, d_out) if need_b else None  # dB_e^T: [r, d_out] is the fast GEMM layout
    dA = torch.zeros_like(A) if need_a and not shared else None
    need_dh = need_x or need_a
    dh = dy.new_empty(r * N) if need_dh else None
    dx = None
    if need_dh and not shared:
        cx = x.new_empty(cmax, x.shape[1]) if need_a else None
        cdx = x.new_empty(cmax, x.shape[1]) if need_x else None
        dx = x.new_zeros(x.shape) if need_x else None
    A_e = None if shared else _views(A, experts)
    B_e = _views(B, experts)
    m_e = None if rank_mask is None else _views(rank_mask.unsqueeze(-1), experts)
    dBt_e = _views(dBt, experts) if need_b else None
    dA_e = _views(dA, experts) if dA is not None else None
    dpair = x.new_empty(N) if need_g else None
    for e, start, n, tok in _segments(plan):
        seg = slice(start, start + n)
        torch.index_select(dy, 0, tok, out=cdy[:n])
        uT = torch.mm(B_e[e].T, cdy[:n].T, out=_seg(U, r, start, n))
        if need_g:  # dg = s_e <U, m_e * H> per pair (h carries the mask; s_e applied below)
            torch.sum(uT * _seg(h, r, start, n), 0, out=dpair[seg])
        if need_b:
            dBt_e[e].addmm_(_seg(hp, r, start, n), cdy[:n])  # summed over the expert's chunks
        if need_dh:
            dhT = torch.mul(uT, coef[None, seg], out=_seg(dh, r, start, n))
            if m_e is not None:
                dhT *= m_e[e]
            if not shared:
                if need_a:
                    torch.index_select(x, 0, tok, out=cx[:n])
                    dA_e[e].addmm_(dhT, cx[:n])
                if need_x:
                    torch.mm(dhT.T, A_e[e], out=cdx[:n])
                    dx.index_add_(0, tok, cdx[:n])
    dg = None
    if need_g:
        dpair *= s.index_select(0, pair_experts)
        dg = dy.new_zeros(gates_shape.numel()).index_copy_(0, order, dpair).view(gates_shape)
    if shared and need_dh:
        dHT = x.new_zeros(r, x.shape[0])  # sum over each token's pairs of dH, rank-major
        for _, start, n, tok in _segments(plan):
            dHT.index_add_(1, tok, _seg(dh, r, start, n))
        dx = dHT.T @ A if need_x else None
        dA = dHT @ x if need_a else None
    dB = dBt.transpose(1, 2).contiguous() if need_b else None
    return dx, dA, dB, dg


class _GroupedRoutedLoRA(torch.autograd.Function):
    """Per-expert segments processed piece by piece through small chunk buffers.

    Nothing of size ``[N, d]`` is materialised: each piece of an expert's rows is gathered into a
    chunk buffer (reused, so it stays in cache), shrunk, expanded and scatter-added
    straight into the output. Large fresh temporaries are what costs most on a CPU (every new
    multi-megabyte allocation is page-faulted in again), more than the small GEMMs themselves.

    The rank-``r`` quantities (``H``, ``H'``, ``U``, ``dH``) are kept rank-major, ``[r, n_e]`` per
    segment: BLAS computes ``A_e X_e^T`` (an ``r``-row output) about 6x faster on a CPU than
    ``X_e A_e^T`` (an ``r``-column output) for ``r = 8``, ``d = 1024`` (measured, MKL, 1 thread).
    """

    @staticmethod
    def forward(ctx, x, A, B, gates, plan: RoutingPlan, s: Tensor, rank_mask, out):  # noqa: D401
        r = B.shape[2]
        N = plan.tokens.shape[0]
        h, hp = x.new_empty(r * N), x.new_empty(r * N)
        if out is None:
            y = x.new_zeros(x.shape[0], B.shape[1])
        else:  # accumulate into the caller's tensor (the base layer's output): no [T, d_out] temporary
            y = out
            ctx.mark_dirty(out)
        with _one_thread():
            coef = _grouped_forward(x, A, B, gates, plan, s, rank_mask, y, h, hp)
        ctx.plan, ctx.shape, ctx.has_out = plan, gates.shape, out is not None
        ctx.save_for_backward(x, A, B, s, rank_mask, h, hp, coef)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, s, rank_mask, h, hp, coef = ctx.saved_tensors
        with _one_thread():
            dx, dA, dB, dg = _grouped_backward(dy, x, A, B, s, rank_mask, h, hp, coef, ctx.plan, ctx.shape,
                                               tuple(ctx.needs_input_grad[:4]))
        return dx, dA, dB, dg, None, None, None, (dy if ctx.has_out else None)


# ----------------------------------------------------------------------------- under torch.compile
# The per-expert segment bounds are data (counts read back to the host), which dynamo cannot trace
# without a graph break; behind a custom op the whole grouped form is one opaque node of the graph.
# Its buffers are sized for every ``(token, slot)`` pair (static shapes; ``-1`` slots leave a tail
# unused) and the routing plan is recomputed in the backward op from the saved indices.


@torch.library.custom_op("molora::grouped_lora", mutates_args=())
def grouped_lora_op(x: Tensor, A: Tensor, B: Tensor, gates: Tensor, indices: Tensor, s: Tensor,
                    rank_mask: Tensor | None, out: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out + delta, h, hp, coef)``: the grouped forward as a functional op (``out=None``: the
    delta alone); ``h``, ``hp`` ``[r T k]`` and ``coef`` ``[T k]`` are saved for the backward."""
    E, d_out, r = B.shape
    plan = routing_plan(indices, E)
    slots = indices.numel()
    h, hp = x.new_zeros(r * slots), x.new_zeros(r * slots)
    y = x.new_zeros(x.shape[0], d_out) if out is None else x.new_empty(x.shape[0], d_out).copy_(out)
    with _one_thread():
        coef = _grouped_forward(x, A, B, gates, plan, s, rank_mask, y, h, hp)
    return y, h, hp, torch.cat([coef, coef.new_zeros(slots - coef.numel())])


@grouped_lora_op.register_fake
def _(x, A, B, gates, indices, s, rank_mask, out):
    slots = indices.numel()
    return x.new_empty(x.shape[0], B.shape[1]), x.new_empty(B.shape[2] * slots), x.new_empty(B.shape[2] * slots), \
        x.new_empty(slots)


@torch.library.custom_op("molora::grouped_lora_backward", mutates_args=())
def grouped_lora_backward_op(dy: Tensor, x: Tensor, A: Tensor, B: Tensor, indices: Tensor, s: Tensor,
                             rank_mask: Tensor | None, h: Tensor, hp: Tensor, coef: Tensor, need_x: bool, need_a: bool,
                             need_b: bool, need_g: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dA, dB, dgates)`` of :func:`grouped_lora_op`; an input that needs no gradient gets
    an empty tensor."""
    plan = routing_plan(indices, B.shape[0])
    with _one_thread():
        grads = _grouped_backward(dy, x, A, B, s, rank_mask, h, hp, coef[: plan.tokens.shape[0]], plan, indices.shape,
                                  (need_x, need_a, need_b, need_g))
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@grouped_lora_backward_op.register_fake
def _(dy, x, A, B, indices, s, rank_mask, h, hp, coef, need_x, need_a, need_b, need_g):
    def maybe(need, like):
        return like.new_empty(like.shape) if need else x.new_empty(0)

    return maybe(need_x, x), maybe(need_a, A), maybe(need_b, B), maybe(need_g, indices.to(x.dtype))


def _setup_grouped_lora(ctx, inputs, output) -> None:
    x, A, B, gates, indices, s, rank_mask, out = inputs
    _, h, hp, coef = output
    ctx.save_for_backward(x, A, B, indices, s, rank_mask, h, hp, coef)
    ctx.has_out = out is not None


def _backward_grouped_lora(ctx, dy, *_unused):
    x, A, B, indices, s, rank_mask, h, hp, coef = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4])
    grads = torch.ops.molora.grouped_lora_backward(dy, x, A, B, indices, s, rank_mask, h, hp, coef, *needs)
    dx, dA, dB, dg = (g if need else None for g, need in zip(grads, needs))
    return dx, dA, dB, dg, None, None, None, (dy if ctx.has_out else None)


grouped_lora_op.register_autograd(_backward_grouped_lora, setup_context=_setup_grouped_lora)


#: The grouped form hands a decision to the gathered form (:mod:`.gather`) when each active
#: expert's share of gathered weights, ``rows r (d_in + d_out)``, is at most this many elements:
#: then the gathered batched GEMVs cost less than the per-expert loop. Measured with
#: ``python benchmarks/grouped_kernels.py --gather --threads 1 --repeats 7`` (CPU fp32, one thread, r = 8,
#: 64 active experts of 512, k = 1, forward; time of the gathered form / the grouped form):
#: d = 256: 1 row 0.12, 4 rows 0.27, 16 rows 0.90; d = 1024: 1 row 0.28, 4 rows 0.63, 8 rows 1.49;
#: d = 4096: 1 row 0.89, 2 rows 1.02, 4 rows 2.68. The
#: crossing sits near ``rows r (d_in + d_out) = 64k`` at every d
#: (``benchmarks/results/kernels-gather-cpu.json``).
GATHER_MAX_WEIGHTS_PER_EXPERT = 65536


def use_gather(pairs: int, active_experts: int, rank: int, d_in: int, d_out: int) -> bool:
    """Whether the gathered form is the faster one: ``pairs r (d_in + d_out) <= 64k * active``."""
    return pairs * rank * (d_in + d_out) <= GATHER_MAX_WEIGHTS_PER_EXPERT * active_experts


def routed_lora_grouped(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
    gather: bool | None = None,
    group_rows: int = 1,
) -> Tensor:
    """Grouped (sorted, segmented) routed LoRA delta; see the module docstring.

    Dense gates ``[T, E]`` are treated as ``k = E`` (every expert selected). With ``out``
    (``[T, d_out]``, x's dtype) the delta is added into ``out`` in place and ``out`` returned.
    ``group_rows > 1``: ``gates``/``indices`` are ``[T / group_rows, k]``, one decision per
    group of consecutive rows (a per-example router's sequences). Decisions with few gathered
    weights per active expert run the gathered form instead (:func:`use_gather`, counting
    group-expert pairs: a group's experts are gathered once; ``gather=True``/``False`` forces
    one form).
    """
    E, d_out, r = B.shape
    if indices is None:
        indices = torch.arange(E, device=x.device).expand(gates.shape[0], E)
    s = _scaling_vector(scaling, E, x)
    mask = None if rank_mask is None else rank_mask.to(device=x.device, dtype=x.dtype)
    if torch.compiler.is_compiling():  # one opaque op of the graph (see grouped_lora_op)
        if group_rows != 1:
            gates, indices = gates.repeat_interleave(group_rows, 0), indices.repeat_interleave(group_rows, 0)
        y = torch.ops.molora.grouped_lora(x, A, B, gates.to(x.dtype), indices, s, mask, out)[0]
        return y
    if gather is None:
        routed = indices[indices >= 0]
        # counts only (no sort): the gathered form, which decoding takes, needs no plan
        active = int(torch.bincount(routed, minlength=E).count_nonzero())
        gather = use_gather(routed.numel(), max(active, 1), r, x.shape[1], d_out)
    if gather:
        return routed_lora_gather(x, A, B, gates.to(x.dtype), indices, s, mask, out, group_rows)
    if group_rows != 1:
        gates, indices = gates.repeat_interleave(group_rows, 0), indices.repeat_interleave(group_rows, 0)
    plan = routing_plan(indices, E)
    if out is not None and out._base is not None:
        # autograd cannot rebase a view's history onto a custom Function that marks it dirty
        # (backward fails with a shape mismatch): add into a view out of place instead
        return out.add_(_GroupedRoutedLoRA.apply(x, A, B, gates.to(x.dtype), plan, s, mask, None))
    return _GroupedRoutedLoRA.apply(x, A, B, gates.to(x.dtype), plan, s, mask, out)
