"""The dense concatenated form of the routed LoRA op: two GEMMs, no sorting.

With ``A_cat = [A_1; ...; A_E]`` (``E*r x d_in``) and ``B_cat = [B_1, ..., B_E]``
(``d_out x E*r``)::

    H = X A_cat^T                  (T x E*r)
    H'[:, e*r:(e+1)*r] = g_e s_e m_e * H[:, e*r:(e+1)*r]
    Y = H' B_cat^T                 (added into the base output in place: Y.addmm_(H', B_cat^T))

Exact for soft gates, top-k gates (zeros elsewhere) and HydraLoRA's shared ``A`` (``H = X A^T``
is computed once and scaled per head). Cheap while ``E*r`` is small next to ``d``. The shrink is
split from the rest (:func:`dense_shrink_weight`, :func:`dense_gate_expand`) so that the routed
layer can compute ``H`` and the router logits ``X W_r^T`` in one GEMM
(:mod:`molora.kernels.routed_linear`). Backward: autograd, with the shrink's
``dX = dH A_cat`` and ``dA = dH^T X`` as single GEMMs (:mod:`.linear`); the expand's in-place
``addmm_`` gives ``dH' = dY B_cat`` and ``dB_cat^T = H'^T dY``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import shared_input_linear
from .reference import dense_gates


def dense_shrink_weight(A: Tensor) -> Tensor:
    """The shrink's weight rows: ``A_cat [E*r, d_in]``, or the shared ``A [r, d_in]`` itself."""
    return A if A.dim() == 2 else A.reshape(-1, A.shape[-1])


def dense_gate_expand(
    h: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Gate and expand a shrink ``h = x dense_shrink_weight(A)^T`` (``[T, E*r]``, or ``[T, r]``
    for a shared ``A``): ``Y = H' B_cat^T``, added into ``out`` in place when given."""
    E, d_out, r = B.shape
    T = h.shape[0]
    g = dense_gates(gates, indices, E).to(h.dtype)
    coef = g * (scaling.to(h.dtype) if isinstance(scaling, Tensor) else float(scaling))  # [T, E]
    scale = coef.unsqueeze(-1)  # [T, E, 1]
    if rank_mask is not None:
        scale = scale * rank_mask.to(h.dtype)  # [T, E, r]: the mask is applied on the small tensor
    # shared A: one shrink [T, r], scaled per head; else the per-expert blocks of [T, E*r]
    hp = (h.unsqueeze(1) if h.shape[1] == r else h.view(T, E, r)) * scale
    B_cat_T = B.transpose(1, 2).reshape(E * r, d_out)  # [E*r, d_out], contiguous: the faster operand
    hp = hp.reshape(T, E * r)
    if out is not None:
        # in place saves a [T, d_out] temporary in eager; compiled graphs are functional (and
        # the column blocks of a shared GEMM are views there), so add out of place
        return torch.addmm(out, hp, B_cat_T) if torch.compiler.is_compiling() else out.addmm_(hp, B_cat_T)
    return hp @ B_cat_T


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
    return dense_gate_expand(shared_input_linear(x, dense_shrink_weight(A)), B, gates, indices, scaling, rank_mask, out)
