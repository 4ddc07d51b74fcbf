"""Top-p ("dynamic") routing: keep the most probable experts until their mass first exceeds p.

    p = softmax(W_r x / tau);  sort p descending: s_1 >= s_2 >= ... ;  c_j = s_1 + ... + s_j
    keep sorted expert j  iff  c_{j-1} <= p_thr      (c_0 = 0: the top expert is always kept)
    g = kept probs, renormalised to sum 1 (``renormalize=True``) or as is

so the kept set is the shortest prefix whose cumulative probability exceeds the threshold (a tie
``c_j == p_thr`` keeps one more expert: the mass must *exceed* p). ``max_k`` caps the count.
The number of experts varies per token: indices are ``[rows, k_max]`` (``k_max`` = the largest
count in the batch) padded with ``-1`` and gate 0. MixLoRA (Li et al., 2024), "dynamic routing";
the rule is MoE-PEFT's ``_dynamic_routing`` (keep where ``cumsum <= p`` plus the first expert
past it); Huang et al. (2024), "Harder Tasks Need More Experts: Dynamic Routing in MoE Models".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from molora.context import RoutingSignals

from .base import RoutingDecision, check_probability, check_top_k
from .soft import SoftRouter


def top_p_select(probs: Tensor, threshold: float, max_k: int | None = None) -> tuple[Tensor, Tensor]:
    """``(gates [rows, k_max], indices [rows, k_max])`` of the top-p rule above, ``-1``-padded.

    Gates are the kept probabilities (not renormalised).
    """
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # c_{j-1}: mass of the experts ranked above j
    keep = before <= threshold
    keep[..., 0] = True
    if max_k is not None:
        keep[..., max_k:] = False
    k_max = int(keep.sum(dim=-1).max()) if keep.numel() else 1
    keep, sorted_p, order = keep[..., :k_max], sorted_p[..., :k_max], order[..., :k_max]
    gates = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    indices = torch.where(keep, order, torch.full_like(order, -1))
    return gates, indices


class TopPRouter(SoftRouter):
    """Dynamic top-p router (MixLoRA): per token, the fewest experts whose probability exceeds ``top_p``."""

    name = "topp"

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        top_p: float = 0.8,
        max_k: int | None = None,
        renormalize: bool = True,
        temperature: float = 1.0,
        granularity: str = "token",
        context_dim: int | None = None,
    ) -> None:
        super().__init__(num_experts, d_in, temperature=temperature, granularity=granularity, context_dim=context_dim)
        self.top_p = check_probability(self.name, "top_p", top_p)
        self.max_k = check_top_k(self.name, max_k, num_experts)
        self.renormalize = bool(renormalize)
        torch.nn.init.normal_(self.proj.weight, std=0.02)  # break ties, as top-k does

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "top_p": self.top_p, "max_k": self.max_k, "renormalize": self.renormalize}

    def forward(self, x: Tensor, signals: RoutingSignals, logits: Tensor | None = None) -> RoutingDecision:
        logits, per_example = self.logits(x, signals, logits)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        gates, indices = top_p_select(probs, self.top_p, self.max_k)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return RoutingDecision(gates=gates, indices=indices, logits=logits, per_example=per_example, task_ids=signals.task_ids)
