"""Several linear maps of one input in one GEMM each way: ``Z_i = X W_i^T``.

With ``W = [W_1; ...; W_n]`` (rows stacked) and ``G = [dZ_1, ..., dZ_n]`` (columns side by side)::

    Z = X W^T                  (one GEMM, split by columns)
    dW = G^T X                 (one GEMM, split by rows: every weight gradient)
    dX = G W                   (one GEMM: the sum of every map's input gradient)

instead of ``n`` GEMMs each way and ``n - 1`` extra passes adding the ``dX`` contributions. The
routed layer uses it for the LoRA shrink ``X A_cat^T`` together with the router logits
``X W_r^T`` (the two read the same ``X``), and for a lone router projection.

``dX`` is written into a preallocated buffer (``torch.mm(..., out=)``): for an inner dimension
of a few columns (a router with 8 experts: ``[T, 8] x [8, d]``) torch's functional ``mm`` takes
a path that is ~4x slower on a CPU than BLAS into an existing output (measured, torch 2.13,
fp32, T = 4096, d = 1024, one thread: 9.3 ms vs 2.3 ms).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _SharedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *weights: Tensor):  # noqa: D401
        W = torch.cat(weights) if len(weights) > 1 else weights[0]
        z = x @ W.T
        ctx.sizes = [w.shape[0] for w in weights]
        ctx.save_for_backward(x, W)
        return tuple(z.split(ctx.sizes, dim=1)) if len(weights) > 1 else z

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, W = ctx.saved_tensors
        if len(grads) > 1:
            grads = [g if g is not None else x.new_zeros(x.shape[0], n) for g, n in zip(grads, ctx.sizes)]
            g = torch.cat(grads, dim=1)
        else:
            g = grads[0]
        dx = torch.mm(g, W, out=g.new_empty(g.shape[0], W.shape[1])) if ctx.needs_input_grad[0] else None
        dws = [None] * len(ctx.sizes)
        if any(ctx.needs_input_grad[1:]):
            dws = list((g.T @ x).split(ctx.sizes, dim=0))
        return (dx, *(dw if need else None for dw, need in zip(dws, ctx.needs_input_grad[1:])))


def shared_input_linear(x: Tensor, *weights: Tensor) -> Tensor | tuple[Tensor, ...]:
    """``x W_i^T`` for each ``W_i [n_i, d_in]`` of ``x [T, d_in]``: one tensor for one weight,
    else a tuple of ``[T, n_i]`` column blocks of one ``[T, sum n_i]`` product (see the module
    docstring). Differentiable in ``x`` and every weight."""
    if x.dim() != 2 or not weights or any(w.dim() != 2 or w.shape[1] != x.shape[1] for w in weights):
        raise ValueError(f"shared_input_linear: x must be [T, d_in] and each weight [n, d_in]; got x {list(x.shape)}, "
                         f"weights {[list(w.shape) for w in weights]}")
    return _SharedInputLinear.apply(x, *weights)
