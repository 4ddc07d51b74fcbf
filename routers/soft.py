"""Soft (dense softmax) routing: every expert contributes, weighted by a learned softmax.

    g(x) = softmax(W_r x / tau)            W_r: [E, d_in], tau > 0 (temperature)

Token-level by default; ``granularity="sequence"`` routes each example once from the mean of
its token inputs over the attention mask; ``granularity="context"`` routes each example once from
the routing signal ``embeddings [batch, context_dim]`` (see :mod:`molora.routers.pooling`).
Followed by MoLoRA/MoV (Zadouri et al., 2023,
"Pushing Mixture of Experts to the Limit"), HydraLoRA (Tian et al., 2024) and LoRAMoE
(Dou et al., 2024). The router weight starts at zero, so a fresh router mixes uniformly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from molora.context import RoutingSignals
from molora.kernels.linear import shared_input_linear

from .base import Router, RoutingDecision, check_choice, check_int, check_positive, check_width
from .pooling import GRANULARITIES, routing_input


class SoftRouter(Router):
    """Dense softmax router ``g = softmax(W_r x / tau)`` (MoLoRA / HydraLoRA / LoRAMoE)."""

    name = "soft"
    expert_dims = {"proj.weight": 0}

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        temperature: float = 1.0,
        granularity: str = "token",
        context_dim: int | None = None,
    ) -> None:
        super().__init__(num_experts, d_in)
        self.temperature = check_positive(self.name, "temperature", temperature)
        self.granularity = check_choice(self.name, "granularity", granularity, GRANULARITIES)
        # Context-level routing reads the caller's embeddings, whose width need not be d_in.
        self.context_dim = None if context_dim is None else check_int(self.name, "context_dim", context_dim, 1)
        self.proj = nn.Linear(self.input_dim, num_experts, bias=False)
        nn.init.zeros_(self.proj.weight)

    @property
    def input_dim(self) -> int:
        """Width of the rows the router scores: ``context_dim`` for context granularity, else ``d_in``."""
        return self.context_dim if self.granularity == "context" and self.context_dim is not None else self.d_in

    def get_config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "granularity": self.granularity, "context_dim": self.context_dim}

    def logits(self, x: Tensor, signals: RoutingSignals, given: Tensor | None = None) -> tuple[Tensor, bool]:
        """Router logits ``W_r x`` per token (or per example for sequence/context granularity).

        ``given``: the logits ``x W_r^T`` of the token rows, already computed by the caller with
        :meth:`fusable_weight` (the routed layer computes them in its base GEMM); used as they are."""
        rows, per_example = routing_input(self.name, x, signals, self.granularity)
        if per_example and self.granularity == "context":
            check_width(self.name, "embeddings", rows, self.input_dim)
        if given is not None:
            if per_example or tuple(given.shape) != (rows.shape[0], self.num_experts):
                raise ValueError(f"router {self.name!r}: given logits must be [{rows.shape[0]}, {self.num_experts}] "
                                 f"token logits (token granularity); got {list(given.shape)}")
            return given, False
        if self._plain_projection():  # one GEMM each way, dx by BLAS (see molora.kernels.linear)
            return shared_input_linear(rows.to(self.proj.weight.dtype), self.proj.weight), per_example
        return self.proj(rows.to(self.proj.weight.dtype)), per_example

    def _plain_projection(self) -> bool:
        return type(self.proj) is nn.Linear and self.proj.bias is None

    def fusable_weight(self) -> Tensor | None:
        """``W_r`` when this call's logits are exactly ``x W_r^T`` of the layer's own token rows
        (token granularity, a plain bias-free projection), else ``None``. The routed layer then
        computes them in the same GEMM as its base output and LoRA shrink
        (:func:`molora.kernels.project`) and passes them to :meth:`forward` as ``logits``."""
        if self.granularity != "token" or not self._plain_projection():
            return None
        return self.proj.weight

    def forward(self, x: Tensor, signals: RoutingSignals, logits: Tensor | None = None) -> RoutingDecision:
        logits, per_example = self.logits(x, signals, logits)
        gates = torch.softmax(logits / self.temperature, dim=-1)
        return RoutingDecision(gates=gates, logits=logits, per_example=per_example, task_ids=signals.task_ids)
