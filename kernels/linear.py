"""Several linear maps of one input in one GEMM each way: ``Z_i = X W_i^T (+ b)``.

With ``W = [W_1; ...; W_n]`` (rows stacked) and ``G = [dZ_1, ..., dZ_n]`` (columns side by side)::

    Z = X W^T (+ [b; 0])       (one GEMM, split by columns; the bias is the first map's)
    dW_i = G_i^T X             (one GEMM over the trainable maps' columns: every weight gradient)
    dX = G W                   (the sum of every map's input gradient)

instead of ``n`` GEMMs each way and ``n - 1`` extra passes adding the ``dX`` contributions. The
routed layer uses it for the frozen base linear, the LoRA shrink ``X A_cat^T`` and the router
logits ``X W_r^T`` together (all three read the same ``X``: :mod:`molora.kernels.routed_linear`),
for the shrink with the logits alone, and for a lone router projection.

A frozen weight (``requires_grad=False``, such as the base layer's) gets no weight gradient and
its ``dX`` term is its own GEMM, ``dX = G_0 W_0``, into which the trainable maps' term
``[G_1..G_n] [W_1; ..; W_n]`` is accumulated (``addmm_``): the backward keeps no stacked copy of
a large frozen weight alive and copies no ``[T, d_out]`` gradient into a stacked buffer.

The outputs are column blocks of one ``[T, sum n_i]`` buffer, returned as tensors of their own
(not autograd views of it), so the first one (the base output) can take an in-place add of the
LoRA delta; the blocks do not overlap, so an in-place change of one leaves the others intact.

``dX`` is written into a preallocated buffer (``torch.mm(..., out=)``): for an inner dimension
of a few columns (a router with 8 experts: ``[T, 8] x [8, d]``) torch's functional ``mm`` takes
a path that is ~4x slower on a CPU than BLAS into an existing output (measured, torch 2.13,
fp32, T = 4096, d = 1024, one thread: 9.3 ms vs 2.3 ms).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _column_block(z: Tensor, start: int, width: int) -> Tensor:
    """Columns ``[start, start + width)`` of the 2-D ``z`` as a tensor sharing z's memory but not
    an autograd view of it (so that it may be modified in place when returned from a Function)."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace storage_offset/set_; under compile the Function's outputs are
        # functionalised anyway, so a plain slice serves
        return z[:, start:start + width]
    rows, cols = z.shape
    return z.new_empty(0).set_(z.untyped_storage(), z.storage_offset() + start, (rows, width), (cols, 1))


class _SharedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, has_bias: bool, *tensors: Tensor):  # noqa: D401
        # the bias travels in *tensors, not as a None-able argument: dynamo misplaces the
        # positional arguments of Function.apply when one of them is None
        bias, weights = (tensors[0], tensors[1:]) if has_bias else (None, tensors)
        sizes = [w.shape[0] for w in weights]
        if len(weights) > 1:
            # rows of z start on 64-byte boundaries: an odd width (1024 + 32 + 4 columns) makes the
            # GEMM ~20% slower on a CPU (measured: N = 1060 109 ms, 1064 90 ms, 1024 95 ms, one
            # thread); the zero rows join the one stacking copy
            w0 = weights[0]
            step = max(1, 64 // w0.element_size())
            pad = (step - sum(sizes) % step) % step  # non-negative operands: dynamo traces them
            W = torch.cat([*weights, w0.new_zeros(pad, w0.shape[1])] if pad else weights)
        else:
            W = weights[0]
        z = x.new_empty(x.shape[0], W.shape[0])
        if bias is None:
            torch.mm(x, W.T, out=z)
        else:
            zeros = bias.new_zeros(W.shape[0] - bias.shape[0])
            torch.addmm(torch.cat([bias, zeros]) if zeros.numel() else bias, x, W.T, out=z)
        ctx.sizes, ctx.has_bias = sizes, has_bias
        ctx.save_for_backward(x, *weights)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return tuple(_column_block(z, s, n) for s, n in zip(starts, sizes)) if len(weights) > 1 else z

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, *weights = ctx.saved_tensors
        need_w = ctx.needs_input_grad[3:] if ctx.has_bias else ctx.needs_input_grad[2:]
        # frozen maps: their own dx GEMM (no stacked copy); trainable maps: one GEMM each way
        frozen = [i for i, need in enumerate(need_w) if not need and grads[i] is not None]
        train = [i for i, need in enumerate(need_w) if need]
        g_train = None
        if train:
            parts = [grads[i] if grads[i] is not None else x.new_zeros(x.shape[0], ctx.sizes[i]) for i in train]
            g_train = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        dx = None
        if ctx.needs_input_grad[0]:
            terms = [(grads[i], weights[i]) for i in frozen]
            if g_train is not None:
                w_train = torch.cat([weights[i] for i in train]) if len(train) > 1 else weights[train[0]]
                terms.append((g_train, w_train))
            for g, w in terms:
                if dx is None:
                    dx = torch.mm(g, w, out=g.new_empty(g.shape[0], w.shape[1]))
                else:
                    dx.addmm_(g, w)
            if dx is None:
                dx = torch.zeros_like(x)
        dws: list[Tensor | None] = [None] * len(weights)
        if g_train is not None:
            for i, dw in zip(train, (g_train.T @ x).split([ctx.sizes[i] for i in train], dim=0)):
                dws[i] = dw
        # the bias is the frozen base layer's: no gradient
        return (dx, None, *([None] if ctx.has_bias else []), *dws)


def shared_input_linear(x: Tensor, *weights: Tensor, bias: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
    """``x W_i^T`` for each ``W_i [n_i, d_in]`` of ``x [T, d_in]``: one tensor for one weight,
    else a tuple of ``[T, n_i]`` column blocks of one ``[T, sum n_i]`` product (see the module
    docstring). ``bias`` ``[n_1]`` is added to the first map (the frozen base layer's bias: it
    gets no gradient). Differentiable in ``x`` and every weight that requires grad."""
    if x.dim() != 2 or not weights or any(w.dim() != 2 or w.shape[1] != x.shape[1] for w in weights):
        raise ValueError(f"shared_input_linear: x must be [T, d_in] and each weight [n, d_in]; got x {list(x.shape)}, "
                         f"weights {[list(w.shape) for w in weights]}")
    if bias is not None and tuple(bias.shape) != (weights[0].shape[0],):
        raise ValueError(f"shared_input_linear: bias must be [{weights[0].shape[0]}] (the first weight's rows); "
                         f"got {list(bias.shape)}")
    if bias is not None and bias.requires_grad:
        raise ValueError("shared_input_linear: the bias is the frozen base layer's and takes no gradient; "
                         "got a bias that requires grad")
    return _SharedInputLinear.apply(x, bias is not None, *((bias,) if bias is not None else ()), *weights)
