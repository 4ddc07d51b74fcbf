"""The reference routed LoRA op: a plain per-expert loop, the ground truth of every test.

    delta[t] = sum_e g[t, e] * s_e * B_e (m_e * (A_e x_t))

Float64-capable and obviously correct; not fast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_gates(gates: Tensor, indices: Tensor | None, num_experts: int) -> Tensor:
    """Top-k gates ``[T, k]`` with expert ``indices`` (``-1`` = none) as dense ``[T, E]`` gates."""
    if indices is None:
        return gates
    valid = indices >= 0
    dense = torch.zeros(gates.shape[0], num_experts, dtype=gates.dtype, device=gates.device)
    return dense.scatter_add(1, indices.clamp_min(0).long(), torch.where(valid, gates, torch.zeros_like(gates)))


def routed_lora_reference(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
) -> Tensor:
    """Per-expert loop of the routed LoRA delta (see the module docstring)."""
    E = B.shape[0]
    g = dense_gates(gates, indices, E)
    s = scaling if isinstance(scaling, Tensor) else torch.full((E,), float(scaling))
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    for e in range(E):
        a = A if A.dim() == 2 else A[e]
        h = x @ a.T
        if rank_mask is not None:
            h = h * rank_mask[e].to(h.dtype)
        out = out + (g[:, e : e + 1] * s[e].to(x.dtype)) * (h @ B[e].T)
    return out
