"""Per-request mixtures: each example brings its own weights over the experts.

    y_b = W x_b + sum_e w_{b,e} * s_e * B_e A_e x_b        (w from the signal ``expert_weights``)

A shared, context-level router: ``with model.routing(expert_weights=W):`` with ``W [batch, E]``
(or, through :meth:`molora.MoLoRAModel.routing`, one ``{adapter name: weight}`` dict per example).
Mixtures are usually sparse (a request names two or three of hundreds of adapters), so the
decision lists only the non-zero experts of each example (``k`` = the most any example names,
shorter rows padded with "no expert"): the grouped path then costs in the experts named, not in E.
Each example's output equals the static mixture (:class:`~molora.routers.static.StaticRouter`)
of its weights; the decision is per example, so it holds through ``generate()`` (signals are
expanded with the beams). The weights are used as given (not normalised; negative allowed), as
LoRAHub's and PEFT's ``add_weighted_adapter`` linear weights are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molora.context import RoutingSignals
from molora.errors import RoutingError

from .base import Router, RoutingDecision, require_signal


class MixtureRouter(Router):
    """Gates ``g_{b,e} = expert_weights[b, e]``: a per-example static mixture, sparse in its non-zeros."""

    name = "mixture"
    shared = True

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        w = require_signal(self.name, signals, "expert_weights")
        if w.shape[1] != self.num_experts:
            raise RoutingError(f"router 'mixture': expert_weights has {w.shape[1]} columns; the model has "
                               f"{self.num_experts} experts (shape {tuple(w.shape)})")
        w = w.to(x.dtype if x.is_floating_point() else torch.float32)
        if torch.compiler.is_compiling():  # a data-dependent k would break the graph: dense gates
            return RoutingDecision(gates=w, per_example=True)
        nonzero = w != 0
        k = max(int(nonzero.sum(1).max()), 1)
        # the non-zero experts first (stable: in expert order), then padding marked "no expert"
        order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :k]
        keep = nonzero.gather(1, order)
        indices = torch.where(keep, order, torch.full_like(order, -1))
        gates = torch.where(keep, w.gather(1, order), torch.zeros((), dtype=w.dtype, device=w.device))
        return RoutingDecision(gates=gates, indices=indices, per_example=True)
