"""The router interface: what a routed layer asks, and what a router answers.

A router maps a layer input ``x [..., d_in]`` and the routing signals (see
:mod:`molora.context`) to a :class:`RoutingDecision`: dense gates over the experts, or top-k
gates with expert indices, plus the router logits the balancing losses need.

Two kinds:

* **per-layer** routers (``shared = False``) are built once per routed layer and see that
  layer's input (token- or sequence-level routing: MoLoRA, HydraLoRA, MoLA);
* **shared** routers (``shared = True``) are built once per model and decide once per forward
  pass from the routing signals (task id, retrieval query, timestep); every layer reuses the
  decision through the forward scope's cache, expressed over the model's global expert list.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from molora.context import RoutingSignals
from molora.errors import RoutingError

if TYPE_CHECKING:
    from molora.bank import ExpertBank


@dataclasses.dataclass
class RoutingDecision:
    """A router's answer for one layer call.

    Attributes:
        gates: ``[rows, E]`` dense gates when ``indices`` is None, else ``[rows, k]`` gates of the
            experts named by ``indices``.
        indices: ``None`` or ``LongTensor [rows, k]`` of expert indices, ``-1`` for "no expert".
        logits: ``None`` or ``[tokens, E]`` router logits (pre-softmax), for balancing losses.
        per_example: ``rows`` is the batch size (one decision per example, broadcast over the
            example's tokens) rather than the number of tokens.
        dropped: ``None`` or the number of (real) tokens a capacity-limited router dropped
            (routed to no expert), e.g. :class:`~molora.routers.switch.SwitchRouter`; read by
            :func:`molora.stats.routing_stats`.
        task_ids: ``None`` or the ``[batch]`` example types (the routing signal ``task_ids``)
            the decision was made for; the LoRAMoE localized balancing loss reads them.
    """

    gates: Tensor
    indices: Tensor | None = None
    logits: Tensor | None = None
    per_example: bool = False
    dropped: Tensor | int | None = None
    task_ids: Tensor | None = None


class Router(nn.Module):
    """Base class of routers; subclasses implement :meth:`forward`.

    Constructor contract (used by :func:`molora.routers.build_router` and checkpoint loading):
    ``Router(num_experts=E, d_in=d, **kwargs)`` where ``kwargs`` are JSON-serialisable and
    returned by :meth:`get_config`.
    """

    name: ClassVar[str] = ""
    shared: ClassVar[bool] = False
    #: The router derives state from its layer's expert weights (Arrow's prototypes): the routed
    #: layer then calls :meth:`sync_experts` with its bank when built and before each decision.
    reads_experts: ClassVar[bool] = False

    def __init__(self, num_experts: int, d_in: int) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"{type(self).__name__}: num_experts must be a positive int; got {num_experts!r}")
        self.num_experts = num_experts
        self.d_in = d_in

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor kwargs (besides num_experts and d_in)."""
        return {}

    def sync_experts(self, bank: ExpertBank) -> None:
        """Bring state derived from the layer's experts up to date (only if :attr:`reads_experts`)."""

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:  # pragma: no cover - abstract
        raise NotImplementedError

    #: Parameters/buffers with one slice per expert, by state_dict key, and that axis. A router
    #: that lists them can grow (continual learning adds experts); new slices start at zero.
    expert_dims: ClassVar[dict[str, int]] = {}

    def check_can_grow(self) -> None:
        """Raise (changing nothing) if :meth:`add_expert` cannot grow this router."""
        if not self.expert_dims and any(True for _ in self.parameters()):
            raise NotImplementedError(f"router {self.name!r} cannot grow: it declares no expert_dims")

    def add_expert(self, name: str | None = None) -> None:
        """Grow to ``num_experts + 1`` experts (the new one's slices are zero).

        Rebuilds the listed tensors, so an optimizer holding the old router parameters must be
        rebuilt: continual-learning managers create one per task anyway.
        """
        self.check_can_grow()
        for key, dim in self.expert_dims.items():
            owner_name, _, attr = key.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            old = getattr(owner, attr)
            shape = list(old.shape)
            shape[dim] = 1
            new = torch.cat([old.detach(), old.new_zeros(shape)], dim=dim)
            if isinstance(old, nn.Parameter):
                setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                owner.register_buffer(attr, new)
        self.num_experts += 1


def check_positive(router: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"router {router!r}: {name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_nonnegative(router: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
        raise ValueError(f"router {router!r}: {name} must be a finite number >= 0; got {value!r}")
    return float(value)


def check_probability(router: str, name: str, value: float) -> float:
    """A threshold in ``(0, 1]`` (top-p)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"router {router!r}: {name} must be in (0, 1]; got {value!r}")
    return float(value)


def check_int(router: str, name: str, value: int, low: int, high: int | None = None) -> int:
    """An int in ``[low, high]`` (``high=None``: unbounded)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"router {router!r}: {name} must be an int {bound}; got {value!r}")
    return value


def check_choice(router: str, name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"router {router!r}: {name} must be one of {choices}; got {value!r}")
    return value


def check_width(router: str, name: str, t: Tensor, width: int) -> Tensor:
    """``t [rows, width]``; a RoutingError (a ValueError) naming the input and the width otherwise."""
    if t.dim() != 2 or t.shape[-1] != width:
        raise RoutingError(f"router {router!r}: {name} must be [batch, {width}]; got shape {tuple(t.shape)}")
    return t


def check_timesteps(router: str, t: Tensor, num_timesteps: int) -> Tensor:
    """Diffusion timesteps ``t [batch]`` as float64 in ``[0, T)``; a RoutingError naming them otherwise."""
    if t.dim() != 1:
        raise RoutingError(f"router {router!r}: timesteps must be [batch]; got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    bad = ~((t >= 0) & (t < num_timesteps))  # NaN fails both comparisons
    if bad.any():
        raise RoutingError(
            f"router {router!r}: timesteps must be in [0, num_timesteps={num_timesteps}); got {t[bad][:5].tolist()}"
        )
    return t


def check_top_k(router: str, top_k: int | None, num_experts: int) -> int | None:
    if top_k is None:
        return None
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"router {router!r}: top_k must be an int in [1, num_experts={num_experts}]; got {top_k!r}")
    return top_k


def require_signal(router: str, signals: RoutingSignals, field: str) -> Tensor:
    value = getattr(signals, field)
    if value is None:
        raise RoutingError(
            f"router {router!r} needs {field}: wrap the call in `with model.routing({field}=...)`"
        )
    return value
