"""Routers: map a layer input and the routing signals to gates over experts.

Select one by name in :class:`molora.MoLoRAConfig` (``router="soft"``); ``ROUTERS`` lists them.
"""

from __future__ import annotations

from typing import Any

from .arrow import ArrowRouter
from .base import Router, RoutingDecision
from .cluster import ClusterRouter
from .mixture import MixtureRouter
from .retrieval import RetrievalRouter
from .soft import SoftRouter
from .static import StaticRouter
from .switch import SwitchRouter
from .task import TaskRouter
from .timestep import TimeStepRouter, TLoRARouter
from .topk import TopKRouter
from .topp import TopPRouter
from .weights import GlobalWeightsRouter

ROUTERS: dict[str, type[Router]] = {
    cls.name: cls
    for cls in (
        SoftRouter, TopKRouter, TopPRouter, SwitchRouter, TaskRouter, StaticRouter,
        RetrievalRouter, TimeStepRouter, TLoRARouter, ClusterRouter, GlobalWeightsRouter, ArrowRouter, MixtureRouter,
    )
}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make a :class:`Router` subclass selectable by its ``name``."""
    ROUTERS[cls.name] = cls
    return cls


def router_class(name: str) -> type[Router]:
    try:
        return ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; available: {sorted(ROUTERS)}") from None


def build_router(name: str, *, num_experts: int, d_in: int, **kwargs: Any) -> Router:
    """Instantiate the router registered as ``name``; bad kwargs raise a ValueError naming them."""
    cls = router_class(name)
    try:
        return cls(num_experts=num_experts, d_in=d_in, **kwargs)
    except TypeError as exc:
        raise ValueError(f"router {name!r}: bad arguments {sorted(kwargs)}: {exc}") from exc


__all__ = [
    "ROUTERS", "ArrowRouter", "ClusterRouter", "GlobalWeightsRouter", "MixtureRouter", "RetrievalRouter", "Router", "RoutingDecision", "SoftRouter", "StaticRouter",
    "SwitchRouter", "TLoRARouter", "TaskRouter", "TimeStepRouter", "TopKRouter", "TopPRouter",
    "build_router", "register_router", "router_class",
]
