"""The routed LoRA layer: a frozen base linear plus a routed mixture of LoRA experts.

    y = W x (+ b) + sum_e g_e(x) * s_e * B_e A_e dropout(x)

``g(x)`` comes from the layer's router (or the model's shared router); the sum is computed by
:func:`molora.kernels.routed_lora`. Wraps ``nn.Linear`` and transformers' GPT-2 ``Conv1D``
(whose weight is stored transposed, ``[d_in, d_out]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molora.context import current_scope, current_signals
from molora.errors import MoLoRAError, RoutingError
from molora.kernels import routed_linear, routed_lora, routed_lora_with_router
from molora.routers import Router, RoutingDecision

from .bank import ExpertBank

try:  # transformers' GPT-2 style linear; optional so the layer works without transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


def base_features(module: nn.Module) -> tuple[int, int, bool]:
    """``(d_in, d_out, transposed)`` of a supported base layer, or a MoLoRAError."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if Conv1D is not None and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    raise MoLoRAError(f"{type(module).__name__} is not supported: molora wraps nn.Linear and transformers' Conv1D")


class RoutedLoRALinear(nn.Module):
    """A frozen base linear layer with a bank of LoRA experts behind a router.

    Args:
        base_layer: ``nn.Linear`` or ``Conv1D``; its parameters are frozen.
        bank: the experts (:class:`~molora.bank.ExpertBank`).
        router: a per-layer router, or ``None`` when the model's shared router decides.
        dropout: LoRA dropout on the adapters' input (one mask shared by all experts).
        name: the module path, used in error messages.
        expert_ids: for each local expert its index in the model's global expert list (a layer
            may hold only some of the model's experts, e.g. composed adapters that target
            different modules); ``None`` means the identity.
        num_global_experts: size of the global expert list.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        bank: ExpertBank,
        router: Router | None = None,
        *,
        dropout: float = 0.0,
        name: str = "",
        expert_ids: Sequence[int] | None = None,
        num_global_experts: int | None = None,
    ) -> None:
        super().__init__()
        d_in, d_out, transposed = base_features(base_layer)
        if (bank.d_in, bank.d_out) != (d_in, d_out):
            raise MoLoRAError(
                f"module {name!r}: experts are [{bank.d_out} x {bank.d_in}] but the base layer is [{d_out} x {d_in}]"
            )
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.bank = bank
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name = name
        self.transposed = transposed
        self.merged_weights: Tensor | None = None
        self.disabled = False
        # The last forward's decision (in local expert indices, one row per token or example)
        # and the padding mask matching its rows: read by balancing losses and routing stats.
        self.last_decision: RoutingDecision | None = None
        self.last_mask: Tensor | None = None
        self._shared_router: list[Router] = []  # a plain list: the model owns the shared router
        ids = list(range(bank.num_experts)) if expert_ids is None else [int(i) for i in expert_ids]
        self.register_buffer("_global_to_local", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("_local_to_global", torch.empty(0, dtype=torch.long), persistent=False)
        self.set_expert_ids(ids, len(ids) if num_global_experts is None else int(num_global_experts))

    def set_expert_ids(self, expert_ids: Sequence[int], num_global_experts: int) -> None:
        """Set which global experts the local experts are (index maps both ways)."""
        ids = [int(i) for i in expert_ids]
        if len(ids) != self.bank.num_experts or len(set(ids)) != len(ids) or any(not 0 <= i < num_global_experts for i in ids):
            raise MoLoRAError(f"module {self.name!r}: bad expert_ids {ids} for {self.bank.num_experts} local / {num_global_experts} global experts")
        device = self._global_to_local.device
        g2l = torch.full((num_global_experts,), -1, dtype=torch.long, device=device)
        g2l[torch.tensor(ids, dtype=torch.long, device=device)] = torch.arange(len(ids), device=device)
        self._global_to_local = g2l
        self._local_to_global = torch.tensor(ids, dtype=torch.long, device=device)
        self.expert_ids, self.num_global_experts = ids, num_global_experts
        self._identity_map = ids == list(range(num_global_experts))

    # ------------------------------------------------------------------ routing
    def set_shared_router(self, router: Router | None) -> None:
        self._shared_router = [] if router is None else [router]

    def _decide(self, x: Tensor) -> RoutingDecision:
        scope = current_scope()
        signals = scope.signals if scope is not None else current_signals()
        if self.router is not None:
            return self.router(x, signals)
        if not self._shared_router:
            raise MoLoRAError(f"module {self.name!r} has no router")
        router = self._shared_router[0]
        decision = scope.cached(router, lambda: router(x, signals)) if scope is not None else router(x, signals)
        return decision if self._identity_map else self._to_local(decision)

    def _to_local(self, d: RoutingDecision) -> RoutingDecision:
        """Express a decision over the model's global experts in this layer's local experts."""
        if d.indices is None:
            return RoutingDecision(d.gates[:, self._local_to_global], None, d.logits, d.per_example)
        local = torch.where(d.indices >= 0, self._global_to_local[d.indices.clamp_min(0)], d.indices)
        return RoutingDecision(d.gates, local, d.logits, d.per_example)

    def _broadcast(self, d: RoutingDecision, x: Tensor, tokens: int) -> tuple[Tensor, Tensor | None]:
        """Per-example decisions ``[B, .]`` become per-token ``[tokens, .]`` (x's leading dim is the batch)."""
        gates, indices = d.gates, d.indices
        if not d.per_example:
            if gates.shape[0] != tokens:
                raise RoutingError(f"module {self.name!r}: router gave {gates.shape[0]} rows for {tokens} tokens")
            return gates, indices
        batch = x.shape[0] if x.dim() > 1 else 1
        if gates.shape[0] != batch:
            raise RoutingError(
                f"module {self.name!r}: routing signals are for {gates.shape[0]} examples but the input "
                f"{tuple(x.shape)} has batch size {batch}"
            )
        per = tokens // batch
        if per != 1:
            gates = gates.repeat_interleave(per, dim=0)
            indices = None if indices is None else indices.repeat_interleave(per, dim=0)
        return gates, indices

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled or self.merged_weights is not None or self.bank.num_experts == 0:
            return self.base_layer(x, *args, **kwargs)
        x2 = x.reshape(-1, self.bank.d_in)
        shape = (*x.shape[:-1], self.bank.d_out)
        A, B = self.bank.stacked()
        router_weight = self._fusable_router_weight(B.dtype)
        if router_weight is not None:
            # the router scores the same rows the experts read (no dropout): its logits share the
            # GEMMs over x with the LoRA shrink (molora.kernels.routed_lora_with_router), and
            # with the frozen base linear's too where that is a plain linear of the same dtype
            # (molora.kernels.routed_linear)
            router = self.router

            def route(logits: Tensor) -> tuple[Tensor, Tensor | None]:
                with router.given_logits(logits):
                    decision = self._decide(x)
                self._record(decision, x)
                gates, indices = self._broadcast(decision, x, x2.shape[0])
                return gates.to(B.dtype), indices

            top_k = getattr(router, "top_k", None) or getattr(router, "max_k", None)
            base = self._fusable_base(x, B.dtype, args, kwargs)
            if base is not None:
                y = routed_linear(x2, *base, A, B, router_weight, route, top_k, scaling=self.bank.scaling)
                return y.view(shape)
        # the base layer (nn.Linear or Conv1D: row-wise) runs on the flattened rows, so its
        # [T, d_out] output is no view and the delta is added into it in place: no [T, d_out]
        # temporary, and no copy of the whole gradient that an in-place add into a view of a
        # [batch, seq, d_out] output costs autograd
        result = self.base_layer(x2, *args, **kwargs)
        in_place = result.dtype == B.dtype and result.is_contiguous()
        out = result if in_place else None
        if router_weight is not None:
            delta = routed_lora_with_router(x2.to(B.dtype), A, B, router_weight, route, top_k,
                                            scaling=self.bank.scaling, out=out)
        else:
            decision = self._decide(x)
            self._record(decision, x)
            gates, indices = self._broadcast(decision, x, x2.shape[0])
            xd = self.dropout(x2).to(B.dtype)
            delta = routed_lora(xd, A, B, gates.to(B.dtype), indices, scaling=self.bank.scaling, out=out)
        if in_place:
            return result.view(shape)
        return (result + delta.to(result.dtype)).view(shape)

    def _fusable_base(self, x: Tensor, dtype: torch.dtype, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None] | None:
        """``(W [d_out, d_in], b)`` of the base layer when its GEMM can also compute the LoRA shrink
        and the router logits (:func:`molora.kernels.routed_linear`): a plain ``nn.Linear`` or
        ``Conv1D`` (not a subclass: quantised layers compute differently), frozen, called with
        no extra arguments, with weights and input of the experts' dtype, and no autocast (whose
        base linear would compute, and return, the autocast dtype)."""
        base = self.base_layer
        if args or kwargs or type(base) not in (nn.Linear, Conv1D) or x.dtype != dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        weight, bias = base.weight, base.bias
        if weight.dtype != dtype or weight.requires_grad or (bias is not None and (bias.requires_grad or bias.dtype != dtype)):
            return None
        return (weight.T if self.transposed else weight), bias

    def _fusable_router_weight(self, dtype: torch.dtype) -> Tensor | None:
        """The own router's projection when its logits can share the GEMMs over x with the LoRA
        shrink: a per-layer router scoring the token rows as they are (see
        ``SoftRouter.fusable_weight``), no LoRA dropout, weights of the experts' dtype."""
        fusable = getattr(self.router, "fusable_weight", None)
        if fusable is None or not isinstance(self.dropout, nn.Identity):
            return None
        weight = fusable()
        return weight if weight is not None and weight.dtype == dtype else None

    def _record(self, d: RoutingDecision, x: Tensor) -> None:
        """Keep this forward's decision and, for token-level rows of a ``[batch, seq, d]`` input,
        the padding mask ``[batch, seq]`` that matches them."""
        mask = current_signals().attention_mask
        if mask is not None and (d.per_example or tuple(x.shape[:-1]) != tuple(mask.shape)):
            mask = None
        self.last_decision, self.last_mask = d, mask

    # ------------------------------------------------------------------ merging
    def _weight_delta(self, weights: Tensor) -> Tensor:
        delta = self.bank.delta_weight(weights)
        return delta.T if self.transposed else delta

    def merge(self, weights: Sequence[float] | Tensor) -> None:
        """Fold the static mixture ``sum_e w_e s_e B_e A_e`` into the base weight (no added latency).

        ``weights`` has one entry per *local* expert. While merged the layer runs the base only.
        """
        if self.merged_weights is not None:
            raise MoLoRAError(f"module {self.name!r} is already merged; unmerge() first")
        w = torch.as_tensor(weights, dtype=torch.float32)
        delta = self._weight_delta(w)
        with torch.no_grad():
            W = self.base_layer.weight
            W.copy_((W.float() + delta.to(W.device)).to(W.dtype))
        self.merged_weights = w

    def unmerge(self) -> None:
        """Subtract the merged mixture again (exact up to floating-point rounding of ``W``)."""
        if self.merged_weights is None:
            return
        delta = self._weight_delta(self.merged_weights)
        with torch.no_grad():
            W = self.base_layer.weight
            W.copy_((W.float() - delta.to(W.device)).to(W.dtype))
        self.merged_weights = None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, experts={self.bank.num_experts}, shared_router={bool(self._shared_router)}"


def layer_spec(layer: RoutedLoRALinear) -> dict:
    """JSON description of a routed layer's adapters (not of its base layer)."""
    router = None if layer.router is None else {"name": layer.router.name, "config": layer.router.get_config()}
    dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
    return {"bank": layer.bank.spec(), "expert_ids": layer.expert_ids, "dropout": dropout, "router": router}


def layer_from_spec(base_layer: nn.Module, spec: dict, *, name: str, num_global_experts: int, dtype: torch.dtype) -> RoutedLoRALinear:
    """Rebuild an (untrained) routed layer around ``base_layer`` from :func:`layer_spec`'s output."""
    from molora.routers import build_router

    d_in, d_out, _ = base_features(base_layer)
    b = spec["bank"]
    if (b["d_in"], b["d_out"]) != (d_in, d_out):
        raise MoLoRAError(
            f"module {name!r}: the checkpoint's experts are [{b['d_out']} x {b['d_in']}] but the base layer is [{d_out} x {d_in}]"
        )
    device = base_layer.weight.device
    bank = ExpertBank.from_spec(b, dtype=dtype, device=device)
    router = None
    if spec["router"] is not None:
        router = build_router(spec["router"]["name"], num_experts=bank.num_experts, d_in=d_in, **spec["router"]["config"])
        router = router.to(device=device, dtype=dtype)
    return RoutedLoRALinear(
        base_layer, bank, router, dropout=spec["dropout"], name=name,
        expert_ids=spec["expert_ids"], num_global_experts=num_global_experts,
    )
