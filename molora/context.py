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
(:func:`last_forward`). Scopes are per thread (a forward runs synchronously), signals per
thread and asyncio task: two threads running forwards of one model at once never see each
other's state, and no module keeps per-call state.

A *generation scope* (:func:`generation_scope`) spans one ``generate`` call of a model. Its
forward scopes (prefill, then one per decoding step) share two things: the routing signals,
given per input row, are repeated for the rows ``generate`` makes of each (beams, return
sequences: ``repeat_interleave``, as transformers expands the inputs), and every per-example
decision (a sequence-level router's pooled choice, a task or retrieval pick) is made once, at
the first forward that needs it (the prefill), and kept through decoding. So a sequence router
decides from the whole prompt, not from the newest token a cached step sees, and generation
with and without the KV cache routes alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
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
        expert_weights: ``Tensor [batch, E]``, each example's own weights over the experts
            (router ``"mixture"``).
    """

    task_ids: Tensor | None = None
    timesteps: Tensor | None = None
    embeddings: Tensor | None = None
    attention_mask: Tensor | None = None
    expert_weights: Tensor | None = None

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
        shape = "[batch]" if ndim == 1 else {"embeddings": "[batch, dim]", "expert_weights": "[batch, experts]"}.get(name, "[batch, seq]")
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
    expert_weights: Any = None,
    base: RoutingSignals | None = None,
) -> RoutingSignals:
    """Validate raw signals (shapes and dtypes; values are checked by the router that reads them)."""
    signals = RoutingSignals(
        task_ids=_as_tensor("task_ids", task_ids, ndim=1, integer=True),
        timesteps=_as_tensor("timesteps", timesteps, ndim=1, integer=None),
        embeddings=_as_tensor("embeddings", embeddings, ndim=2, integer=False),
        attention_mask=_as_tensor("attention_mask", attention_mask, ndim=2, integer=None),
        expert_weights=_as_tensor("expert_weights", expert_weights, ndim=2, integer=False),
    )
    # fields read directly: dataclasses.asdict would deep-copy every tensor of every routing block
    batch = {f.name: getattr(signals, f.name).shape[0] for f in dataclasses.fields(signals)
             if getattr(signals, f.name) is not None}
    if len(set(batch.values())) > 1:
        raise RoutingError(f"routing signals disagree on the batch size: {batch}")
    if base is None:
        return signals
    return base.replace(**{f.name: getattr(signals, f.name) for f in dataclasses.fields(signals)})


class _ThreadState(threading.local):
    """Per-thread state: the open forward scopes (innermost last), the last finished forward of
    every model (by owner), and a mirror of the routing signals for compiled code.

    A forward runs synchronously in one thread, so its scope is per thread (and so per asyncio
    task: tasks switch only at ``await``). The signals of a ``routing`` block may span awaits:
    their source of truth is the context variable; torch.compile cannot read a ContextVar
    (Dynamo cannot trace ``ContextVar.get``) but can read this thread-local mirror, so compiled
    forwards see the signals of their thread's innermost ``routing`` block. Tuples and dicts are
    replaced, never mutated, so a reader never sees a half-made change."""

    def __init__(self) -> None:
        self.scopes: tuple[ForwardScope, ...] = ()
        self.generations: tuple[GenerationScope, ...] = ()
        self.last: dict[int, ForwardScope] = {}
        self.signals = RoutingSignals()


_THREAD = _ThreadState()


def _signals_in_force() -> RoutingSignals:
    return _THREAD.signals if torch.compiler.is_compiling() else _SIGNALS.get()


@contextlib.contextmanager
def routing(**signals: Any) -> Iterator[RoutingSignals]:
    """Set routing signals for the forward passes inside the block (see module docstring)."""
    new = make_signals(base=_SIGNALS.get(), **signals)
    token = _SIGNALS.set(new)
    mirrored, _THREAD.signals = _THREAD.signals, new
    try:
        yield new
    finally:
        _THREAD.signals = mirrored
        _SIGNALS.reset(token)


def current_signals() -> RoutingSignals:
    """The signals in force: those of the running forward scope, else of the innermost ``routing``."""
    scope = current_scope()
    return scope.signals if scope is not None else _signals_in_force()


def expand_signals(signals: RoutingSignals, batch: int | None, rows: int | None) -> RoutingSignals:
    """``signals`` of ``batch`` examples for ``rows`` input rows made of them by repeating each
    example ``rows / batch`` times in place (``repeat_interleave``: how ``generate`` expands its
    inputs for beams and return sequences). Fields of any other size are left as they are (the
    router that reads them reports the mismatch)."""
    if rows is None or batch is None or rows == batch or batch < 1 or rows % batch:
        return signals
    changes = {}
    for f in dataclasses.fields(signals):
        value = getattr(signals, f.name)
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            changes[f.name] = value.repeat_interleave(rows // batch, dim=0)
    return dataclasses.replace(signals, **changes) if changes else signals


class GenerationScope:
    """State of one ``generate`` call of a model, shared by its forward scopes: the call's input
    ``batch`` (the examples its routing signals are given for) and the per-example decisions
    kept from the first forward that made them (see the module docstring)."""

    def __init__(self, owner: object = None, batch: int | None = None) -> None:
        self.owner = owner
        self.batch = batch
        self._kept: dict[int, tuple[object, Any]] = {}
        self._experts: dict[int, tuple[object, Any]] = {}

    def experts(self, bank: Any) -> Any:
        """``bank.stacked()``, read once per generate call (module docstring); under grad mode
        with trainable experts, per forward as outside generation."""
        if torch.is_grad_enabled():
            return bank.stacked()
        hit = self._experts.get(id(bank))
        if hit is None or hit[0] is not bank:
            hit = (bank, bank.stacked())  # the bank is kept, so its id cannot be reused meanwhile
            self._experts[id(bank)] = hit
        return hit[1]

    def kept(self, key: object, compute: Callable[[], Any]) -> Any:
        """The decision kept for ``key`` (a router or a layer), else ``compute()``, kept when it is
        per example (token-level decisions change with every new token and are never kept)."""
        hit = self._kept.get(id(key))
        if hit is not None and hit[0] is key:
            return hit[1]
        decision = compute()
        if getattr(decision, "per_example", False):
            self._kept[id(key)] = (key, decision)
        return decision


@contextlib.contextmanager
def generation_scope(owner: object = None, batch: int | None = None) -> Iterator[GenerationScope]:
    """Open a generation scope of ``owner`` around a ``generate`` call of ``batch`` input rows
    (this thread's forward scopes of ``owner`` opened inside it share it)."""
    scope = GenerationScope(owner, batch)
    _THREAD.generations = (*_THREAD.generations, scope)
    try:
        yield scope
    finally:
        _THREAD.generations = tuple(g for g in _THREAD.generations if g is not scope)


def current_generation(owner: object) -> GenerationScope | None:
    """The innermost open generation scope of ``owner`` in this thread, or ``None``."""
    for g in reversed(_THREAD.generations):
        if g.owner is owner:
            return g
    return None


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

    ``owner`` identifies the model that opened it (see :func:`last_forward`); ``generation``
    is the generate call it belongs to, if any (:class:`GenerationScope`)."""

    def __init__(self, signals: RoutingSignals, owner: object = None, generation: GenerationScope | None = None) -> None:
        self.signals = signals
        self.owner = owner
        self.generation = generation
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


def current_scope() -> ForwardScope | None:
    """The innermost open forward scope of this thread, or ``None``."""
    scopes = _THREAD.scopes
    return scopes[-1] if scopes else None


def enter_forward(owner: object = None, attention_mask: Tensor | None = None, rows: int | None = None) -> ForwardScope:
    """Open a forward scope of ``owner`` (the routing signals in force, plus the call's
    ``attention_mask`` unless the user set one); pair with :func:`exit_forward`. Inside a
    generation scope of ``owner`` the signals are expanded to the call's ``rows`` input rows
    (:func:`expand_signals`) and the scope joins that generation."""
    signals = _signals_in_force()
    generation = current_generation(owner) if owner is not None else None
    if generation is not None:
        signals = expand_signals(signals, generation.batch, rows)
    if signals.attention_mask is None and isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
        signals = signals.replace(attention_mask=attention_mask)
    scope = ForwardScope(signals, owner, generation)
    _THREAD.scopes = (*_THREAD.scopes, scope)
    return scope


def exit_forward(owner: object = None) -> ForwardScope | None:
    """Close the innermost forward scope of ``owner`` and keep it as that owner's last forward
    (:func:`last_forward`); a no-op when this thread has no open scope of ``owner``."""
    scopes = _THREAD.scopes
    for i in range(len(scopes) - 1, -1, -1):
        if scopes[i].owner is owner:
            scope = scopes[i]
            _THREAD.scopes = scopes[:i] + scopes[i + 1:]
            if owner is not None:
                _THREAD.last = {**_THREAD.last, id(owner): scope}
            return scope
    return None


def last_forward(owner: object) -> ForwardScope | None:
    """The last forward scope ``owner`` closed in this thread (``None`` before any)."""
    scope = _THREAD.last.get(id(owner))
    return scope if scope is not None and scope.owner is owner else None


@contextlib.contextmanager
def replay_scope(signals: RoutingSignals) -> Iterator[ForwardScope]:
    """A forward scope holding ``signals``, owned by no model (its records are nobody's last
    forward): where a forward's computation runs again after that forward ended (activation
    checkpointing's recomputation, :mod:`molora.checkpointing`)."""
    scope = ForwardScope(signals)
    _THREAD.scopes = (*_THREAD.scopes, scope)
    try:
        yield scope
    finally:
        _THREAD.scopes = tuple(s for s in _THREAD.scopes if s is not scope)


@contextlib.contextmanager
def forward_scope(owner: object = None, attention_mask: Tensor | None = None) -> Iterator[ForwardScope]:
    """``with forward_scope() as scope: layer(x)``: run routed layers outside a
    :class:`~molora.model.MoLoRAModel` (which opens one around every forward itself) and read
    what they decided from ``scope.records``. A scope of no owner opened inside another scope is
    part of that one's forward: on exit its records join the enclosing scope's (so a loss that
    runs layers in its own scope inside :func:`molora.train_router` still feeds the prior)."""
    scope = enter_forward(owner, attention_mask)
    try:
        yield scope
    finally:
        _THREAD.scopes = tuple(s for s in _THREAD.scopes if s is not scope)
        if owner is None and _THREAD.scopes:
            parent = _THREAD.scopes[-1]
            for name, rec in scope.records.items():
                parent.record(name, rec.decision, rec.mask)
