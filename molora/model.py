"""MoLoRAModel: a transformers (or any torch) model whose target linears are routed LoRA layers."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molora import context
from molora.blockwise import check_patterns_match, with_new_expert
from molora.checkpointing import wrap_checkpointing
from molora.checks import mixture_weights
from molora.config import MoLoRAConfig
from molora.errors import MoLoRAError, RoutingError
from molora.layer import (RoutedLoRALinear, base_features, build_routed_layer, layer_device, layer_spec,
                          routed_layer_class)
from molora.routers import Router, build_router, router_class
from molora.routers.losses import model_aux_loss

from .bank import BaseExpertBank, ExpertBank


def router_kwargs(config: MoLoRAConfig, module_name: str | None = None) -> dict[str, Any]:
    """The router's constructor kwargs: ``router_kwargs`` plus ``top_k`` where the router takes it
    (the layer's own ``top_k`` when ``module_name`` has a :attr:`~MoLoRAConfig.layer_overrides` entry)."""
    kwargs = dict(config.router_kwargs)
    top_k = config.top_k if module_name is None else config.layer_settings(module_name)["top_k"]
    if top_k is not None:
        if "top_k" not in inspect.signature(router_class(config.router).__init__).parameters:
            raise MoLoRAError(f"MoLoRAConfig: router {config.router!r} takes no top_k; use router='topk'")
        if module_name is not None and top_k != config.top_k:
            kwargs["top_k"] = top_k
        else:
            kwargs.setdefault("top_k", top_k)
    return kwargs


def find_targets(model: nn.Module, config: MoLoRAConfig) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``config.target_modules`` selects; errors if none or unsupported."""
    targets = {name: m for name, m in model.named_modules() if name and config.matches(name)}
    if not targets:
        raise MoLoRAError(
            f"no module of {type(model).__name__} matches target_modules={config.target_modules!r}; "
            f"linear modules are e.g. {_linear_names(model)[:8]}"
        )
    for name, module in targets.items():
        if isinstance(module, RoutedLoRALinear):
            raise MoLoRAError(f"module {name!r} is already a routed LoRA layer")
        try:
            base_features(module)
        except MoLoRAError as exc:
            raise MoLoRAError(f"target module {name!r}: {exc}") from None
    return targets


def find_modules_to_save(model: nn.Module, config: MoLoRAConfig, routed: Sequence[str]) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``config.modules_to_save`` names, by path (a module inside
    another listed one is saved with it); MoLoRAError for an entry that matches nothing or a
    module that holds, or sits inside, a routed layer (``routed``: their paths)."""
    if not config.modules_to_save:
        return {}
    found = {name: m for name, m in model.named_modules() if name and config.saves_module(name)}
    missing = [t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        raise MoLoRAError(f"modules_to_save {missing} match no module of {type(model).__name__}; "
                          f"its top-level modules are {[n for n, _ in model.named_children()][:8]}")
    found = {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found)}
    for name in found:
        inner = [p for p in routed if p == name or p.startswith(name + ".") or name.startswith(p + ".")]
        if inner:
            raise MoLoRAError(f"modules_to_save: module {name!r} holds or is a routed layer ({inner[0]!r}); "
                              f"save whole modules that no target_modules entry reaches (e.g. a new head)")
        if name == SHARED_ROUTER_KEY:
            raise MoLoRAError(f"modules_to_save: a module named {name!r} collides with the checkpoint key of the shared router")
    return found


SHARED_ROUTER_KEY = "shared_router"
ROUTING_KEYWORDS = ("task_ids", "timesteps", "embeddings", "expert_weights")


def forward_signature(base_class: type) -> inspect.Signature:
    """The signature :class:`MoLoRAModel` shows for a base of class ``base_class``: the base
    forward's (``self`` first, as on a class), with the routing signals and ``aux_loss_weight``
    as keyword-only parameters before its ``**kwargs`` (names the base takes already stay the
    base's in the listing; the call gives them to molora)."""
    try:
        params = list(inspect.signature(base_class.forward).parameters.values())
    except (TypeError, ValueError):
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
    names = {p.name for p in params}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ROUTING_KEYWORDS if n not in names]
    if "aux_loss_weight" not in names:
        extra.append(inspect.Parameter("aux_loss_weight", inspect.Parameter.KEYWORD_ONLY, default=1.0, annotation=float))
    tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    return inspect.Signature([*head, *extra, *tail])


