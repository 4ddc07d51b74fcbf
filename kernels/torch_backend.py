"""The ``torch`` backend: the dense concatenated form or the grouped form, by a measured rule.

Cost model (per token, forward + backward, ``d = d_in + d_out``): the dense form does six GEMMs
over ``E r`` columns (``~6 E r d`` FLOPs, no data movement beyond x and y); the grouped form does
the same GEMMs over only ``k r`` columns but moves ``~5 k d`` values (gather x, gather dY, scatter
Y, scatter dX, re-gather x for dA) and loops over the experts in Python. So the grouped form wins
once ``(E - k) r`` exceeds a constant times ``k``:

    grouped  iff  top-k indices are given  and  (E - k) * r >= GROUPED_MIN_EXCESS_RANK * k

Measured with ``python benchmarks/kernels.py --switch`` (CPU fp32, 2 cores shared with other
jobs, d = 1024, T = 4096, forward + backward, ratio grouped / dense time; < 1 means grouped
is faster)::

    k=1 r=8 : E=2 1.03  E=4 0.84  E=8 0.62  E=16 0.41  E=32 0.23  E=64 0.14
    k=2 r=8 : E=4 1.18  E=8 0.85  E=16 0.55  E=32 0.34  E=64 0.20
    k=1 r=16: E=2 0.89  E=4 0.70  E=8 0.50  E=16 0.34  E=32 0.19  E=64 0.11
    k=2 r=16: E=4 0.96  E=8 0.74  E=16 0.46  E=32 0.29  E=64 0.17

The crossing lies near ``(E - k) r = 16 k`` (k=2, r=8: between E=4 (ratio 1.18) and E=8 (0.85);
k=1, r=8: just above E=2); hence ``GROUPED_MIN_EXCESS_RANK = 16``.
"""

from __future__ import annotations

from torch import Tensor

from .dense import routed_lora_dense
from .grouped import routed_lora_grouped

GROUPED_MIN_EXCESS_RANK = 16


def use_grouped(num_experts: int, rank: int, top_k: int | None) -> bool:
    """The measured dense/grouped switch (see the module docstring); dense gates stay dense."""
    if top_k is None:
        return False
    return (num_experts - top_k) * rank >= GROUPED_MIN_EXCESS_RANK * top_k


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
