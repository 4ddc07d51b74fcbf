"""Top-k routing: softmax over experts, keep the k largest, optionally renormalise.

    l = W_r x~ / tau (+ eps);  p = softmax(l);  K = argtopk_k(p)
    g_e = p_e / sum_{j in K} p_j  (e in K), else 0          (renormalize=True)
    g_e = p_e                      (e in K), else 0          (renormalize=False)

Followed by MoELoRA (Luo et al., 2024), MoLA (Gao et al., 2024) and MixLoRA (Li et al., 2024);
the balancing losses read the logits ``l``.

Exploration during training only (``self.training``; evaluation is deterministic):

* ``noise_std``: noisy top-k gating, ``eps ~ N(0, noise_std^2)`` added to the logits before the
  selection (Shazeer et al., 2017, "Outrageously Large Neural Networks", with a fixed rather than
  learned noise scale);
* ``jitter``: multiplicative input jitter ``x~ = x * u``, ``u ~ U(1 - jitter, 1 + jitter)``
  (Fedus et al., 2021, Switch Transformers; transformers' ``router_jitter_noise``).

The returned logits are those the selection used (noisy ones in training), so a balancing loss
recomputing the top-k from them counts the experts that actually ran.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from molora.context import RoutingSignals

from .base import RoutingDecision, check_nonnegative, check_top_k
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
        noise_std: float = 0.0,
        jitter: float = 0.0,
        context_dim: int | None = None,
    ) -> None:
        super().__init__(num_experts, d_in, temperature=temperature, granularity=granularity, context_dim=context_dim)
        self.top_k = check_top_k(self.name, top_k, num_experts)
        self.renormalize = bool(renormalize)
        self.noise_std = check_nonnegative(self.name, "noise_std", noise_std)
        self.jitter = check_nonnegative(self.name, "jitter", jitter)
        if self.jitter >= 1:
            raise ValueError(f"router {self.name!r}: jitter must be in [0, 1); got {jitter!r}")
        # A zero-initialised router ties every expert; a small random start breaks the tie so
        # that top-k picks differ between tokens from the first step.
        torch.nn.init.normal_(self.proj.weight, std=0.02)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "top_k": self.top_k,
            "renormalize": self.renormalize,
            "noise_std": self.noise_std,
            "jitter": self.jitter,
        }

    def fusable_weight(self) -> Tensor | None:
        """As :meth:`SoftRouter.fusable_weight`; ``None`` while input jitter is active (the
        logits are then of ``x * u``, not of ``x``)."""
        if self.training and self.jitter > 0:
            return None
        return super().fusable_weight()

    def train_logits(self, x: Tensor, signals: RoutingSignals, given: Tensor | None = None) -> tuple[Tensor, bool]:
        """Router logits with the training-time jitter and noise applied (clean in eval mode);
        ``given`` as in :meth:`SoftRouter.logits` (never while jitter is active)."""
        if self.training and self.jitter > 0:
            if given is not None:
                raise ValueError(f"router {self.name!r}: given logits are of x, but input jitter is active")
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits, per_example = self.logits(x, signals, given)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        return logits, per_example

    def forward(self, x: Tensor, signals: RoutingSignals, logits: Tensor | None = None) -> RoutingDecision:
        logits, per_example = self.train_logits(x, signals, logits)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        gates, indices = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return RoutingDecision(gates=gates, indices=indices, logits=logits, per_example=per_example, task_ids=signals.task_ids)
