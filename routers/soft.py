"""Soft (dense softmax) routing: every expert contributes, weighted by a learned softmax.

    g(x) = softmax(W_r x / tau)            W_r: [E, d_in], tau > 0 (temperature)

Token-level by default; ``granularity="sequence"`` routes each example once from the mean of
its token inputs over the attention mask. Followed by MoLoRA/MoV (Zadouri et al., 2023,
"Pushing Mixture of Experts to the Limit"), HydraLoRA (Tian et al., 2024) and LoRAMoE
(Dou et al., 2024). The router weight starts at zero, so a fresh router mixes uniformly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from molora.context import RoutingSignals

from .base import Router, RoutingDecision, check_positive
from .pooling import GRANULARITIES, pool_sequence


class SoftRouter(Router):
    """Dense softmax router ``g = softmax(W_r x / tau)`` (MoLoRA / HydraLoRA / LoRAMoE)."""

    name = "soft"
    expert_dims = {"proj.weight": 0}

    def __init__(self, num_experts: int, d_in: int, temperature: float = 1.0, granularity: str = "token") -> None:
        super().__init__(num_experts, d_in)
        self.temperature = check_positive(self.name, "temperature", temperature)
        if granularity not in GRANULARITIES:
            raise ValueError(f"router {self.name!r}: granularity must be one of {GRANULARITIES}; got {granularity!r}")
        self.granularity = granularity
        self.proj = nn.Linear(d_in, num_experts, bias=False)
        nn.init.zeros_(self.proj.weight)

    def get_config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "granularity": self.granularity}

    def logits(self, x: Tensor, signals: RoutingSignals) -> tuple[Tensor, bool]:
        """Router logits ``W_r x`` per token (or per example for sequence granularity)."""
        x = x.to(self.proj.weight.dtype)
        if self.granularity == "sequence":
            return self.proj(pool_sequence(x, signals.attention_mask)), True
        return self.proj(x.reshape(-1, x.shape[-1])), False

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        logits, per_example = self.logits(x, signals)
        gates = torch.softmax(logits / self.temperature, dim=-1)
        return RoutingDecision(gates=gates, logits=logits, per_example=per_example)
