"""Kernels of the routed LoRA op ``delta = sum_e g_e s_e B_e A_e x``.

``routed_lora`` is the one entry point; backends: ``reference`` (per-expert loop, ground
truth), ``torch`` (the dense concatenated form). ``MOLORA_KERNEL`` overrides the choice.
"""

from __future__ import annotations

import os

from torch import Tensor

from .dense import routed_lora_dense
from .reference import routed_lora_reference

_BACKENDS = {"reference": routed_lora_reference, "torch": routed_lora_dense}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def check_inputs(x: Tensor, A: Tensor, B: Tensor, gates: Tensor, indices: Tensor | None, scaling, rank_mask) -> None:
    """Shape checks shared by every backend (ValueError naming the argument and shapes)."""
    if x.dim() != 2:
        raise ValueError(f"routed_lora: x must be [T, d_in]; got shape {tuple(x.shape)}")
    if B.dim() != 3:
        raise ValueError(f"routed_lora: B must be [E, d_out, r]; got shape {tuple(B.shape)}")
    E, _, r = B.shape
    T, d_in = x.shape
    expected_a = (r, d_in) if A.dim() == 2 else (E, r, d_in)
    if tuple(A.shape) != expected_a:
        raise ValueError(f"routed_lora: A must be {list(expected_a)} for x {list(x.shape)} and B {list(B.shape)}; got {list(A.shape)}")
    if indices is None:
        if tuple(gates.shape) != (T, E):
            raise ValueError(f"routed_lora: dense gates must be [T={T}, E={E}]; got {list(gates.shape)}")
    else:
        if tuple(indices.shape) != tuple(gates.shape) or gates.dim() != 2 or gates.shape[0] != T:
            raise ValueError(f"routed_lora: gates {list(gates.shape)} and indices {list(indices.shape)} must both be [T={T}, k]")
        if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= E):
            raise ValueError(f"routed_lora: indices must be in [-1, {E}); got range [{int(indices.min())}, {int(indices.max())}]")
    if isinstance(scaling, Tensor) and tuple(scaling.shape) != (E,):
        raise ValueError(f"routed_lora: scaling must be a float or [E={E}]; got {list(scaling.shape)}")
    if rank_mask is not None and tuple(rank_mask.shape) != (E, r):
        raise ValueError(f"routed_lora: rank_mask must be [E={E}, r={r}]; got {list(rank_mask.shape)}")


def routed_lora(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    backend: str | None = None,
    rank_mask: Tensor | None = None,
) -> Tensor:
    """Routed LoRA delta ``delta[t] = sum_e g[t,e] s_e B_e (m_e * A_e x_t)`` -> ``[T, d_out]``.

    Args:
        x: ``[T, d_in]``.
        A: ``[E, r, d_in]``, or ``[r, d_in]`` shared by all experts (HydraLoRA).
        B: ``[E, d_out, r]``.
        gates: ``[T, E]`` dense, or ``[T, k]`` with ``indices`` ``[T, k]`` (``-1`` = no expert).
        scaling: a float or ``[E]`` per-expert ``alpha/r``.
        backend: ``reference`` | ``torch``; default from ``MOLORA_KERNEL`` else ``torch``.
        rank_mask: ``[E, r]``; rank components where it is 0 are ignored.
    Differentiable in ``x``, ``A``, ``B`` and ``gates``.
    """
    check_inputs(x, A, B, gates, indices, scaling, rank_mask)
    name = backend or os.environ.get("MOLORA_KERNEL") or "torch"
    if name not in _BACKENDS:
        raise ValueError(f"routed_lora: unknown backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name](x, A, B, gates, indices, scaling, rank_mask)


__all__ = ["available_backends", "check_inputs", "routed_lora", "routed_lora_dense", "routed_lora_reference"]
