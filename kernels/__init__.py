"""Kernels of the routed LoRA op ``delta = sum_e g_e s_e B_e A_e x``.

``routed_lora`` is the one entry point of the op; the routed layer runs it as three steps
(:mod:`.routed_linear`: :func:`project` the base output, LoRA shrink and router logits in one
GEMM, the router decides, :func:`expand` the delta into the base output). Backends:

* ``reference``: per-expert loop, the ground truth of the tests (:mod:`.reference`);
* ``torch``: the dense concatenated form, or the sorted/segmented grouped form for many
  experts and small k, switched by a measured rule (:mod:`.torch_backend`);
* ``triton``: fused dense and grouped Triton kernels (:mod:`.triton_backend`), for CUDA
  tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests). Imported lazily, so a CPU-only
  install without Triton works.

Default: ``triton`` for CUDA tensors when Triton is installed, else ``torch`` (CPU tensors,
also under ``TRITON_INTERPRET=1``).
``MOLORA_KERNEL=reference|torch|triton`` overrides the default; ``backend=`` overrides both.
"""

from __future__ import annotations

if __name__ == "kernels":  # pragma: no cover - only from the source root
    # This folder installs as molora.kernels. Imported as top-level ``kernels`` it is Python finding
    # the source root on sys.path first (``python -m ...`` / ``python -c`` run there), in place of
    # Hugging Face's ``kernels`` package, which transformers imports: say so instead of failing
    # deep inside transformers.
    raise ImportError("the molora source folder 'kernels/' was imported as the top-level 'kernels' package (it "
                      "installs as molora.kernels): the current folder, the molora source root, is on sys.path and "
                      "shadows Hugging Face's 'kernels', which transformers imports. Run from another folder, or run "
                      "the tests with the 'pytest' command rather than 'python -m pytest'")

import importlib.util
import os

import torch
from torch import Tensor

from .dense import routed_lora_dense
from .grouped import routed_lora_grouped
from .reference import routed_lora_reference
from .linear import shared_input_linear
from .routed_linear import Plan, Projections, expand, plan, project
from .torch_backend import routed_lora_torch

BACKENDS = ("reference", "torch", "triton")


def triton_available() -> bool:
    """Whether the Triton backend can run here (Triton importable)."""
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if b != "triton" or triton_available()]


def default_backend(x: Tensor) -> str:
    """``MOLORA_KERNEL`` if set; else ``triton`` for CUDA tensors when Triton is installed; else
    ``torch``. Triton's CPU interpreter (``TRITON_INTERPRET=1``) is a test tool, never a default:
    ask for it with ``backend="triton"`` or ``MOLORA_KERNEL=triton``."""
    name = os.environ.get("MOLORA_KERNEL")
    if name:
        return name
    if x.is_cuda and triton_available():
        return "triton"
    return "torch"


def _backend_fn(name: str):
    if name == "reference":
        return routed_lora_reference
    if name == "torch":
        return routed_lora_torch
    if name == "triton":
        if not triton_available():
            raise ValueError("routed_lora: backend 'triton' needs the triton package (pip install triton)")
        from .triton_backend import routed_lora_triton

        return routed_lora_triton
    raise ValueError(f"routed_lora: unknown backend {name!r}; available: {available_backends()}")


