"""Routed layers whose LoRA shrink is not a GEMM over the input rows (embeddings, convolutions).

For such a base layer the layer computes the experts' rank features itself (an ``nn.Embedding``
gathers rows of ``A^T``, an ``nn.Conv2d`` convolves with ``A``'s kernels), one per output row
``t`` of the base layer (a token, a pixel):

    h[t] = [A_1 x; ...; A_E x]_t        (T x E r; ``A`` shared by all experts: T x r)
    y[t] = base(x)[t] + sum_e g_e(t) s_e B_e h_e[t]

and the expand is the kernels' dense gate-and-expand step on ``h``
(:func:`molora.kernels.dense.dense_gate_expand`), the same op the linear layer's dense form runs
(:class:`~molora.layer.RoutedLoRALinear`). The router scores one row per output row (the layer
says which: :meth:`RoutedRankLayer._shrink`), or a shared router decides per example; what it
decided is recorded in the call's forward scope as for the linear layer. Only plain LoRA
experts (kind ``"lora"``, HydraLoRA's shared ``A`` included) run here, since the other kinds
read the base weight as a ``[d_out, d_in]`` matrix or rescale the base output.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from molora.context import current_scope, current_signals
from molora.errors import MoLoRAError
from molora.kernels.dense import dense_gate_expand
from molora.layer import RoutedLoRALinear
from molora.routers import Router

from .bank import BaseExpertBank


class RoutedRankLayer(RoutedLoRALinear):
    """A frozen base layer plus routed LoRA experts whose rank features the subclass computes.

    Subclasses define :meth:`_check_base` (the base layer they take, with a MoLoRAError naming
    the module otherwise), :meth:`_shrink` and :meth:`_add_delta`; routing, expert ids, merging,
    disabling and persistence are :class:`~molora.layer.RoutedLoRALinear`'s.
    """

    expert_kinds = ("lora",)

    def __init__(self, base_layer: nn.Module, bank: BaseExpertBank, router: Router | None = None, *,
                 name: str = "", **kwargs: Any) -> None:
        self._check_base(base_layer, name)
        if bank.kind not in self.expert_kinds:
            raise MoLoRAError(f"module {name!r}: a routed {type(base_layer).__name__} holds experts of kind "
                              f"{' or '.join(map(repr, self.expert_kinds))}; got {bank.kind!r}")
        if router is not None and router.reads_experts:
            raise MoLoRAError(f"module {name!r}: router {router.name!r} derives its state from [d_out x d_in] expert "
                              f"matrices, which a routed {type(base_layer).__name__} does not route on; use another router")
        super().__init__(base_layer, bank, router, name=name, **kwargs)

    @staticmethod
    def _check_base(base_layer: nn.Module, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _shrink(self, x: Tensor, result: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(h, rows)``: the rank features ``h [T, E r]`` (``[T, r]`` for a shared ``A``) of the
        call's ``T`` output rows, and what the router scores, ``[batch, ..., d_router]`` with ``T``
        rows in all (per-example decisions cover each example's ``T / batch`` consecutive rows)."""
        raise NotImplementedError

    def _add_delta(self, result: Tensor, delta: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The base output plus the routed delta ``[T, d_out]`` (rows in :meth:`_shrink`'s order)."""
        raise NotImplementedError

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled or self.merged_weights is not None or self.bank.num_experts == 0:
            return self.base_layer(x, *args, **kwargs)
        scope = current_scope()
        signals = scope.signals if scope is not None else current_signals()
        generation = scope.generation if scope is not None else None
        A, B = self.bank.stacked() if generation is None else generation.experts(self.bank)
        result = self.base_layer(x, *args, **kwargs)
        h, rows = self._shrink(x, result, A)
        decision = self._decide(rows, signals, scope)
        self._record(scope, signals, decision, rows)
        gates, indices, group_rows = self._broadcast(decision, rows, h.shape[0])
        if group_rows != 1:  # one decision per example: each covers its example's rows
            gates = gates.repeat_interleave(group_rows, 0)
            indices = None if indices is None else indices.repeat_interleave(group_rows, 0)
        delta = dense_gate_expand(h, B, gates.to(h.dtype), indices, self.bank.scaling)
        # as PEFT: the delta is added in the adapters' dtype, then the sum cast to the base output's
        return self._add_delta(result, delta).to(result.dtype)
