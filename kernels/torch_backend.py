"""The ``torch`` backend: the dense concatenated form or the grouped form, by a measured rule.

Cost model (per token, forward + backward, ``d = d_in + d_out``): the dense form does six GEMMs
over ``E r`` columns (``~6 E r d`` FLOPs; with a linear router, its logits ride in the same
GEMMs, and in the routed layer the shrink and the logits ride in the frozen base linear's GEMM:
:mod:`.routed_linear`) and moves nothing beyond x, y and their gradients; its
GEMMs use every intra-op thread. The grouped form does the GEMMs over only the
``k`` selected experts, but gathers and scatters ``k`` rows of x, y, dy and dx per token and
loops over the experts in Python on one thread (:func:`molora.kernels.grouped._one_thread`);
its rank-``r`` GEMMs are memory-bound, so its cost is ``~ k`` row moves per token, nearly
independent of ``r``. Both scale with ``d``, so ``d`` drops out, and the switch is::

    grouped  iff  top-k indices are given  and  E r > GROUPED_MIN_COLUMNS_PER_SLOT * k * threads

with ``threads = torch.get_num_threads()``. Dense gates (every expert selected) stay dense.

Measured with ``python benchmarks/grouped_kernels.py --switch --repeats 5 --threads 1 --clock cpu``
(CPU fp32, one thread, timed by the thread's CPU time; d = 1024, T = 4096, the whole layer as
:mod:`molora.kernels.routed_linear` runs it: the dense form with the base output, the LoRA
shrink and the router logits in one GEMM, the grouped form with the base output and the router
logits in one GEMM; forward + backward; time of the grouped form / time of the dense form, < 1
means grouped is faster; ``benchmarks/results/kernels-switch-cpu-cpuclock.json``)::

    k=1 r=8 : E=2 1.05  E=4 1.02  E=8 0.99  E=16 0.83  E=32 0.67  E=64 0.49
    k=2 r=8 : E=4 1.12  E=8 1.06  E=16 0.96  E=32 0.75  E=64 0.54
    k=1 r=16: E=2 1.05  E=4 0.98  E=8 0.82  E=16 0.67  E=32 0.50  E=64 0.32
    k=2 r=16: E=4 1.07  E=8 0.95  E=16 0.75  E=32 0.55  E=64 0.36

The grouped form wins once ``E r > 32 k``: k=1 from E r = 64 on (r=8: E=8, a tie; r=16: E=4),
k=2 from E r = 128 on (r=8: E=16; r=16: E=8); at ``E r = 32 k`` and below the dense form is
faster (k=2 r=8 E=8: 1.06). The same rule held before the base linear joined both forms' GEMMs
(``benchmarks/results/kernels-switch-cpu.json``: k=2 r=8 E=8 1.01, E=16 0.91). Hence
``GROUPED_MIN_COLUMNS_PER_SLOT = 32``.

The ``threads`` factor: with ``n`` threads the dense form's GEMMs run ~``n`` times faster and the
grouped loop does not, so the crossing moves to ``n`` times more columns. Measured with two
threads (``python benchmarks/grouped_kernels.py --switch --repeats 3``, same shapes, one other job on
the 2 cores; before the base linear joined the forms' GEMMs;
``benchmarks/results/kernels-switch-cpu-threads2.json``)::

    k=1 r=8 : E=2 1.20  E=4 1.17  E=8 1.05  E=16 0.96  E=32 0.79  E=64 0.54
    k=2 r=8 : E=4 1.30  E=8 1.20  E=16 1.00  E=32 0.91  E=64 0.69
    k=1 r=16: E=2 1.16  E=4 1.11  E=8 0.87  E=16 0.75  E=32 0.62  E=64 0.39
    k=2 r=16: E=4 1.09  E=8 1.13  E=16 0.91  E=32 0.68  E=64 0.46

Grouped wins from ``E r > 64 k`` on in every row (k=2 r=8 E=16, ``E r = 64 k``: a tie), as the
rule says for two threads. While the other core is busy with other work, two-thread timings
are dominated by contention (the grouped form before its loop was pinned to one thread: 34x
the base linear at E = 64, against 1.75x pinned).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dense import routed_lora_dense
from .grouped import routed_lora_grouped

GROUPED_MIN_COLUMNS_PER_SLOT = 32


@torch.compiler.assume_constant_result
def intra_op_threads() -> int:
    """``torch.get_num_threads()``; a constant of the graph under torch.compile (a changed
    thread count then needs a recompile, as any other constant would)."""
    return torch.get_num_threads()


def use_grouped(num_experts: int, rank: int, top_k: int | None, threads: int | None = None) -> bool:
    """The dense/grouped switch ``E r > 32 k threads`` (see the module docstring); dense gates
    stay dense. ``threads`` defaults to ``torch.get_num_threads()``."""
    if top_k is None:
        return False
    threads = intra_op_threads() if threads is None else threads
    return num_experts * rank > GROUPED_MIN_COLUMNS_PER_SLOT * top_k * threads


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
