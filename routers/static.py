"""Static routing: fixed gates, the same for every token.

    g_e(x) = w_e        (default w_e = 1 for all e: the plain sum of all experts)

With all weights 1 this is O-LoRA's inference (Wang et al., 2023, "Orthogonal Subspace Learning
for Language Model Continual Learning"): the task LoRAs, each in its own subspace, are summed
and no task id is needed. With other weights it is a static mixture that stays un-merged (so
the experts remain separate and trainable); :meth:`MoLoRAModel.merge` folds one into the base.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from molora.context import RoutingSignals

from .base import Router, RoutingDecision


class StaticRouter(Router):
    """Constant gates ``g_e = w_e`` for every example (O-LoRA's sum when all ``w_e = 1``)."""

    name = "static"
    shared = True

    def __init__(self, num_experts: int, d_in: int, weights: list[float] | None = None) -> None:
        super().__init__(num_experts, d_in)
        weights = [1.0] * num_experts if weights is None else [float(w) for w in weights]
        if len(weights) != num_experts:
            raise ValueError(f"router 'static': {len(weights)} weights for {num_experts} experts")
        if not all(torch.isfinite(torch.tensor(weights))):
            raise ValueError(f"router 'static': weights must be finite; got {weights}")
        self.weights = weights
        self.register_buffer("_w", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def get_config(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def add_expert(self, name: str | None = None, weight: float = 1.0) -> None:
        """A new expert joins the sum with ``weight`` (default 1, as O-LoRA appends a subspace)."""
        super().add_expert(name)
        self.weights.append(float(weight))
        self._w = torch.tensor(self.weights, dtype=torch.float32, device=self._w.device)

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        batch = x.shape[0] if x.dim() > 1 else 1
        gates = self._w.to(x.dtype if x.is_floating_point() else torch.float32).expand(batch, -1)
        return RoutingDecision(gates=gates, per_example=True)
