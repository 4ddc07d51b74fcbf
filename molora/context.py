"""Routing context: the per-call signals routers read, and the per-forward decision cache.

Routers that decide from something other than the layer input (a task id per example, a
diffusion timestep, a retrieval query embedding) read it from the *routing signals*, set with::

    with model.routing(task_ids=torch.tensor([0, 2]), attention_mask=mask):
        out = model(**batch)

The signals live in a :mod:`contextvars` variable, so concurrent threads and asyncio tasks each
see their own. Nested ``routing`` blocks override only the fields they name.

A *forward scope* is opened by :class:`~molora.model.MoLoRAModel` around every forward pass of
the wrapped model (also the inner forwards of ``generate``). It carries the signals of that pass
and a cache, so that a router shared by many layers (task id, retrieval, timestep) decides once
per forward and every layer reuses the decision.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .errors import RoutingError


@dataclasses.dataclass(frozen=True)
class RoutingSignals:
    """Per-call inputs to routers. Every field is per example (leading dim = batch).

    Attributes:
        task_ids: ``LongTensor [batch]``, the task of each example.
        timesteps: ``Tensor [batch]``, diffusion timesteps in ``[0, T)``.
        embeddings: ``Tensor [batch, dim]``, retrieval query embeddings.
        attention_mask: ``Tensor [batch, seq]`` (1 = real token, 0 = padding), so that pooling
            and balancing losses ignore padding.
    """

    task_ids: Tensor | None = None
    timesteps: Tensor | None = None
    embeddings: Tensor | None = None
    attention_mask: Tensor | None = None

    def replace(self, **changes: Any) -> RoutingSignals:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_SIGNALS: contextvars.ContextVar[RoutingSignals] = contextvars.ContextVar(
    "molora_routing_signals", default=RoutingSignals()
)


def _as_tensor(name: str, value: Any, *, ndim: int, integer: bool | None) -> Tensor | None:
    if value is None:
        return None
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RoutingError(f"routing signal {name!r} must be a tensor or a list of numbers; got {type(value).__name__}") from exc
    if value.dim() != ndim:
        shape = "[batch]" if ndim == 1 else "[batch, dim]" if name == "embeddings" else "[batch, seq]"
        raise RoutingError(f"routing signal {name!r} must have shape {shape}; got shape {tuple(value.shape)}")
    if integer is True and value.is_floating_point():
        raise RoutingError(f"routing signal {name!r} must hold integers; got dtype {value.dtype}")
    if integer is False and not value.is_floating_point():
        value = value.float()
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise RoutingError(f"routing signal {name!r} contains NaN or inf")
    return value


def make_signals(
    *,
    task_ids: Any = None,
    timesteps: Any = None,
    embeddings: Any = None,
    attention_mask: Any = None,
    base: RoutingSignals | None = None,
) -> RoutingSignals:
    """Validate raw signals (shapes and dtypes; values are checked by the router that reads them)."""
    signals = RoutingSignals(
        task_ids=_as_tensor("task_ids", task_ids, ndim=1, integer=True),
        timesteps=_as_tensor("timesteps", timesteps, ndim=1, integer=None),
        embeddings=_as_tensor("embeddings", embeddings, ndim=2, integer=False),
        attention_mask=_as_tensor("attention_mask", attention_mask, ndim=2, integer=None),
    )
    batch = {k: v.shape[0] for k, v in dataclasses.asdict(signals).items() if v is not None}
    if len(set(batch.values())) > 1:
        raise RoutingError(f"routing signals disagree on the batch size: {batch}")
    if base is None:
        return signals
    return base.replace(**{f.name: getattr(signals, f.name) for f in dataclasses.fields(signals)})


@contextlib.contextmanager
def routing(**signals: Any) -> Iterator[RoutingSignals]:
    """Set routing signals for the forward passes inside the block (see module docstring)."""
    token = _SIGNALS.set(make_signals(base=_SIGNALS.get(), **signals))
    try:
        yield _SIGNALS.get()
    finally:
        _SIGNALS.reset(token)


def current_signals() -> RoutingSignals:
    """The signals in force: those of the running forward scope, else of the innermost ``routing``."""
    scope = _SCOPE.get()
    return scope.signals if scope is not None else _SIGNALS.get()


class ForwardScope:
    """State of one forward pass: its signals and the decisions of shared routers."""

    def __init__(self, signals: RoutingSignals) -> None:
        self.signals = signals
        self._cache: dict[int, Any] = {}

    def cached(self, key: object, compute: Callable[[], Any]) -> Any:
        """Return ``compute()``, computed at most once per forward for ``key``."""
        k = id(key)
        if k not in self._cache:
            self._cache[k] = compute()
        return self._cache[k]


_SCOPE: contextvars.ContextVar[ForwardScope | None] = contextvars.ContextVar("molora_forward_scope", default=None)


def current_scope() -> ForwardScope | None:
    return _SCOPE.get()


def open_scope(attention_mask: Tensor | None = None) -> contextvars.Token:
    """Open a forward scope; the call's ``attention_mask`` is used unless the user set one."""
    signals = _SIGNALS.get()
    if signals.attention_mask is None and isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
        signals = signals.replace(attention_mask=attention_mask)
    return _SCOPE.set(ForwardScope(signals))


def close_scope(token: contextvars.Token) -> None:
    _SCOPE.reset(token)
