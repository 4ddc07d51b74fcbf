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


class RoutingPlan(NamedTuple):
    """Sorted metadata of a top-k decision (valid pairs only, ``-1`` slots dropped)."""

    order: Tensor  # [N] flat pair ids ``t * k + j`` sorted by expert (stable)
    tokens: Tensor  # [N] the token of each sorted pair
    counts: list[int]  # [E] pairs per expert (host ints: segment bounds of the loop)


def routing_plan(indices: Tensor, num_experts: int) -> RoutingPlan:
    """Stable sort of the flattened expert ids; ``-1`` (no expert) sorts last and is dropped."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    order = order[: sum(counts)]
    return RoutingPlan(order, torch.div(order, k, rounding_mode="floor"), counts)


def _scaling_vector(scaling: float | Tensor, E: int, like: Tensor) -> Tensor:
    if isinstance(scaling, Tensor):
        return scaling.to(device=like.device, dtype=like.dtype)
    return torch.full((E,), float(scaling), dtype=like.dtype, device=like.device)


def _seg(buf: Tensor, r: int, start: int, n: int) -> Tensor:
    """Segment ``[start, start + n)`` of a flat rank-major buffer as ``[r, n]`` (contiguous)."""
    return buf[r * start : r * (start + n)].view(r, n)


def _per_pair(s: Tensor, counts: list[int]) -> Tensor:
    """``s_e`` repeated over each expert's segment: ``[N]``."""
    return torch.repeat_interleave(s, torch.tensor(counts, device=s.device), output_size=sum(counts))


#: Rows per chunk: an expert's segment is processed in equal pieces of at most this many rows,
#: so the chunk buffers (``CHUNK_ROWS x d`` each, 1 MiB at d = 1024, fp32) stay in cache and
#: their size does not grow with a skewed routing.
CHUNK_ROWS = 256


def _segments(plan: RoutingPlan):
    """``(expert, start, n, tokens)`` of each non-empty segment piece (``n <= CHUNK_ROWS``),
    in sorted order."""
    start = 0
    for e, (n, tok) in enumerate(zip(plan.counts, plan.tokens.split(plan.counts))):
        if n:
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
        with _one_thread():
            return _GroupedRoutedLoRA._forward(ctx, x, A, B, gates, plan, s, rank_mask, out)

    @staticmethod
    def backward(ctx, dy):
        with _one_thread():
            return _GroupedRoutedLoRA._backward(ctx, dy)

    @staticmethod
    def _forward(ctx, x, A, B, gates, plan: RoutingPlan, s: Tensor, rank_mask, out):
        T = x.shape[0]
        E, d_out, r = B.shape
        shared = A.dim() == 2
        order, tokens, counts = plan
        N = tokens.shape[0]
        # [N] gate times s_e of each sorted pair
        coef = gates.reshape(-1).index_select(0, order) * _per_pair(s, counts)
        cmax = min(CHUNK_ROWS, max(counts, default=0))
        A_e = None if shared else A.unbind(0)  # views taken once: indexing in the loop costs per call
        B_e = B.unbind(0)
        m_e = None if rank_mask is None else rank_mask.unsqueeze(-1).unbind(0)
        h = x.new_empty(r * N)  # rank-major per segment, see _seg
        hp = x.new_empty(r * N)
        if shared:
            HT = A @ x.T  # [r, T]: A x once per token, gathered per segment below
        else:
            cx = x.new_empty(cmax, x.shape[1])
        co = x.new_empty(cmax, d_out)
        if out is None:
            y = x.new_zeros(T, d_out)
        else:  # accumulate into the caller's tensor (the base layer's output): no [T, d_out] temporary
            y = out
            ctx.mark_dirty(out)
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
        ctx.plan, ctx.shape, ctx.has_out = plan, gates.shape, out is not None
        ctx.save_for_backward(x, A, B, s, rank_mask, h, hp, coef)
        return y

    @staticmethod
    def _backward(ctx, dy):
        x, A, B, s, rank_mask, h, hp, coef = ctx.saved_tensors
        order, tokens, counts = ctx.plan
        need_x, need_a, need_b, need_g = ctx.needs_input_grad[:4]
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
        A_e = None if shared else A.unbind(0)
        B_e = B.unbind(0)
        m_e = None if rank_mask is None else rank_mask.unsqueeze(-1).unbind(0)
        dBt_e = dBt.unbind(0) if need_b else None
        dA_e = dA.unbind(0) if dA is not None else None
        dpair = x.new_empty(N) if need_g else None
        for e, start, n, tok in _segments(ctx.plan):
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
            dpair *= _per_pair(s, counts)
            dg = dy.new_zeros(ctx.shape.numel()).index_copy_(0, order, dpair).view(ctx.shape)
        if shared and need_dh:
            dHT = x.new_zeros(r, x.shape[0])  # sum over each token's pairs of dH, rank-major
            for _, start, n, tok in _segments(ctx.plan):
                dHT.index_add_(1, tok, _seg(dh, r, start, n))
            dx = dHT.T @ A if need_x else None
            dA = dHT @ x if need_a else None
        dB = dBt.transpose(1, 2).contiguous() if need_b else None
        return dx, dA, dB, dg, None, None, None, (dy if ctx.has_out else None)


def routed_lora_grouped(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Grouped (sorted, segmented) routed LoRA delta; see the module docstring.

    Dense gates ``[T, E]`` are treated as ``k = E`` (every expert selected). With ``out``
    (``[T, d_out]``, x's dtype) the delta is added into ``out`` in place and ``out`` returned.
    """
    E = B.shape[0]
    if indices is None:
        indices = torch.arange(E, device=x.device).expand(x.shape[0], E)
    plan = routing_plan(indices, E)
    s = _scaling_vector(scaling, E, x)
    mask = None if rank_mask is None else rank_mask.to(device=x.device, dtype=x.dtype)
    if out is not None and out._base is not None:
        # autograd cannot rebase a view's history onto a custom Function that marks it dirty
        # (backward fails with a shape mismatch): add into a view out of place instead
        return out.add_(_GroupedRoutedLoRA.apply(x, A, B, gates.to(x.dtype), plan, s, mask, None))
    return _GroupedRoutedLoRA.apply(x, A, B, gates.to(x.dtype), plan, s, mask, out)
