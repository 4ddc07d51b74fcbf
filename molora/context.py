"""Routing context: the per-call signals routers read, and the per-forward decision cache.

Routers that decide from something other than the layer input (a task id per example, a
diffusion timestep, a retrieval query embedding) read it from the *routing signals*, set with::

    with model.routing(task_ids=torch.tensor([0, 2]), attention_mask=mask):
        out = model(**batch)

The signals live in a :mod:`contextvars` variable, so concurrent threads and asyncio tasks each
see their own. Nested ``routing`` blocks override only the fields they name.

A *forward scope* is opened by :class:`~molora.model.MoLoRAModel` around every forward pass of
the wrapped model (also the inner forwards of ``generate``). It belongs to that call alone and
carries its signals, a cache, so that a router shared by many layers (task id, retrieval,
timestep) decides once per forward and every layer reuses the decision, and the record of what
each routed layer decided, which balancing losses and routing statistics read afterwards
(:func:`last_forward`). Scopes, like signals, live in context variables: two threads (or asyncio
tasks) running forwards of one model at once never see each other's state, and no module keeps
per-call state.
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
    scope = current_scope()
    return scope.signals if scope is not None else _SIGNALS.get()


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What one routed layer decided in one forward: the decision (in the layer's local expert
    indices, one row per token or per example) and the padding mask ``[batch, seq]`` matching
    its rows (``None`` when the rows are not the tokens of a ``[batch, seq]`` input)."""

    decision: Any
    mask: Tensor | None


class ForwardScope:
    """State of one forward pass, owned by that call alone: its signals, the decisions of shared
    routers (each decides once per forward) and what every routed layer decided (read by the
    balancing losses and routing statistics after the forward).

    ``owner`` identifies the model that opened it (see :func:`last_forward`)."""

    def __init__(self, signals: RoutingSignals, owner: object = None) -> None:
        self.signals = signals
        self.owner = owner
        self.records: dict[str, LayerRecord] = {}
        self._cache: dict[int, tuple[object, Any]] = {}

    def cached(self, key: object, compute: Callable[[], Any]) -> Any:
        """Return ``compute()``, computed at most once per forward for ``key``."""
        hit = self._cache.get(id(key))
        if hit is None or hit[0] is not key:
            hit = (key, compute())  # the key is kept, so its id cannot be reused within the forward
            self._cache[id(key)] = hit
        return hit[1]

    def record(self, layer: str, decision: Any, mask: Tensor | None) -> None:
        self.records[layer] = LayerRecord(decision, mask)


# The open forward scopes of this thread / task, innermost last. A tuple, replaced (never
# mutated) on entry and exit, so that no context token has to travel between a forward's
# pre-hook and post-hook, and a context copied into another thread or task cannot disturb ours.
_SCOPES: contextvars.ContextVar[tuple[ForwardScope, ...]] = contextvars.ContextVar("molora_forward_scopes", default=())
# The last finished forward of every model, by owner, in this thread / task.
_LAST: contextvars.ContextVar[dict[int, ForwardScope]] = contextvars.ContextVar("molora_last_forward", default={})


def current_scope() -> ForwardScope | None:
    """The innermost open forward scope of this thread / task, or ``None``."""
    scopes = _SCOPES.get()
    return scopes[-1] if scopes else None


def enter_forward(owner: object = None, attention_mask: Tensor | None = None) -> ForwardScope:
    """Open a forward scope of ``owner`` (the routing signals in force, plus the call's
    ``attention_mask`` unless the user set one); pair with :func:`exit_forward`."""
    signals = _SIGNALS.get()
    if signals.attention_mask is None and isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
        signals = signals.replace(attention_mask=attention_mask)
    scope = ForwardScope(signals, owner)
    _SCOPES.set((*_SCOPES.get(), scope))
    return scope


def exit_forward(owner: object = None) -> ForwardScope | None:
    """Close the innermost forward scope of ``owner`` and keep it as that owner's last forward
    (:func:`last_forward`); a no-op when this thread has no open scope of ``owner`` (a forward
    hook whose pre-hook ran in another context)."""
    scopes = _SCOPES.get()
    for i in range(len(scopes) - 1, -1, -1):
        if scopes[i].owner is owner:
            scope = scopes[i]
            _SCOPES.set(scopes[:i] + scopes[i + 1:])
            if owner is not None:
                _LAST.set({**_LAST.get(), id(owner): scope})
            return scope
    return None


def last_forward(owner: object) -> ForwardScope | None:
    """The last forward scope ``owner`` closed in this thread / task (``None`` before any)."""
    scope = _LAST.get().get(id(owner))
    return scope if scope is not None and scope.owner is owner else None


@contextlib.contextmanager
def forward_scope(owner: object = None, attention_mask: Tensor | None = None) -> Iterator[ForwardScope]:
    """``with forward_scope() as scope: layer(x)``: run routed layers outside a
    :class:`~molora.model.MoLoRAModel` (which opens one around every forward itself) and read
    what they decided from ``scope.records``."""
    scope = enter_forward(owner, attention_mask)
    try:
        yield scope
    finally:
        scopes = _SCOPES.get()
        _SCOPES.set(tuple(s for s in scopes if s is not scope))
