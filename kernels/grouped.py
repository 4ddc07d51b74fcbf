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


class _GroupedRoutedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, gates, plan: RoutingPlan, s: Tensor, rank_mask):  # noqa: D401
        T = x.shape[0]
        E, d_out, r = B.shape
        shared = A.dim() == 2
        order, tokens, counts = plan
        N = tokens.shape[0]
        coef = gates.reshape(-1).index_select(0, order)  # [N] gate of each sorted pair
        if shared:
            h = (x @ A.T).index_select(0, tokens)  # A x once per token, then gathered
            xs = None
        else:
            xs = x.index_select(0, tokens)
            h = x.new_empty(N, r)
        hp = x.new_empty(N, r)
        buf = x.new_empty(N, d_out)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = slice(start, start + n)
            if not shared:
                torch.mm(xs[seg], A[e].T, out=h[seg])
            if rank_mask is not None:
                h[seg] *= rank_mask[e]
            coef[seg] *= s[e]
            torch.mul(h[seg], coef[seg, None], out=hp[seg])
            torch.mm(hp[seg], B[e].T, out=buf[seg])
            start += n
        y = x.new_zeros(T, d_out).index_add_(0, tokens, buf)
        ctx.plan, ctx.shape = plan, gates.shape
        ctx.save_for_backward(x, A, B, s, rank_mask, h, hp, coef)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, s, rank_mask, h, hp, coef = ctx.saved_tensors
        order, tokens, counts = ctx.plan
        need_x, need_a, need_b, need_g = ctx.needs_input_grad[:4]
        E, d_out, r = B.shape
        shared = A.dim() == 2
        N = tokens.shape[0]
        dys = dy.contiguous().index_select(0, tokens)
        U = dy.new_empty(N, r)
        dB = torch.zeros_like(B) if need_b else None
        dA = torch.zeros_like(A) if need_a else None
        need_dh = need_x or need_a
        xs = x.index_select(0, tokens) if (need_a and not shared) else None
        dxs = x.new_empty(N, x.shape[1]) if (need_x and not shared) else None
        dh = dy.new_empty(N, r) if need_dh else None
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = slice(start, start + n)
            torch.mm(dys[seg], B[e], out=U[seg])
            if need_b:
                torch.mm(dys[seg].T, hp[seg], out=dB[e])
            if need_dh:
                torch.mul(U[seg], coef[seg, None], out=dh[seg])
                if rank_mask is not None:
                    dh[seg] *= rank_mask[e]
                if not shared:
                    if need_a:
                        torch.mm(dh[seg].T, xs[seg], out=dA[e])
                    if need_x:
                        torch.mm(dh[seg], A[e], out=dxs[seg])
            start += n
        dx = dg = None
        if need_g:
            # dg = s_e <U, m_e * H> ; h already carries the mask
            seg_scale = torch.repeat_interleave(s, torch.tensor(counts, device=s.device), output_size=N) if N else s[:0]
            dpair = (U * h).sum(-1) * seg_scale
            dg = dy.new_zeros(ctx.shape.numel()).index_copy_(0, order, dpair).view(ctx.shape)
        if shared and need_dh:
            dH = x.new_zeros(x.shape[0], r).index_add_(0, tokens, dh)
            if need_x:
                dx = dH @ A
            if need_a:
                dA = dH.T @ x
        elif need_x:
            dx = x.new_zeros(x.shape).index_add_(0, tokens, dxs)
        return dx, dA, dB, dg, None, None, None


def routed_lora_grouped(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
) -> Tensor:
    """Grouped (sorted, segmented) routed LoRA delta; see the module docstring.

    Dense gates ``[T, E]`` are treated as ``k = E`` (every expert selected).
    """
    E = B.shape[0]
    if indices is None:
        indices = torch.arange(E, device=x.device).expand(x.shape[0], E)
    plan = routing_plan(indices, E)
    s = _scaling_vector(scaling, E, x)
    mask = None if rank_mask is None else rank_mask.to(device=x.device, dtype=x.dtype)
    return _GroupedRoutedLoRA.apply(x, A, B, gates.to(x.dtype), plan, s, mask)
