"""Switch (top-1) routing with an optional expert capacity.

    p = softmax(W_r x / tau);  e*(n) = argmax_e p[n, e];  g[n] = p[n, e*(n)]

The gate is the (unrenormalised) top probability, so the router gets a gradient through it
(Fedus et al., 2021, "Switch Transformers", eq. 2); LLaVA-MoLE (Chen et al., 2024) routes LoRA
experts this way. With ``capacity_factor = c`` each expert takes at most

    C = ceil(c * N / E)          N = real (unpadded) tokens of the call

tokens, first come first served in token order; the overflow is *dropped* (index ``-1``: only
the base layer and the residual path carry it) and counted in ``RoutingDecision.dropped``.
Padding tokens (attention mask 0) are routed nowhere and use no capacity. The Switch balancing
loss for this router is :func:`molora.routers.losses.switch_loss` (``aux_loss_coef`` applies it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from molora.context import RoutingSignals

from .base import RoutingDecision, check_positive
from .soft import SoftRouter


def apply_capacity(indices: Tensor, num_experts: int, capacity: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Drop top-1 assignments ``indices [n]`` beyond ``capacity`` per expert (in order of n).

    Returns ``(kept indices [n] with -1 for dropped/invalid, number dropped)``; rows where
    ``valid`` is False are set to -1 and neither use capacity nor count as dropped.
    """
    if valid is None:
        valid = torch.ones_like(indices, dtype=torch.bool)
    onehot = torch.nn.functional.one_hot(indices, num_experts) * valid.unsqueeze(-1)
    position = onehot.cumsum(dim=0) * onehot  # 1-based arrival rank of each token at its expert
    kept = (position.sum(dim=-1) <= capacity) & valid
    dropped = (valid & ~kept).sum()
    return torch.where(kept, indices, torch.full_like(indices, -1)), dropped


class SwitchRouter(SoftRouter):
    """Top-1 router with optional capacity factor and dropped-token count (Switch; LLaVA-MoLE)."""

    name = "switch"

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        capacity_factor: float | None = None,
        temperature: float = 1.0,
        granularity: str = "token",
        context_dim: int | None = None,
    ) -> None:
        super().__init__(num_experts, d_in, temperature=temperature, granularity=granularity, context_dim=context_dim)
        self.capacity_factor = None if capacity_factor is None else check_positive(self.name, "capacity_factor", capacity_factor)
        torch.nn.init.normal_(self.proj.weight, std=0.02)  # break ties, as top-k does

    @property
    def top_k(self) -> int:
        return 1

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "capacity_factor": self.capacity_factor}

    def forward(self, x: Tensor, signals: RoutingSignals, logits: Tensor | None = None) -> RoutingDecision:
        logits, per_example = self.logits(x, signals, logits)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        gates, indices = probs.max(dim=-1)
        dropped = None
        if self.capacity_factor is not None:
            mask = signals.attention_mask
            valid = None
            if not per_example and mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                valid = mask.reshape(-1).to(device=indices.device) != 0
            n = int(valid.sum()) if valid is not None else indices.shape[0]
            capacity = math.ceil(self.capacity_factor * n / self.num_experts)
            indices, dropped = apply_capacity(indices, self.num_experts, capacity, valid)
            gates = torch.where(indices >= 0, gates, torch.zeros_like(gates))
        return RoutingDecision(
            gates=gates.unsqueeze(-1), indices=indices.unsqueeze(-1), logits=logits,
            per_example=per_example, dropped=dropped, task_ids=signals.task_ids,
        )
