"""The dense concatenated form of the routed LoRA op: two GEMMs, no sorting.

With ``A_cat = [A_1; ...; A_E]`` (``E*r x d_in``) and ``B_cat = [B_1, ..., B_E]``
(``d_out x E*r``)::

    H = X A_cat^T                  (T x E*r)
    H'[:, e*r:(e+1)*r] = g_e s_e m_e * H[:, e*r:(e+1)*r]
    Y = H' B_cat^T

Exact for soft gates, top-k gates (zeros elsewhere) and HydraLoRA's shared ``A`` (``H = X A^T``
is computed once and scaled per head). Cheap while ``E*r`` is small next to ``d``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import dense_gates


def routed_lora_dense(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Dense concatenated form (module docstring); with ``out`` the delta is added into it in place."""
    E, d_out, r = B.shape
    g = dense_gates(gates, indices, E).to(x.dtype)
    coef = g * (scaling.to(x.dtype) if isinstance(scaling, Tensor) else float(scaling))  # [T, E]
    B_cat = B.permute(1, 0, 2).reshape(d_out, E * r)
    if A.dim() == 2:  # shared A: one shrink, scaled per head
        h = x @ A.T  # [T, r]
        hp = coef.unsqueeze(-1) * h.unsqueeze(1)  # [T, E, r]
    else:
        h = (x @ A.reshape(E * r, -1).T).view(-1, E, r)
        hp = coef.unsqueeze(-1) * h
    if rank_mask is not None:
        hp = hp * rank_mask.to(hp.dtype)
    if out is not None:
        return out.addmm_(hp.reshape(-1, E * r), B_cat.T)
    return hp.reshape(-1, E * r) @ B_cat.T
