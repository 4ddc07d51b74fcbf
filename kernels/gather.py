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
) -> Tensor:
    """Routed LoRA delta by gathering each token's experts (module docstring).

    ``x [T, d_in]``, ``A [E, r, d_in]`` (or a shared ``[r, d_in]``), ``B [E, d_out, r]``,
    ``gates``/``indices [T, k]`` (``-1`` = no expert), ``scaling [E]`` (x's dtype), ``rank_mask
    [E, r]``. With ``out`` the delta is added into it in place and ``out`` returned."""
    T, k = indices.shape
    E, d_out, r = B.shape
    valid = indices >= 0
    e = torch.where(valid, indices, 0)  # [T, k]
    coef = torch.where(valid, gates * scaling[e], 0)  # [T, k]
    if A.dim() == 2:  # HydraLoRA: one shrink per token, shared by its k heads
        h = (x @ A.T).unsqueeze(1).expand(T, k, r)
    else:
        h = torch.bmm(A.index_select(0, e.view(-1)).view(T, k * r, -1), x.unsqueeze(-1)).view(T, k, r)
    if rank_mask is not None:
        h = h * rank_mask.index_select(0, e.view(-1)).view(T, k, r)
    h = h * coef.unsqueeze(-1)
    Bg = B.index_select(0, e.view(-1))  # [T k, d_out, r]
    Bg = Bg.view(T, d_out, r) if k == 1 else Bg.view(T, k, d_out, r).permute(0, 2, 1, 3).reshape(T, d_out, k * r)
    delta = torch.bmm(Bg, h.reshape(T, k * r, 1)).view(T, d_out)
    return delta if out is None else out.add_(delta)
