"""Activation (gradient) checkpointing of a routed model: recomputation routes as the forward did.

Transformers' checkpointed blocks run their forward again during ``backward()``. A routed layer
reads the call's routing signals (task ids, retrieval embeddings, the attention mask) from its
forward scope (:mod:`molora.context`); when ``backward()`` runs after the ``routing(...)`` block
or outside the forward, that scope is gone and the recomputation would fail or route otherwise.
:func:`keep_routing` wraps a block's checkpoint function so that the recomputation runs inside a
scope holding the signals the original forward saw: with ``use_reentrant`` true or false, backward
inside or after the routing block, the gradients equal those of the model without checkpointing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from molora import context

__all__ = ["keep_routing", "wrap_checkpointing"]


def keep_routing(checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``checkpoint_fn(function, *args, **kwargs)`` whose recomputation of ``function`` sees the
    routing signals of the forward that called it (module docstring)."""
    if getattr(checkpoint_fn, "_molora_keeps_routing", False):
        return checkpoint_fn

    @functools.wraps(checkpoint_fn)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        scope = context.current_scope()
        signals = context.current_signals()

        def replay(*a: Any, **k: Any) -> Any:
            if context.current_scope() is scope:  # the forward itself (or a recompute inside it)
                return function(*a, **k)
            with context.replay_scope(signals):
                return function(*a, **k)

        return checkpoint_fn(replay, *args, **kwargs)

    run._molora_keeps_routing = True  # type: ignore[attr-defined]
    return run


def wrap_checkpointing(model: nn.Module) -> None:
    """Wrap every checkpoint function transformers set on ``model``'s blocks (``gradient_checkpointing_enable``
    / ``activation_checkpointing_enable`` set ``_gradient_checkpointing_func`` on each) with :func:`keep_routing`."""
    for module in model.modules():
        fn = module.__dict__.get("_gradient_checkpointing_func")
        if fn is not None:
            module._gradient_checkpointing_func = keep_routing(fn)
