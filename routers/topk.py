"""Top-k routing: softmax over experts, keep the k largest, optionally renormalise.

    p = softmax(W_r x / tau);  K = argtopk_k(p);  g_e = p_e / sum_{j in K} p_j  (e in K), else 0

(without renormalisation ``g_e = p_e`` on K). Followed by MoELoRA (Luo et al., 2024), MoLA
(Gao et al., 2024) and MixLoRA (Li et al., 2024); the balancing losses read the logits
``W_r x``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from molora.context import RoutingSignals

from .base import RoutingDecision, check_top_k
from .soft import SoftRouter


class TopKRouter(SoftRouter):
    """Softmax router that keeps the ``top_k`` largest gates per token (MoELoRA / MoLA / MixLoRA)."""

    name = "topk"

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        top_k: int = 2,
        renormalize: bool = True,
        temperature: float = 1.0,
        granularity: str = "token",
    ) -> None:
        super().__init__(num_experts, d_in, temperature=temperature, granularity=granularity)
        self.top_k = check_top_k(self.name, top_k, num_experts)
        self.renormalize = bool(renormalize)
        # A zero-initialised router ties every expert; a small random start breaks the tie so
        # that top-k picks differ between tokens from the first step.
        torch.nn.init.normal_(self.proj.weight, std=0.02)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "top_k": self.top_k, "renormalize": self.renormalize}

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        logits, per_example = self.logits(x, signals)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        gates, indices = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return RoutingDecision(gates=gates, indices=indices, logits=logits, per_example=per_example)
