"""Learned global weights: one trainable weight per expert, the same for every token and layer.

    g_e = softmax(theta)_e          (normalize="softmax", default: a convex mixture)
    g_e = theta_e                   (normalize="none": free weights, possibly negative, as LoRAHub's)

A shared router (one decision per forward, used by every layer) with ``E`` parameters: the
smallest router :func:`molora.train_router` can fit on a handful of shots (LoRAHub, Huang et al.,
2023, learns the same number of weights gradient-free; MoV/MoLoRA's routers are per token).
``theta`` starts at the uniform mixture (``0`` for softmax, ``1/E`` for free weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from molora.context import RoutingSignals

from .base import Router, RoutingDecision, check_choice

NORMALIZATIONS = ("softmax", "none")


class GlobalWeightsRouter(Router):
    """Trainable per-expert weights ``g = softmax(theta)`` (or ``theta``), shared by all layers."""

    name = "weights"
    shared = True
    expert_dims = {"theta": 0}

    def __init__(self, num_experts: int, d_in: int, normalize: str = "softmax") -> None:
        super().__init__(num_experts, d_in)
        self.normalize = check_choice(self.name, "normalize", normalize, NORMALIZATIONS)
        init = 0.0 if self.normalize == "softmax" else 1.0 / num_experts
        self.theta = nn.Parameter(torch.full((num_experts,), init))

    def get_config(self) -> dict[str, Any]:
        return {"normalize": self.normalize}

    def weights(self) -> Tensor:
        """The current gates ``[E]`` (differentiable)."""
        return torch.softmax(self.theta, dim=0) if self.normalize == "softmax" else self.theta

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        batch = x.shape[0] if x.dim() > 1 else 1
        return RoutingDecision(gates=self.weights().unsqueeze(0).expand(batch, -1), per_example=True)