_SIGNED: dict[tuple[type, type], type] = {}


def _signed_class(cls: type, base_class: type) -> type:
    """``cls`` with a ``forward`` that shows :func:`forward_signature` of ``base_class`` (one
    class per pair, named as ``cls``). transformers reads what a model takes from its forward's
    signature, on the instance (the dataset columns the Trainer keeps) and on the class (the
    label names, ``find_labels``); a ``*args, **kwargs`` forward would hide every column."""
    key = (cls, base_class)
    signed = _SIGNED.get(key)
    if signed is None:
        plain = cls.forward

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return plain(self, *args, **kwargs)

        forward.__signature__ = forward_signature(base_class)
        forward.__doc__ = plain.__doc__
        forward.__name__ = forward.__qualname__ = "forward"
        signed = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                                             "_signed_for": base_class})
        _SIGNED[key] = signed
    return signed


def _linear_names(model: nn.Module) -> list[str]:
    names = []
    for name, m in model.named_modules():
        try:
            base_features(m)
            names.append(name)
        except MoLoRAError:
            pass
    return names


class MoLoRAModel(nn.Module):
    """A base model with routed LoRA layers; everything else passes through.

    Build one with :func:`get_molora_model`, :func:`molora.compose` or :meth:`from_pretrained`.
    The base model's parameters are frozen; experts and routers are trainable unless frozen.

    Every forward of the wrapped model (also the inner forwards of ``generate``) runs in a
    forward scope (:mod:`molora.context`) of its own thread / task: a shared router decides once
    per forward, and what the layers decided is read back by :meth:`aux_loss`,
    :meth:`routing_stats` and :meth:`last_routing` in the same thread. The model owns every
    change to itself (routers, experts, merges, weights); each checks everything before it
    changes anything and keeps :attr:`molora_config` in step, so that a checkpoint saves what runs.

    As with PEFT's ``PeftModel``, ``model.config`` is the *base model's* config (attribute
    access falls through to the base model), so transformers code and users read and set it as
    on the base (``model.config.use_cache = False``); the MoLoRA configuration is
    :attr:`molora_config`.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: MoLoRAConfig,
        layers: Mapping[str, RoutedLoRALinear],
        *,
        expert_names: Sequence[str],
        shared_router: Router | None = None,
    ) -> None:
        saved = find_modules_to_save(base_model, config, list(layers))  # checked before anything changes
        super().__init__()
        if "_signed_for" not in type(self).__dict__:
            self.__class__ = _signed_class(type(self), type(base_model))
        self.base_model = base_model
        self.molora_config = config
        self.expert_names = list(expert_names)
        self.shared_router = shared_router
        self._saved_paths = list(saved)
        base_model.requires_grad_(False)
        for module in saved.values():
            module.requires_grad_(True)
        for name, layer in layers.items():
            layer.set_shared_router(shared_router)
            base_model.set_submodule(name, layer)
        # identifies this model's forward scopes; a plain object, so a thread's record of the
        # last forward does not keep the model alive
        self._scope_owner = object()
        self._hooks = [
            base_model.register_forward_pre_hook(self._open_scope, with_kwargs=True),
            base_model.register_forward_hook(self._close_scope, always_call=True),
        ]
        wrap_checkpointing(base_model)  # checkpointing enabled on the base before wrapping

    # ------------------------------------------------------------------ activation checkpointing
    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The base model's, with recomputation that routes as the forward did (:mod:`molora.checkpointing`)."""
        self.base_model.gradient_checkpointing_enable(*args, **kwargs)
        wrap_checkpointing(self.base_model)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """As :meth:`gradient_checkpointing_enable` (transformers' newer name)."""
        self.base_model.activation_checkpointing_enable(*args, **kwargs)
        wrap_checkpointing(self.base_model)

    # ------------------------------------------------------------------ plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _open_scope(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context.enter_forward(self._scope_owner, kwargs.get("attention_mask"), _input_rows(args, kwargs))

    def _close_scope(self, module: nn.Module, args: tuple, output: Any) -> None:
        context.exit_forward(self._scope_owner)

    def last_routing(self) -> dict[str, context.LayerRecord]:
        """What each routed layer decided in this thread's last forward of this model, by module
        path (``record.decision`` in the layer's local experts, ``record.mask``); ``{}`` before any."""
        scope = context.last_forward(self._scope_owner)
        return {} if scope is None else dict(scope.records)

    def forward(self, *args: Any, task_ids: Any = None, timesteps: Any = None, embeddings: Any = None,
                expert_weights: Any = None, aux_loss_weight: float = 1.0, **kwargs: Any) -> Any:
        """The base model's forward, with its signature (:func:`forward_signature`), so that
        transformers' ``Trainer`` sees the columns it takes.

        ``task_ids``, ``timesteps``, ``embeddings``, ``expert_weights``: routing signals of this call (as
        ``with model.routing(...)``; a Trainer dataset column ``task_ids`` flows in so).

        The balancing losses join the output as in transformers' MoE models (Mixtral's
        ``loss += router_aux_loss_coef * aux_loss``): when the output carries a ``loss`` (labels
        were given) and :attr:`molora_config` sets a coefficient, ``output.aux_loss`` is
        :meth:`aux_loss` (the coefficients applied) and ``output.loss`` is the task loss plus
        ``aux_loss_weight * aux_loss`` (a Trainer that rescales the loss for gradient
        accumulation passes its weight; :class:`~molora.integrations.MoLoRATrainer` does).
        Tuple outputs (``return_dict=False``) and loss-free calls are returned as the base gives them.
        """
        signals = {k: v for k, v in (("task_ids", task_ids), ("timesteps", timesteps), ("embeddings", embeddings),
                                     ("expert_weights", expert_weights)) if v is not None}
        if signals:
            with self.routing(**signals):
                output = self.base_model(*args, **kwargs)
        else:
            output = self.base_model(*args, **kwargs)
        return self._with_aux_loss(output, aux_loss_weight)

    def _with_aux_loss(self, output: Any, weight: float) -> Any:
        """``output`` with ``aux_loss`` set and ``weight * aux_loss`` added to its ``loss`` (see :meth:`forward`)."""
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is None or not self.molora_config.has_aux_loss:
            return output
        aux = self.aux_loss().to(loss.device)
        output["aux_loss"] = aux
        output["loss"] = loss + weight * aux
        return output

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` in one generation scope (:mod:`molora.context`): routing
        signals given per input row follow the rows ``generate`` makes of them (``num_beams``,
        ``num_return_sequences``), and per-example decisions (sequence-level, task, retrieval
        routers) are made once at the prefill and kept through decoding, with or without the
        KV cache."""
        with context.generation_scope(self._scope_owner, _input_rows(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    def routed_layers(self) -> dict[str, RoutedLoRALinear]:
        """The routed layers by module path (relative to the base model)."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, RoutedLoRALinear)}

    def routed_copies(self) -> dict[str, Any]:
        """The whole per-expert module copies (PEFT's ``modules_to_save``,
        :class:`~molora.routed_copies.RoutedCopies`) by module path."""
        from molora.routed_copies import routed_copies

        return routed_copies(self.base_model)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    # ------------------------------------------------------------------ routing
    @property
    def task_names(self) -> list[str] | None:
        return getattr(self.shared_router, "task_names", None)

    def routing(self, **signals: Any) -> contextlib.AbstractContextManager:
        """``with model.routing(task_ids=..., timesteps=..., embeddings=..., attention_mask=...):``

        Sets the routing signals for the forward passes inside the block. ``task_ids`` may hold
        task names (e.g. the adapter names of :func:`molora.compose`); ``expert_weights`` (router
        ``"mixture"``) may hold one ``{expert name: weight}`` dict per example (names left out weigh 0).
        """
        mix = signals.get("expert_weights")
        if isinstance(mix, (list, tuple)) and any(isinstance(m, Mapping) for m in mix):
            signals["expert_weights"] = torch.tensor(
                [mixture_weights(m, self.expert_names, f"routing(expert_weights[{b}])", error=RoutingError)
                 for b, m in enumerate(mix)], dtype=torch.float32)
        ids = signals.get("task_ids")
        if isinstance(ids, (list, tuple)) and any(isinstance(t, str) for t in ids):
            index = getattr(self.shared_router, "task_index", None)
            if index is None:
                raise MoLoRAError("task names need a task router (router='task')")
            signals["task_ids"] = torch.tensor([index(t) for t in ids], dtype=torch.long)
        return context.routing(**signals)

    @contextlib.contextmanager
    def routers_kept_on_error(self) -> Iterator[None]:
        """Inside the block routers may be replaced (:meth:`set_router`, :meth:`set_layer_routers`);
        if it raises, the model's routers and router config are put back as they were."""
        layers = self.routed_layers().values()
        saved = (self.shared_router, [(layer, layer.router, list(layer._shared_router)) for layer in layers],
                 self.molora_config.router, dict(self.molora_config.router_kwargs))
        try:
            yield
        except BaseException:
            self.shared_router = saved[0]
            for layer, router, shared in saved[1]:
                layer.router = router
                layer.set_shared_router(shared[0] if shared else None)
            self.molora_config.router, self.molora_config.router_kwargs = saved[2], saved[3]
            raise

    def set_router(self, router: Router) -> None:
        """Route every layer through ``router`` from now on (e.g. train each task's expert under
        task-id routing, then serve all experts by retrieval). ``router`` must be a shared
        router over this model's experts; per-layer routers are removed."""
        if not isinstance(router, Router) or not router.shared:
            raise MoLoRAError(f"set_router takes a shared router (one decision per forward); "
                              f"{getattr(router, 'name', type(router).__name__)!r} is per-layer")
        if router.num_experts != self.num_experts:
            raise MoLoRAError(f"router {router.name!r} has {router.num_experts} experts; the model has {self.num_experts}")
        self.shared_router = router
        for layer in self.routed_layers().values():
            layer.router = None
            layer.set_shared_router(router)
        for copies in self.routed_copies().values():
            copies.set_shared_router(router)
        self.molora_config.router = router.name
        self.molora_config.router_kwargs = {}

    def set_layer_routers(self, make: Any, name: str, kwargs: Mapping[str, Any] | None = None) -> None:
        """Give every routed layer its own router ``make(module_path, layer)`` (built for all
        layers before any is installed) and drop the shared router; the config records
        ``name`` and ``kwargs`` (the routers' constructor arguments)."""
        layers = self.routed_layers()
        routers = {path: make(path, layer) for path, layer in layers.items()}
        for path, router in routers.items():
            if not isinstance(router, Router) or router.shared:
                raise MoLoRAError(f"set_layer_routers: module {path!r} got {type(router).__name__}, not a per-layer router")
            if router.num_experts != layers[path].bank.num_experts:
                raise MoLoRAError(f"set_layer_routers: module {path!r} holds {layers[path].bank.num_experts} experts; "
                                  f"its router has {router.num_experts}")
        for path, layer in layers.items():
            layer.router = routers[path]
            layer.set_shared_router(None)
        self.shared_router = None
        for copies in self.routed_copies().values():  # they refuse per-layer routing at their forward
            copies.set_shared_router(None)
        self.molora_config.router, self.molora_config.router_kwargs = name, dict(kwargs or {})

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside the block (bit-exact base outputs)."""
        layers = self.routed_layers().values()
        if any(layer.merged_weights is not None for layer in layers):
            raise MoLoRAError("adapters are merged into the base weights; unmerge() before disabling them")
        layers = [*layers, *self.routed_copies().values()]  # a copied module runs its original
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, p in zip(layers, previous):
                layer.disabled = p

    # ------------------------------------------------------------------ merging
    def layer_weights(self, weights: Mapping[str, float] | Sequence[float], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """One finite weight per expert (a name -> weight mapping, missing = 0, or a sequence;
        :func:`molora.checks.mixture_weights`), split into each layer's local experts, by module path
        (``dtype``: float64 keeps the weights as given, as export's float64 merges need)."""

        w = torch.tensor(mixture_weights(weights, self.expert_names, "merge"), dtype=dtype)
        return {name: w[layer.expert_ids] for name, layer in self.routed_layers().items()}

    @property
    def merged(self) -> bool:
        return any(layer.merged_weights is not None for layer in self.routed_layers().values())

    def merge(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """Fold the static mixture ``sum_e w_e s_e B_e A_e`` into every base weight.

        ``weights`` maps expert names to weights (missing = 0) or lists one weight per expert.
        Every layer's merged weight is computed and checked (finite) before any is written; the
        original weights are kept, so :meth:`unmerge` restores them bit-exactly.
        """
        if self.merged:
            raise MoLoRAError("already merged; unmerge() first")
        per_layer = self.layer_weights(weights)
        layers = self.routed_layers()
        staged = {name: layer.merged_weight(per_layer[name]) for name, layer in layers.items()}
        # a per-expert module copy (modules_to_save) runs the one copy the mix picks while merged
        w_all = mixture_weights(weights, self.expert_names, "merge")
        pins = {copies: copies.static_choice(w_all, "merge") for copies in self.routed_copies().values()}
        for name, (merged, w) in staged.items():
            layers[name].commit_merge(merged, w)
        for copies, pin in pins.items():
            copies.pinned = pin

    def fold(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """Add the mixture ``sum_e w_e s_e B_e A_e`` to the base weights for good (O-LoRA folds a
        finished task so): unlike :meth:`merge`, the layers keep routing and nothing is kept to
        undo it. Every layer's new weight is computed and checked before any is written."""
        per_layer = self.layer_weights(weights)
        layers = self.routed_layers()
        staged = {name: layer.merged_weight(per_layer[name])[0] for name, layer in layers.items()}
        with torch.no_grad():
            for name, weight in staged.items():
                layers[name].base_layer.weight.copy_(weight)

    def unmerge(self) -> None:
        """Put back the base weights as they were before :meth:`merge` (bit-exact)."""
        for layer in self.routed_layers().values():
            layer.unmerge()
        for copies in self.routed_copies().values():
            copies.pinned = None

    # ------------------------------------------------------------------ losses and statistics
    def aux_loss(self) -> Tensor:
        """The configured balancing losses of this thread's last forward (0 if none apply); see
        :func:`molora.routers.losses.model_aux_loss`."""
        return model_aux_loss(self)

    def routing_stats(self) -> dict[str, Any]:
        """Per layer: share of tokens and of gate mass per expert, load CV, dropped tokens (last forward)."""
        from molora.stats import routing_stats

        return routing_stats(self)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")

    def set_experts_trainable(self, trainable: bool, experts: Sequence[str] | None = None) -> None:
        """Freeze or unfreeze the named experts in every layer (``None``: all experts)."""
        names = self.expert_names if experts is None else list(experts)
        unknown = sorted(set(names) - set(self.expert_names))
        if unknown:
            raise MoLoRAError(f"unknown experts {unknown}; experts are {self.expert_names}")
        ids = {self.expert_names.index(n) for n in names}
        for layer in self.routed_layers().values():
            local = [i for i, g in enumerate(layer.expert_ids) if g in ids]
            layer.bank.set_trainable(trainable, None if experts is None else local)
        for copies in self.routed_copies().values():
            copies.set_trainable(trainable, None if experts is None else sorted(ids))

    def add_expert(
        self,
        name: str,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        init: str | None = None,
        trainable: bool = True,
        kind: str | None = None,
    ) -> int:
        """Add one fresh expert (``B = 0``: it adds nothing yet) to every routed layer and grow
        the routers (its router weights start at 0; a soft router's gates renormalise over the
        larger set, a task router maps a new task to it); returns its global index. Rebuild optimizers afterwards:
        grown routers have new parameter tensors (the existing experts keep theirs).

        ``kind``: the new expert's kind in a model of mixed kinds (``expert_kind`` a list;
        default ``"lora"``); a model of one kind adds experts of that kind only."""
        from molora.bank import INITS
        from molora.kinds import EXPERT_KINDS

        if not isinstance(name, str) or not name:
            raise MoLoRAError(f"add_expert: the name must be a non-empty string; got {name!r}")
        if name in self.expert_names:
            raise MoLoRAError(f"an expert named {name!r} exists already; experts are {self.expert_names}")
        cfg = self.molora_config
        explicit_rank = rank is not None
        rank = cfg.rank if rank is None else rank
        alpha = cfg.alpha if alpha is None else alpha
        init = init or cfg.init
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MoLoRAError(f"add_expert {name!r}: rank must be a positive int; got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise MoLoRAError(f"add_expert {name!r}: alpha must be a finite number > 0; got {alpha!r}")
        if init not in INITS:
            raise MoLoRAError(f"add_expert {name!r}: init must be one of {INITS}; got {init!r}")
        mixed = isinstance(cfg.expert_kind, list)
        if kind is not None and (kind not in EXPERT_KINDS or not mixed and kind != cfg.expert_kind):
            raise MoLoRAError(f"add_expert {name!r}: kind must be one of {list(EXPERT_KINDS)}, and this model's banks hold "
                              f"{cfg.expert_kind!r} experts only (a model of mixed kinds: MoLoRAConfig(expert_kind=[...]))"
                              f"; got {kind!r}")
        kind = (kind or "lora") if mixed else cfg.expert_kind
        layers = self.routed_layers()
        # a bank with a shared factor fixes its rank: the default rank is then the layer's own
        fixed = {path: _fixed_rank(layer.bank, kind) for path, layer in layers.items()}
        bad = {path: r for path, r in fixed.items() if r is not None and r != rank and explicit_rank}
        if bad:
            raise MoLoRAError(f"add_expert {name!r}: a bank with a shared factor (HydraLoRA's A, QR-LoRA's Q) adds experts "
                              f"of its own rank only; got rank {rank}, modules have {bad}")
        routers = [layer.router for layer in layers.values() if layer.router is not None]
        routers += [self.shared_router] if self.shared_router is not None else []
        for router in {id(r): r for r in routers}.values():
            router.check_can_grow()
        # checked: from here on nothing fails halfway
        new_id = self.num_experts
        for router in {id(r): r for r in routers}.values():  # a router shared by layers grows once
            router.add_expert(name)
        for path, layer in layers.items():
            extra = {"kind": kind} if layer.bank.kind == "mixed" else {}
            layer.bank.add_expert(fixed[path] or rank, float(alpha), use_rslora=cfg.use_rslora, init=init,
                                  trainable=trainable, **extra)
            layer.set_expert_ids([*layer.expert_ids, new_id], new_id + 1)
        self.expert_names.append(name)
        if mixed:
            cfg.expert_kind = [*cfg.expert_kind, kind]
        if cfg.block_ranks or cfg.block_alphas:  # the config's per-expert lists keep one entry per expert
            cfg.block_ranks, cfg.block_alphas = with_new_expert(cfg.block_ranks, cfg.block_alphas, rank, float(alpha),
                                                                cfg.shared_a or cfg.expert_kind == "qr_lora")
        cfg.num_experts = len(self.expert_names)
        cfg.expert_names = list(self.expert_names)
        return new_id

    # ------------------------------------------------------------------ persistence
    def layer_specs(self) -> dict[str, dict]:
        return {name: layer_spec(layer) for name, layer in self.routed_layers().items()}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Only molora's tensors: experts and routers, keyed ``<module path>.<param>``."""
        from molora.persistence import adapter_modules, adapter_tensors

        return adapter_tensors(adapter_modules({**self.routed_layers(), **self.routed_copies()}, self.shared_router,
                                               self.saved_modules()))

    def saved_modules(self) -> dict[str, nn.Module]:
        """The base modules that :attr:`MoLoRAConfig.modules_to_save` names, by path: trainable,
        and saved and loaded with the checkpoint."""
        return {path: self.base_model.get_submodule(path) for path in self._saved_paths}

    def save_pretrained(self, directory: str) -> None:
        """Write ``molora_config.json`` and the weights file it names (``molora_model-<hash>.safetensors``)
        as one atomic commit (:mod:`molora.persistence`; no pickle)."""
        from molora.persistence import save_checkpoint

        save_checkpoint(self, directory)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str) -> MoLoRAModel:
        """Rebuild a saved MoLoRAModel on ``base_model`` (the same base it was trained on)."""
        from molora.persistence import load_checkpoint

        return load_checkpoint(base_model, directory)

    def export_peft(self, directory: str, weights: Mapping[str, float] | Sequence[float], combination: str = "cat",
                    **options: Any) -> None:
        """Write the static mixture ``sum_e w_e s_e B_e A_e`` as one PEFT LoRA adapter, merged by
        ``combination`` ("cat": exact; "svd", "ties", "dare_ties", ...; options ``density``,
        ``majority_sign_method``, ``svd_rank``, ``svd_clamp``, ``seed``): :func:`molora.export.export_peft`."""
        from molora.export import export_peft

        export_peft(self, directory, weights, combination, **options)

    def unload(self) -> nn.Module:
        """Put the original base layers back (merged mixtures stay folded in) and return the base model."""
        for name, layer in {**self.routed_layers(), **self.routed_copies()}.items():
            self.base_model.set_submodule(name, layer.base_layer)
        for h in self._hooks:
            h.remove()
        return self.base_model


def _input_rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward call of the wrapped model (``None`` if it shows none)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def build_shared_router(config: MoLoRAConfig, expert_names: Sequence[str], d_in: int, device: Any) -> Router | None:
    """The model-level router if ``config.router`` is a shared kind (task, retrieval, ...), else None."""
    cls = router_class(config.router)
    if not cls.shared:
        return None
    kwargs = router_kwargs(config)
    if config.router == "task":
        kwargs.setdefault("task_names", list(expert_names))
    router = build_router(config.router, num_experts=len(expert_names), d_in=d_in, **kwargs)
    return router.to(device=device, dtype=config.torch_dtype)


def _fixed_rank(bank: BaseExpertBank, kind: str) -> int | None:
    """The rank a new expert of ``kind`` must have in ``bank`` (a shared factor fixes it), else ``None``."""
    if bank.kind == "mixed":
        part = bank.parts[kind] if kind in bank.parts else None
        return part.fixed_rank if part is not None else None
    return bank.fixed_rank


def get_molora_model(model: nn.Module, config: MoLoRAConfig) -> MoLoRAModel:
    """Wrap ``model``: each target linear becomes a :class:`RoutedLoRALinear` with
    ``config.num_experts`` fresh experts (per layer: :meth:`MoLoRAConfig.layer_settings`, so MoLA's
    layer overrides and Block-wise LoRA's per-block ranks apply; a target where every expert has
    block rank 0 stays the base module); the base is frozen. Nothing is changed on error."""
    targets = find_targets(model, config)
    check_patterns_match(config.block_ranks, "block_ranks", targets)
    check_patterns_match(config.block_alphas, "block_alphas", targets)
    names = config.names()
    settings = {name: config.layer_settings(name) for name in targets}
    targets = {name: module for name, module in targets.items() if settings[name]["expert_ids"]}
    if not targets:
        raise MoLoRAError(f"block_ranks {config.block_ranks} give every expert rank 0 in every target module: "
                          "nothing to wrap")
    first = next(iter(targets.values()))
    devices = {name: layer_device(model, name) for name in targets}  # a meta base without hooks: refused here
    shared = build_shared_router(config, names, routed_layer_class(first).router_dim(first), next(iter(devices.values())))
    fixed = config.shared_a or config.expert_kind == "qr_lora"  # a shared factor fixes the rank
    layers: dict[str, RoutedLoRALinear] = {}
    for name, module in targets.items():
        d_in, d_out, _ = base_features(module)
        layout = settings[name]  # MoLA / Block-wise LoRA: experts, top_k, ranks may differ per layer
        ids, ranks = layout["expert_ids"], layout["ranks"]
        kinds = [config.kinds()[e] for e in ids]
        # one bank of several kinds (molora.kinds.mixed), also where this layer's live experts are
        # of one kind: an expert of another kind may be added later
        mixed = isinstance(config.expert_kind, list)
        bank = {"kind": "mixed" if mixed else kinds[0], "d_in": d_in, "d_out": d_out, "shared_a": config.shared_a,
                "shared_rank": ranks[0] if fixed else None, "init": config.init, "ranks": ranks,
                "alphas": layout["alphas"], "rslora": [config.use_rslora] * len(ids), **({"kinds": kinds} if mixed else {})}
        router = None if shared is not None else {"name": config.router, "config": router_kwargs(config, name)}
        layers[name] = build_routed_layer(module, name=name, bank=bank, router=router, expert_ids=ids,
                                          num_global_experts=len(names), dropout=config.dropout, dtype=config.torch_dtype,
                                          device=devices[name])
    return MoLoRAModel(model, config, layers, expert_names=names, shared_router=shared)
