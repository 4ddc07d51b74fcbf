"""The gathered (batched matrix-vector) torch form of the routed LoRA op, for few rows per expert.

Decoding routes a handful of tokens to many distinct experts: one sequence per adapter, one new
token per sequence per step. The grouped form (:mod:`.grouped`) then runs its per-expert loop for
segments of one or two rows, and its cost is the loop's Python, not arithmetic. This form has no
loop: each token's own experts are gathered and applied as one batched GEMV, as Punica's BGMV and
vLLM's shrink/expand kernels do::

    e[t, j] = indices[t, j]                          (-1 -> any expert, with coefficient 0)
    H[t, j] = m_e * (A_e[t, j] x_t)                  (bmm over [T, k r, d_in] gathered A)
    Y[t]    = sum_j g[t, j] s_e B_e[t, j] H[t, j]    (bmm over [T, d_out, k r] gathered B)

It reads ``k r (d_in + d_out)`` weights per token (each token's experts once), so it wins while
an expert's weights are not reused by many rows; it moves no row of x or y (no sort, no scatter)
and needs no host sync. Backward is autograd's (gathers scatter-add into the stacked weights'
gradients). :func:`molora.kernels.grouped.routed_lora_grouped` switches to it by the measured rule
:data:`molora.kernels.grouped.GATHER_MAX_ROWS_PER_EXPERT`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def routed_lora_gather(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor,
    scaling: Tensor,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
    group_rows: int = 1,
) -> Tensor:
    """Routed LoRA delta by gathering each row group's experts (module docstring).

    ``x [T, d_in]``, ``A [E, r, d_in]`` (or a shared ``[r, d_in]``), ``B [E, d_out, r]``,
    ``gates``/``indices [G, k]`` (``-1`` = no expert) for ``G = T / group_rows`` groups of
    ``group_rows`` consecutive rows that share their decision (a sequence under a per-example
    router: its experts are gathered once and applied to its rows as one small GEMM, as
    Punica's SGMV does; ``group_rows=1``: per token, BGMV), ``scaling [E]`` (x's dtype),
    ``rank_mask [E, r]``. With ``out`` the delta is added into it in place and ``out`` returned."""
    G, k = indices.shape
    E, d_out, r = B.shape
    T = x.shape[0]
    if G * group_rows != T:
        raise ValueError(f"routed_lora_gather: {G} decisions of {group_rows} rows each do not cover x's {T} rows")
    valid = indices >= 0
    e = torch.where(valid, indices, 0)  # [G, k]
    coef = torch.where(valid, gates * scaling[e], 0)  # [G, k]
    x3 = x.view(G, group_rows, -1)
    if A.dim() == 2:  # HydraLoRA: one shrink per row, shared by its k heads
        h = (x3 @ A.T).unsqueeze(2).expand(G, group_rows, k, r)
    else:
        Ag = A.index_select(0, e.view(-1)).view(G, k * r, -1)  # [G, k r, d_in]
        h = torch.bmm(x3, Ag.transpose(1, 2)).view(G, group_rows, k, r)
    if rank_mask is not None:
        h = h * rank_mask.index_select(0, e.view(-1)).view(G, 1, k, r)
    h = (h * coef.view(G, 1, k, 1)).reshape(G, group_rows, k * r)
    Bg = B.index_select(0, e.view(-1))  # [G k, d_out, r]
    Bg = Bg.view(G, d_out, r) if k == 1 else Bg.view(G, k, d_out, r).permute(0, 2, 1, 3).reshape(G, d_out, k * r)
    if out is None:
        return torch.bmm(h, Bg.transpose(1, 2)).view(T, d_out)
    out.view(G, group_rows, d_out).baddbmm_(h, Bg.transpose(1, 2))  # no separate delta to add
    return out
