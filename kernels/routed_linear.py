"""The routed layer as kernel steps the layer calls in order: project, (the router decides), expand.

    y = x W^T + b + sum_e g_e s_e B_e (m_e * A_e x),        (g, idx) = router(x W_r^T)

1. :func:`project` runs every linear map of ``x`` the layer needs in one GEMM each way
   (:func:`~molora.kernels.linear.shared_input_linear`): the frozen base ``x W^T + b``, the LoRA
   shrink ``x A_cat^T`` (dense form only) and the router logits ``x W_r^T``, any of them absent;
2. the router turns the logits into gates (the layer does this; no kernel calls back into it);
3. :func:`expand` adds the routed delta into the base output: the dense form gates and expands
   the shrink (:func:`~molora.kernels.dense.dense_gate_expand`), the grouped form gathers each
   expert's tokens (:func:`~molora.kernels.grouped.routed_lora_grouped`), other backends call
   :func:`~molora.kernels.routed_lora`.

Which form runs is decided once per call, before the logits exist, by :func:`plan` (the measured
dense/grouped switch of :mod:`.torch_backend`), because the dense form's shrink rides in step 1's
GEMM. Each step is a pure function of its arguments, so the same layer can run in many threads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dense import dense_gate_expand, dense_shrink_weight
from .grouped import routed_lora_grouped
from .linear import shared_input_linear
from .torch_backend import use_grouped


class Plan(NamedTuple):
    """How one call runs: the backend (``torch``, ``triton`` or ``reference``) and, for ``torch``,
    the grouped form (``True``) or the dense form (``False``)."""

    backend: str
    grouped: bool

    @property
    def shrink_in_projection(self) -> bool:
        """Whether :func:`project` computes the LoRA shrink (the torch backend's dense form)."""
        return self.backend == "torch" and not self.grouped


class Projections(NamedTuple):
    """Step 1's outputs (``None`` where not asked for): ``out`` the base output ``[T, d_out]``,
    ``shrink`` ``x A_cat^T`` ``[T, E r]``, ``logits`` ``x W_r^T`` ``[T, E_r]``."""

    out: Tensor | None
    shrink: Tensor | None
    logits: Tensor | None


def plan(backend: str, num_experts: int, rank: int, top_k: int | None, threads: int | None = None) -> Plan:
    """The form of one call: grouped iff the torch backend and ``E r > 32 k threads``
    (:func:`~molora.kernels.torch_backend.use_grouped`; ``top_k=None``: dense gates, dense form).

    Under torch.compile the grouped form runs as one custom op
    (:func:`~molora.kernels.grouped.grouped_lora_op`): its segment bounds are data, which dynamo
    would otherwise have to break the graph for."""
    grouped = backend == "torch" and use_grouped(num_experts, rank, top_k, threads)
    return Plan(backend, grouped)


def project(
    x: Tensor,
    plan: Plan,
    A: Tensor,
    base_weight: Tensor | None = None,
    base_bias: Tensor | None = None,
    router_weight: Tensor | None = None,
    shrink: bool = True,
) -> Projections:
    """Step 1: the linear maps of ``x [T, d_in]`` in one GEMM each way (forward, ``dx``, weight grads).

    ``base_weight [d_out, d_in]`` and ``base_bias`` are the frozen base layer's (``None``: the
    caller runs the base layer itself); ``router_weight [E_r, d_in]`` a linear router's
    projection (``None``: the router scores its own input). The shrink joins when
    ``plan.shrink_in_projection`` and ``shrink`` (``False`` while LoRA dropout changes the
    experts' input). With the torch backend the outputs are column blocks of one
    ``[T, sum n_i]`` buffer (rows padded: ``view`` works on leading dims only); other backends
    run the base linear and the logits as separate GEMMs and compute the shrink in their kernel.
    """
    if base_weight is None and base_bias is not None:
        raise ValueError("kernels.project: base_bias needs base_weight")
    if base_weight is not None and (base_weight.requires_grad or (base_bias is not None and base_bias.requires_grad)):
        raise ValueError("kernels.project: the base weight and bias must be frozen (requires_grad=False)")
    names = []
    weights = []
    if base_weight is not None:
        names.append("out")
        weights.append(base_weight)
    if shrink and plan.shrink_in_projection:
        names.append("shrink")
        weights.append(dense_shrink_weight(A))
    if router_weight is not None:
        names.append("logits")
        weights.append(router_weight)
    parts: dict[str, Tensor] = {}
    if plan.backend == "torch" and weights:
        values = shared_input_linear(x, *weights, bias=base_bias if base_weight is not None else None)
        parts = dict(zip(names, values if len(weights) > 1 else (values,)))
    else:
        if base_weight is not None:
            parts["out"] = F.linear(x, base_weight, base_bias)
        if router_weight is not None:
            parts["logits"] = shared_input_linear(x, router_weight)
    return Projections(parts.get("out"), parts.get("shrink"), parts.get("logits"))


def expand(
    x: Tensor,
    plan: Plan,
    shrink: Tensor | None,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None,
    scaling: float | Tensor = 1.0,
    out: Tensor | None = None,
    rank_mask: Tensor | None = None,
    group_rows: int = 1,
) -> Tensor:
    """Step 3: add the routed delta ``sum_e g_e s_e B_e (m_e * A_e x)`` into ``out`` (in place;
    returned) or return it (``out=None``). ``shrink`` is step 1's (dense form), else ``None``.
    ``group_rows``: the decision is per group of that many consecutive rows (per example: a
    sequence's tokens), which the grouped form gathers per group instead of per token.

    ``gates``/``indices`` are a router's decision (``[T, E]`` dense, or ``[T, k]`` with indices,
    ``-1`` = none), trusted as routers make them: shapes are checked, index values are not (a
    host sync); :func:`molora.kernels.routed_lora` checks them for callers' own gates.
    """
    from . import check_inputs, routed_lora

    check_inputs(x, A, B, gates, indices, scaling, rank_mask, check_values=False, group_rows=group_rows)
    if group_rows != 1 and not (plan.backend == "torch" and plan.grouped):
        gates = gates.repeat_interleave(group_rows, 0)
        indices = None if indices is None else indices.repeat_interleave(group_rows, 0)
    if plan.backend != "torch":
        return routed_lora(x, A, B, gates, indices, scaling, plan.backend, rank_mask, out)
    if plan.grouped:
        # the grouped form scatter-adds rows: into a contiguous output, not into a column block of
        # the wider projection buffer (index_add_ into strided rows is much slower); compiled, its
        # op copies ``out`` into a contiguous result itself
        if out is not None and not torch.compiler.is_compiling():
            out = out.contiguous()
        return routed_lora_grouped(x, A, B, gates, indices, scaling, rank_mask, out, group_rows=group_rows)
    if shrink is None:
        shrink = shared_input_linear(x, dense_shrink_weight(A))
    return dense_gate_expand(shrink, B, gates, indices, scaling, rank_mask, out)
