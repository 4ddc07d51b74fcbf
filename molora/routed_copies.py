"""A routed "module per expert": PEFT's ``modules_to_save`` behind molora's router.

PEFT saves whole modules with an adapter (``modules_to_save``, e.g. a sequence-classification
head ``classifier``/``score`` trained in full): its ``ModulesToSaveWrapper`` keeps one full copy
per adapter, runs the active adapter's copy, and in a mixed batch (``adapter_names=[...]``) runs
each example through its adapter's copy (``"__base__"``: the original module).

:class:`RoutedCopies` is that wrapper behind the model's shared router. Writing ``f_0`` for the
original module and ``f_e`` for expert ``e``'s copy (``f_e = f_0`` for an expert that saved none),
example ``b`` with per-example gates ``g_{b,e}`` gets

    y_b = f_0(x_b) + sum_e g_{b,e} (f_e(x_b) - f_0(x_b))
        = (1 - sum_{e in C} g_{b,e}) f_0(x_b) + sum_{e in C} g_{b,e} f_e(x_b)     (C: experts with a copy)

which mixes the copies as the routed LoRA layers mix their deltas (``y = f_0 + sum_e g_e delta_e``).
A one-hot gate (router ``"task"``, a one-hot ``"static"``/``"mixture"`` mix) runs exactly the
chosen module, with no arithmetic on its output, so task routing equals PEFT with that adapter
active and a task-routed mixed batch equals PEFT's ``adapter_names=`` batch bit for bit. Only
per-example decisions of a model-level (shared) router are defined: a per-token router (soft,
top-k, ...) would give one head several gates per example, which PEFT has no counterpart of, so
such routers are refused with a RoutingError naming the module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from molora.context import current_scope, current_signals
from molora.errors import MoLoRAError, RoutingError
from molora.routers import Router, RoutingDecision

#: ``pinned`` value of a module whose original runs (a merged mix that uses no copy)
ORIGINAL = -1


class RoutedCopies(nn.Module):
    """The original module (``base_layer``, frozen) plus one full copy per expert that saved one
    (``copies``, keyed by the expert's global index), routed per example (module docstring).

    Args:
        base_layer: the base model's module (any ``nn.Module`` whose first input and output are
            batch-first tensors).
        copies: ``{global expert index: module}``: each expert's own copy of ``base_layer``.
        name: the module path (errors, checkpoints).
        num_global_experts: the model's number of experts.
    """

    def __init__(self, base_layer: nn.Module, copies: Mapping[int, nn.Module], *, name: str,
                 num_global_experts: int) -> None:
        super().__init__()
        ids = sorted(int(i) for i in copies)
        if not ids or any(not 0 <= i < num_global_experts for i in ids):
            raise MoLoRAError(f"module {name!r}: copies for experts {ids} of {num_global_experts}")
        self.base_layer = base_layer
        self.copies = nn.ModuleDict({str(i): copies[i] for i in ids})
        self.name = name
        self.num_global_experts = int(num_global_experts)
        self.disabled = False
        # while the model is merged: the global expert whose copy runs (ORIGINAL: the base module)
        self.pinned: int | None = None
        self._shared_router: list[Router] = []  # a plain list: the model owns the shared router
        self.tied_to: str | None = None  # trained tokens of a tied output layer: the embedding's path

    @property
    def holds(self) -> str:
        """What the copies are, for messages."""
        from molora.routed_tokens import TiedTokenRows, TokenRows

        if isinstance(next(iter(self.copies.values())), (TokenRows, TiedTokenRows)):
            return "per-adapter trained tokens (PEFT's trainable_token_indices)"
        return "whole per-adapter copies (PEFT's modules_to_save)"

    @property
    def expert_ids(self) -> list[int]:
        """The global indices of the experts that have a copy."""
        return [int(k) for k in self.copies]

    def copy_of(self, expert: int) -> nn.Module:
        """The module expert ``expert`` runs: its copy, or the original if it saved none."""
        return self.copies[str(expert)] if str(expert) in self.copies else self.base_layer

    def set_shared_router(self, router: Router | None) -> None:
        """Called by the model that owns the shared router."""
        self._shared_router = [] if router is None else [router]

    def set_trainable(self, trainable: bool, experts: Sequence[int] | None = None) -> None:
        """Freeze or unfreeze the copies of the global experts ``experts`` (``None``: all)."""
        for i in self.expert_ids if experts is None else [e for e in experts if str(e) in self.copies]:
            self.copies[str(i)].requires_grad_(trainable)

    def static_choice(self, weights: Tensor | Sequence[float], what: str) -> int:
        """The one module a static mix ``weights`` (one per global expert) runs here: the copy of
        the only expert with a copy and a non-zero weight when that weight is exactly 1, or
        :data:`ORIGINAL` when no expert with a copy weighs in; else a MoLoRAError (a blend of
        whole modules is no single module, so it cannot be merged or written as one adapter)."""
        w = [float(v) for v in weights]
        used = [e for e in self.expert_ids if e < len(w) and w[e] != 0.0]
        if not used:
            return ORIGINAL
        if len(used) == 1 and w[used[0]] == 1.0:
            return used[0]
        raise MoLoRAError(f"{what}: module {self.name!r} holds {self.holds} for "
                          f"experts {self.expert_ids}; the mix gives weights {({e: w[e] for e in used})} to experts with "
                          "a copy, and a blend of whole modules is not one module. Use a mix that gives weight 1 to at "
                          "most one expert with a copy (others may share its LoRA layers), or route per example instead")

    def _decision(self, x: Tensor) -> RoutingDecision:
        from molora.layer import RoutedLoRALinear

        if not self._shared_router:
            raise RoutingError(f"module {self.name!r} holds {self.holds}, which run "
                               "per example by a model-level router (router='task', 'static', 'mixture', ...); "
                               "this model has per-layer routers, whose per-token gates have no per-example copy")
        scope = current_scope()
        signals = scope.signals if scope is not None else current_signals()
        # the shared router's one decision of this forward (the routed layers' own path: cached
        # per scope, kept through a generation); global expert indices
        return RoutedLoRALinear._decide(self, x, signals, scope)

    _identity_map = True  # RoutedLoRALinear._decide: the decision stays in global expert indices
    router = None

    def forward(self, x: Tensor, *args, **kwargs):
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.pinned is not None:
            return self.copy_of(self.pinned)(x, *args, **kwargs)
        d = self._decision(x)
        if not d.per_example:
            raise RoutingError(f"module {self.name!r} holds {self.holds}, which run "
                               f"per example; router {getattr(self._shared_router[0], 'name', '?')!r} decides per "
                               "token")
        batch = x.shape[0] if x.dim() > 1 else 1
        if d.gates.shape[0] != batch:
            raise RoutingError(f"module {self.name!r}: routing signals are for {d.gates.shape[0]} examples but the "
                               f"input {tuple(x.shape)} has batch size {batch}")
        weights = self._module_weights(d)  # {global expert or ORIGINAL: [batch] float32}
        if len(weights) == 1:
            (key, w), = weights.items()
            if bool((w == 1.0).all()):  # one module for the whole batch: PEFT's single-adapter forward
                return self.copy_of(key)(x, *args, **kwargs)
        out = None
        for key, w in weights.items():
            rows = (w != 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            y = self.copy_of(key)(x[rows], *args, **kwargs)
            if not isinstance(y, Tensor):
                raise RoutingError(f"module {self.name!r}: a mixed batch over per-adapter copies needs a tensor "
                                   f"output; the module returns {type(y).__name__}")
            if out is None:
                out = y.new_zeros((batch, *y.shape[1:]))
            wr = w[rows].to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
            # a weight of exactly 1 copies the module's rows as they are (PEFT's mixed batch)
            out[rows] = out[rows] + (y if bool((wr == 1).all()) else wr * y)
        if out is None:  # every gate 0 on an empty batch
            return self.base_layer(x, *args, **kwargs)
        return out

    def _module_weights(self, d: RoutingDecision) -> dict[int, Tensor]:
        """Each module's per-example weight (module docstring): the copies' gates, and
        ``1 - sum`` of them for the original; modules of weight 0 everywhere left out."""
        gates = d.gates.float()
        batch = gates.shape[0]
        weights: dict[int, Tensor] = {}
        for e in self.expert_ids:
            if d.indices is None:
                g = gates[:, e] if e < gates.shape[1] else gates.new_zeros(batch)
            else:
                g = (gates * (d.indices == e)).sum(1)
            if bool((g != 0).any()):
                weights[e] = g
        rest = torch.ones(batch, device=gates.device)
        for g in weights.values():
            rest = rest - g
        if bool((rest != 0).any()):
            weights[ORIGINAL] = rest
        return weights

    def spec(self) -> dict:
        """JSON description (checkpoints): the experts with a copy, whether each trains, the merged
        pin; for trained tokens (:mod:`molora.routed_tokens`) each expert's token ids, or the path
        of the embedding a tied output layer follows."""
        from molora.routed_tokens import TiedTokenRows, TokenRows

        trainable = [any(p.requires_grad for p in self.copies[str(e)].parameters()) for e in self.expert_ids]
        spec = {"expert_ids": self.expert_ids, "trainable": trainable, "pinned": self.pinned}
        first = self.copies[str(self.expert_ids[0])]
        if isinstance(first, TokenRows):
            spec["tokens"] = {str(e): self.copies[str(e)].indices.tolist() for e in self.expert_ids}
        elif isinstance(first, TiedTokenRows):
            spec["tied_to"] = self.tied_to
            spec["trainable"] = [False] * len(self.expert_ids)  # its rows train in the embedding's copies
        return spec

    def extra_repr(self) -> str:
        return f"name={self.name!r}, copies for experts {self.expert_ids}"


def build_routed_copies(base_layer: nn.Module, *, name: str, copies: Mapping[int, nn.Module],
                        num_global_experts: int) -> RoutedCopies:
    """A :class:`RoutedCopies` around ``base_layer``; every copy must have the original's
    parameters and buffers, of the same shapes (MoLoRAError naming the module and the tensor)."""
    from molora.routed_tokens import TiedTokenRows, TokenRows

    tokens = [isinstance(c, (TokenRows, TiedTokenRows)) for c in copies.values()]
    if any(tokens):  # trained rows of an embedding, checked when they were made
        if not all(tokens) or len({type(c) for c in copies.values()}) != 1:
            raise MoLoRAError(f"module {name!r}: per-expert copies are either whole modules or trained tokens, of one kind")
        return RoutedCopies(base_layer, copies, name=name, num_global_experts=num_global_experts)
    reference = {k: tuple(v.shape) for k, v in base_layer.state_dict().items()}
    for e, copy in copies.items():
        got = {k: tuple(v.shape) for k, v in copy.state_dict().items()}
        if got != reference:
            bad = sorted(set(got) ^ set(reference)) or [k for k in got if got[k] != reference[k]]
            k = bad[0]
            raise MoLoRAError(f"module {name!r}: the copy of expert {e} does not match the base module "
                              f"{type(base_layer).__name__}: tensor {k!r} is {list(got.get(k, ())) if k in got else 'missing'}"
                              f", the base's is {list(reference[k]) if k in reference else 'missing'}")
    return RoutedCopies(base_layer, copies, name=name, num_global_experts=num_global_experts)


def routed_copies(root: nn.Module) -> dict[str, RoutedCopies]:
    """The :class:`RoutedCopies` modules of ``root`` by module path."""
    return {n: m for n, m in root.named_modules() if isinstance(m, RoutedCopies)}
