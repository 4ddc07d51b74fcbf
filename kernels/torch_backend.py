"""The ``torch`` backend: the dense concatenated form or the grouped form, by a measured rule.

Cost model (per token, forward + backward, ``d = d_in + d_out``): the dense form does six GEMMs
over ``E r`` columns (``~6 E r d`` FLOPs) and moves nothing beyond x, y and their gradients; the
grouped form does the same GEMMs over only the ``k`` selected experts, but gathers and scatters
``k`` rows per token several times (x and dY gathered, Y and dX scatter-added, x re-gathered for
``dA``) and loops over the experts in Python. Rank-``r`` GEMMs are memory-bound on a CPU, so the
grouped cost hardly depends on ``r``: the switch is a ratio of experts to slots:

    grouped  iff  top-k indices are given  and  E >= GROUPED_MIN_EXPERTS_PER_SLOT * k

Measured with ``python benchmarks/kernels.py --switch --repeats 3 --threads 1`` (CPU fp32,
one thread, 2 cores shared with 3 other jobs; d = 1024, T = 4096, base linear + router +
delta, forward + backward; time of the grouped form / time of the dense form, < 1 means
grouped is faster; ``benchmarks/results/kernels-switch-cpu.json``)::

    k=1 r=8 : E=2 1.07  E=4 0.96  E=8 0.93  E=16 0.76  E=32 0.70  E=64 0.58
    k=2 r=8 : E=4 1.10  E=8 0.86  E=16 1.22  E=32 0.69  E=64 0.50
    k=1 r=16: E=2 0.88  E=4 0.92  E=8 0.87  E=16 0.68  E=32 0.50  E=64 0.35
    k=2 r=16: E=4 1.08  E=8 0.83  E=16 0.70  E=32 0.53  E=64 0.35

The grouped form wins from ``E = 4k`` on in every row (the E=16 k=2 r=8 point is noise: its
neighbours are 0.86 and 0.69); below, only E=2 k=1 r=16 favours it, by 12%. Hence
``GROUPED_MIN_EXPERTS_PER_SLOT = 4``. Dense gates (every expert selected) stay dense.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .dense import dense_gate_expand, dense_shrink_weight, routed_lora_dense
from .grouped import routed_lora_grouped
from .linear import shared_input_linear

GROUPED_MIN_EXPERTS_PER_SLOT = 4


def use_grouped(num_experts: int, rank: int, top_k: int | None) -> bool:
    """The measured dense/grouped switch (see the module docstring); dense gates stay dense.

    ``rank`` is part of the signature because the cost model has it; the CPU measurements
    showed no dependence on it between r = 8 and r = 16."""
    if top_k is None:
        return False
    return num_experts >= GROUPED_MIN_EXPERTS_PER_SLOT * top_k


def routed_lora_torch(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    gates: Tensor,
    indices: Tensor | None = None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Routed LoRA delta in plain torch: dense or grouped form by :func:`use_grouped`."""
    E, _, r = B.shape
    k = None if indices is None else indices.shape[1]
    fn = routed_lora_grouped if use_grouped(E, r, k) else routed_lora_dense
    return fn(x, A, B, gates, indices, scaling, rank_mask, out)


def routed_lora_torch_with_router(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    router_weight: Tensor,
    route: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    top_k: int | None,
    scaling: float | Tensor = 1.0,
    rank_mask: Tensor | None = None,
    out: Tensor | None = None,
    grouped: bool | None = None,
) -> Tensor:
    """Router logits ``x W_r^T`` and the routed LoRA delta, sharing the GEMMs over ``x``.

    In the dense form the shrink ``x A_cat^T`` and the logits are one GEMM (and so are their
    weight gradients and their ``dx``: :mod:`.linear`); in the grouped form the logits are a
    separate :func:`shared_input_linear`. ``route(logits) -> (gates, indices)`` is the router's
    softmax / top-k; ``top_k`` (its k, ``None`` for dense gates) picks the form before the
    logits exist (``grouped`` forces it)."""
    E, _, r = B.shape
    if grouped is None:
        grouped = use_grouped(E, r, top_k)
    if grouped:
        gates, indices = route(shared_input_linear(x, router_weight))
        return routed_lora_grouped(x, A, B, gates, indices, scaling, rank_mask, out)
    h, logits = shared_input_linear(x, dense_shrink_weight(A), router_weight)
    gates, indices = route(logits)
    return dense_gate_expand(h, B, gates, indices, scaling, rank_mask, out)
