"""Timestep routing for diffusion models: gates as a function of the timestep t in [0, T).

Two shared, context-level routers (one decision per example, read from the routing signal
``timesteps``):

**TimeStep Master** (``router="timestep"``; Zhuang et al., 2025, "TimeStep Master: Asymmetrical
Mixture of Timestep LoRA Experts"). The experts are *interval experts* at several granularities
``intervals = (n_1, n_2, ...)``: granularity g splits [0, T) into n_g equal intervals and owns
n_g consecutive experts (so ``num_experts = sum_g n_g``). For timestep t the active expert of
granularity g is (1-based, as in the notes)

    i_g(t) = ceil(t / T * n_g)      with t = 0 joining interval 1,  i.e.  max(1, ceil(t n_g / T))

Boundary convention: interval i covers ``((i-1) T / n, i T / n]``: a timestep exactly on a
boundary ``t = j T / n`` belongs to the interval *below* it (interval j, 0-based ``j - 1``), and
``t = 0`` belongs to the first interval. ``t`` may be fractional; integer timesteps are computed
exactly (float64). The first granularity is the ungated **core** (gate 1); the others are
**context** experts whose gates are

    w(t, x) = softmax_g( W_r pool(x) + emb[floor(t)] )        over the context granularities

a router on features (the first routed layer's input pooled over the attention mask) plus a
learned per-timestep embedding; both start at zero (uniform context gates). The notes make the
coarsest granularity the core; list ``intervals`` finest-first to make the finest one the core.

**T-LoRA** (``router="tlora"``; Soboleva et al., 2025, "T-LoRA: Single Image Diffusion Model
Customization Without Overfitting"). A rank-r_max LoRA whose rank shrinks with the noise:

    r(t) = floor(((T - t) / T)^a * (r_max - r_min)) + r_min

masking rank components j >= r(t). A rank-r LoRA ``B A = sum_j b_j a_j^T`` is exactly r rank-1
experts, so with ``num_experts = r_max`` rank-1 experts the gates ``g_j(t) = 1 if j < r(t) else 0``
*are* T-LoRA's rank mask, with no kernel change. Use ``MoLoRAConfig(num_experts=r_max, rank=1,
alpha=alpha_tlora / r_max)`` so every rank-1 expert has T-LoRA's scaling ``alpha / r_max``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molora.checks import finite_number, finite_tensor
from molora.context import RoutingSignals
from molora.errors import RoutingError

from .base import Router, RoutingDecision, check_int, check_positive, check_timesteps, require_signal
from .pooling import pool_sequence


def finite_timesteps(router: str, timesteps: Tensor, num_timesteps: int) -> Tensor:
    """:func:`check_timesteps`, refusing NaN too (a NaN compares false with both bounds, and its
    interval index would be an arbitrary integer)."""
    t = timesteps if isinstance(timesteps, Tensor) else torch.as_tensor(timesteps)
    finite_tensor(t, f"router {router!r}", "timesteps", error=RoutingError)
    return check_timesteps(router, t, num_timesteps)


def interval_index(t: Tensor, n: int, num_timesteps: int) -> Tensor:
    """0-based interval of ``t`` among ``n`` equal intervals of [0, T): ``max(1, ceil(t n / T)) - 1``.

    float64 makes it exact for integer t, n, T: ``t n`` is an exact integer and, when it is a
    multiple of T, ``t n / T`` is exactly that integer; otherwise it is >= 1/T from any integer.
    """
    return (torch.ceil(t.to(torch.float64) * n / num_timesteps).clamp_min(1) - 1).long()


def tlora_rank(t: Tensor, num_timesteps: int, r_max: int, r_min: int, exponent: float) -> Tensor:
    """T-LoRA's ``r(t) = floor(((T - t) / T)^a (r_max - r_min)) + r_min`` (float64).

    With ``a = 1`` (the paper's schedule) it is computed as ``floor((T - t)(r_max - r_min) / T)``:
    for integer t the product is an exact integer and the one rounding of the division cannot
    cross an integer, so the floor is exact for every t. The other order, ``(T - t) / T`` first
    (as the official code's ``int(...)``), rounds twice and is one short at some t (T = 1000,
    t = 420, r_max - r_min = 50: ``0.58 * 50 = 28.999...``, not 29). For ``a != 1`` the power is
    float64 (exact at t = 0)."""
    t = t.to(torch.float64)
    if exponent == 1:
        value = (num_timesteps - t) * (r_max - r_min) / num_timesteps
    else:
        value = ((num_timesteps - t) / num_timesteps) ** exponent * (r_max - r_min)
    return torch.floor(value).long() + r_min


class TimeStepRouter(Router):
    """TimeStep Master: an ungated core interval expert plus gated context interval experts."""

    name = "timestep"
    shared = True

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        intervals: Sequence[int] | None = None,
        num_timesteps: int = 1000,
        gate_context: bool = True,
    ) -> None:
        super().__init__(num_experts, d_in)
        self.num_timesteps = check_int(self.name, "num_timesteps", num_timesteps, 1)
        if intervals is not None and (isinstance(intervals, (str, bytes)) or not isinstance(intervals, Sequence)):
            raise ValueError(f"router {self.name!r}: intervals must be a list of ints; got {intervals!r}")
        intervals = [num_experts] if intervals is None else list(intervals)
        if not intervals:
            raise ValueError(f"router {self.name!r}: intervals must list at least one granularity")
        for i, n in enumerate(intervals):
            check_int(self.name, f"intervals[{i}]", n, 1)
        if sum(intervals) != num_experts:
            raise ValueError(
                f"router {self.name!r}: intervals {intervals} own {sum(intervals)} experts but num_experts={num_experts}"
            )
        self.intervals = intervals
        if not isinstance(gate_context, bool):
            raise ValueError(f"router {self.name!r}: gate_context must be true or false; got {gate_context!r}")
        self.gate_context = gate_context
        self.register_buffer("_offsets", torch.tensor([0, *intervals[:-1]]).cumsum(0), persistent=False)
        n_ctx = len(intervals) - 1
        # Zero init: the context granularities start with equal gates 1 / n_ctx.
        self.proj = nn.Linear(d_in, max(n_ctx, 1), bias=False)
        self.time_embedding = nn.Embedding(self.num_timesteps, max(n_ctx, 1))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.time_embedding.weight)

    def get_config(self) -> dict[str, Any]:
        return {"intervals": self.intervals, "num_timesteps": self.num_timesteps, "gate_context": self.gate_context}

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        t = finite_timesteps(self.name, require_signal(self.name, signals, "timesteps"), self.num_timesteps)
        t = t.to(self._offsets.device)
        local = torch.stack([interval_index(t, n, self.num_timesteps) for n in self.intervals], dim=-1)
        indices = local + self._offsets
        gates = torch.ones(indices.shape, device=indices.device, dtype=self.proj.weight.dtype)
        logits = None
        if len(self.intervals) > 1 and self.gate_context:
            feats = pool_sequence(x, signals.attention_mask).to(self.proj.weight.dtype)
            logits = self.proj(feats) + self.time_embedding(t.floor().long())
            gates = torch.cat([gates[:, :1], torch.softmax(logits, dim=-1)], dim=-1)
        # logits stay off the decision: they are over granularities, not experts (no balancing loss).
        return RoutingDecision(gates=gates, indices=indices, per_example=True)


class TLoRARouter(Router):
    """T-LoRA's timestep-dependent rank as gates over ``r_max`` rank-1 experts: ``g_j = [j < r(t)]``."""

    name = "tlora"
    shared = True

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        num_timesteps: int = 1000,
        min_rank: int = 1,
        exponent: float = 1.0,
    ) -> None:
        super().__init__(num_experts, d_in)
        self.num_timesteps = check_int(self.name, "num_timesteps", num_timesteps, 1)
        self.min_rank = check_int(self.name, "min_rank", min_rank, 0, num_experts)
        self.exponent = check_positive(self.name, "exponent", finite_number(exponent, f"router {self.name!r}", "exponent"))
        self.register_buffer("_ranks", torch.arange(num_experts), persistent=False)

    @property
    def max_rank(self) -> int:
        return self.num_experts

    def get_config(self) -> dict[str, Any]:
        return {"num_timesteps": self.num_timesteps, "min_rank": self.min_rank, "exponent": self.exponent}

    def rank(self, timesteps: Tensor) -> Tensor:
        """``r(t)`` per example."""
        t = finite_timesteps(self.name, timesteps, self.num_timesteps)
        return tlora_rank(t, self.num_timesteps, self.max_rank, self.min_rank, self.exponent)

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        r = self.rank(require_signal(self.name, signals, "timesteps")).to(self._ranks.device)
        gates = (self._ranks.unsqueeze(0) < r.unsqueeze(1)).to(torch.float32)
        return RoutingDecision(gates=gates, per_example=True)