def check_inputs(x: Tensor, A: Tensor, B: Tensor, gates: Tensor, indices: Tensor | None, scaling, rank_mask,
                 check_values: bool = True, group_rows: int = 1) -> None:
    """Shape checks shared by every backend (ValueError naming the argument and shapes); with
    ``check_values`` also the range of ``indices`` (a host sync, skipped while compiling).
    ``group_rows``: the decision has one row per group of that many consecutive rows of x."""
    if x.dim() != 2:
        raise ValueError(f"routed_lora: x must be [T, d_in]; got shape {tuple(x.shape)}")
    if B.dim() != 3:
        raise ValueError(f"routed_lora: B must be [E, d_out, r]; got shape {tuple(B.shape)}")
    E, _, r = B.shape
    T, d_in = x.shape
    if group_rows != 1:
        if group_rows < 1 or T % group_rows:
            raise ValueError(f"routed_lora: x's {T} rows do not split into groups of {group_rows}")
        T //= group_rows
    expected_a = (r, d_in) if A.dim() == 2 else (E, r, d_in)
    if tuple(A.shape) != expected_a:
        raise ValueError(f"routed_lora: A must be {list(expected_a)} for x {list(x.shape)} and B {list(B.shape)}; got {list(A.shape)}")
    if indices is None:
        if tuple(gates.shape) != (T, E):
            raise ValueError(f"routed_lora: dense gates must be [T={T}, E={E}]; got {list(gates.shape)}")
    else:
        if tuple(indices.shape) != tuple(gates.shape) or gates.dim() != 2 or gates.shape[0] != T:
            raise ValueError(f"routed_lora: gates {list(gates.shape)} and indices {list(indices.shape)} must both be [T={T}, k]")
        if check_values and not torch.compiler.is_compiling() and indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= E):
            raise ValueError(f"routed_lora: indices must be in [-1, {E}); got range [{int(indices.min())}, {int(indices.max())}]")
    if isinstance(scaling, Tensor) and tuple(scaling.shape) != (E,):
        raise ValueError(f"routed_lora: scaling must be a float or [E={E}]; got {list(scaling.shape)}")
    if rank_mask is not None and tuple(rank_mask.shape) != (E, r):
        raise ValueError(f"routed_lora: rank_mask must be [E={E}, r={r}]; got {list(rank_mask.shape)}")


def _check_out(x: Tensor, B: Tensor, out: Tensor | None) -> None:
    if out is not None and (tuple(out.shape) != (x.shape[0], B.shape[1]) or out.dtype != x.dtype):
        raise ValueError(f"routed_lora: out must be [T={x.shape[0]}, d_out={B.shape[1]}] of dtype {x.dtype}; "
                         f"got {list(out.shape)} {out.dtype}")


def routed_lora(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    backend: str | None = None,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Routed LoRA delta ``delta[t] = sum_e g[t,e] s_e B_e (m_e * A_e x_t)`` -> ``[T, d_out]``.

    Args:
        x: ``[T, d_in]``.
        A: ``[E, r, d_in]``, or ``[r, d_in]`` shared by all experts (HydraLoRA).
        B: ``[E, d_out, r]``.
        gates: ``[T, E]`` dense, or ``[T, k]`` with ``indices`` ``[T, k]`` (``-1`` = no expert).
        scaling: a float or ``[E]`` per-expert ``alpha/r``.
        backend: ``reference`` | ``torch`` | ``triton``; default :func:`default_backend`.
        rank_mask: ``[E, r]``; rank components where it is 0 are ignored.
        out: optional ``[T, d_out]`` tensor of x's dtype (typically the base layer's output) that
            the delta is added into in place; it is then returned. Saves a ``[T, d_out]``
            temporary and an add (the torch backend accumulates straight into it).
    Differentiable in ``x``, ``A``, ``B`` and ``gates`` (and ``out``, as the identity).
    """
    check_inputs(x, A, B, gates, indices, scaling, rank_mask)
    _check_out(x, B, out)
    name = backend or default_backend(x)
    fn = _backend_fn(name)
    if name == "torch":
        return fn(x, A, B, gates, indices, scaling, rank_mask, out)
    delta = fn(x, A, B, gates, indices, scaling, rank_mask)
    return delta if out is None else out.add_(delta)


__all__ = [
    "available_backends",
    "check_inputs",
    "default_backend",
    "routed_lora",
    "routed_lora_dense",
    "routed_lora_grouped",
    "routed_lora_reference",
    "routed_lora_torch",
    "expand",
    "plan",
    "project",
    "Plan",
    "Projections",
    "shared_input_linear",
    "triton_available",
]
