"""The routed LoRA layer: a frozen base linear plus a routed mixture of LoRA experts.

    y = W x (+ b) + sum_e g_e(x) * s_e * B_e A_e dropout(x)

The forward is three steps (:mod:`molora.kernels.routed_linear`): the base output, the LoRA
shrink and the router logits in one GEMM over ``x`` -> the router decides (a pure function of
the logits, the input and the call's routing signals) -> the expand adds the routed delta into
the base output. Expert kinds that also rescale the base output per channel (DoRA's magnitude,
:mod:`molora.kinds.dora`) add ``bank.output_scale(g) * W x`` as one more step. ``g(x)`` comes
from the layer's router or the model's shared router. Wraps ``nn.Linear`` and transformers'
GPT-2 ``Conv1D`` (whose weight is stored transposed, ``[d_in, d_out]``). Nothing of a call is kept
on the layer: what it decided goes to the call's forward scope (:mod:`molora.context`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molora import kernels
from molora.context import ForwardScope, RoutingSignals, current_scope, current_signals
from molora.errors import MoLoRAError, RoutingError
from molora.routers import Router, RoutingDecision

from .bank import BaseExpertBank

try:  # transformers' GPT-2 style linear; optional so the layer works without transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


def base_features(module: nn.Module) -> tuple[int, int, bool]:
    """``(d_in, d_out, transposed)`` of a supported base layer as a map of its LoRA factors
    ``A [r, d_in]``, ``B [d_out, r]`` (``transposed``: the weight is stored ``[d_in, d_out]``), or a
    MoLoRAError. An ``nn.Embedding`` maps one-hot ids (``d_in = num_embeddings``, weight ``[V, d]``);
    an ``nn.Conv2d`` its flattened patches (``d_in = c_in k_h k_w / groups``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if Conv1D is not None and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim, True
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw, module.out_channels, False
    raise MoLoRAError(f"{type(module).__name__} is not supported: molora wraps nn.Linear, transformers' Conv1D, "
                      "nn.Embedding and nn.Conv2d")


def routed_layer_class(base_layer: nn.Module) -> type[RoutedLoRALinear]:
    """The routed layer class for a base layer (PEFT's ``_create_new_module`` dispatch, in small):
    :class:`~molora.routed_embedding.RoutedEmbedding` for ``nn.Embedding``,
    :class:`~molora.routed_conv.RoutedConv2d` for ``nn.Conv2d``, else :class:`RoutedLoRALinear`."""
    if isinstance(base_layer, nn.Embedding):
        from molora.routed_embedding import RoutedEmbedding

        return RoutedEmbedding
    if isinstance(base_layer, nn.Conv2d):
        from molora.routed_conv import RoutedConv2d

        return RoutedConv2d
    return RoutedLoRALinear


def _accelerate_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module``: its ``_hf_hook`` and, for a ``SequentialHook``, the ones inside."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else [hook, *getattr(hook, "hooks", ())]


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device an accelerate hook on ``module`` names (``AlignDevicesHook``), or ``None``."""
    for h in _accelerate_hooks(module):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def layer_device(root: nn.Module, path: str) -> torch.device:
    """Where the base layer at ``path`` of ``root`` computes, so its experts live there: the device
    of its weight; for a weight on the meta device (offloaded by accelerate's ``device_map``: the
    weight is brought in for each forward), the execution device of the nearest accelerate hook on
    the layer or an ancestor. A meta weight with no such hook is a model whose weights were never
    loaded: refused, since experts built there would hold no values (the adapters' weights lost)."""
    module = root.get_submodule(path)
    weight = module.weight
    if weight.device.type != "meta":
        return weight.device
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        device = _hook_device(root.get_submodule(".".join(parts[:i])))
        if device is not None:
            return device
    raise MoLoRAError(
        f"module {path!r}: its weight is on the meta device and no accelerate hook says where it runs, so experts "
        "built there would hold no values (the adapters' weights would be lost). Load the base model's weights first "
        "(from_pretrained, or to_empty() and load_state_dict()), or load it with device_map=..."
    )


def resident_weight(module: nn.Module) -> Tensor:
    """``module.weight``, or for a weight offloaded by accelerate (on the meta device between
    forwards) its value from the layer's offload map (read from disk or host memory; the layer
    itself is not changed)."""
    weight = module.weight
    if not weight.is_meta:
        return weight
    for h in _accelerate_hooks(module):
        weights = getattr(h, "weights_map", None)
        if weights is not None:
            try:
                return weights["weight"]
            except KeyError:
                pass
    raise MoLoRAError(f"{type(module).__name__}: its weight is on the meta device and no accelerate offload map holds it")


class RoutedLoRALinear(nn.Module):
    """A frozen base linear layer with a bank of LoRA experts behind a router.

    Args:
        base_layer: ``nn.Linear`` or ``Conv1D``; frozen by the model that owns the layer
            (``freeze_base=True`` freezes it here).
        bank: the experts (:class:`~molora.bank.BaseExpertBank`: any expert kind).
        router: a per-layer router, or ``None`` when the model's shared router decides.
        dropout: LoRA dropout on the adapters' input (one mask shared by all experts).
        name: the module path, used in error messages and as the key of its routing record.
        expert_ids: for each local expert its index in the model's global expert list (a layer
            may hold only some of the model's experts, e.g. composed adapters that target
            different modules); ``None`` means the identity.
        num_global_experts: size of the global expert list.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        bank: BaseExpertBank,
        router: Router | None = None,
        *,
        dropout: float = 0.0,
        name: str = "",
        expert_ids: Sequence[int] | None = None,
        num_global_experts: int | None = None,
        freeze_base: bool = True,
    ) -> None:
        super().__init__()
        d_in, d_out, transposed = base_features(base_layer)
        if (bank.d_in, bank.d_out) != (d_in, d_out):
            raise MoLoRAError(
                f"module {name!r}: experts are [{bank.d_out} x {bank.d_in}] but the base layer is [{d_out} x {d_in}]"
            )
        self.base_layer = base_layer
        if freeze_base:
            self.base_layer.requires_grad_(False)
        self.bank = bank
        self.router = router
        if router is not None and router.reads_experts:
            router.sync_experts(bank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name = name
        self.transposed = transposed
        self.merged_weights: Tensor | None = None
        # the base weight as it was before merge(): unmerge() restores it bit-exactly
        self.register_buffer("_unmerged", None, persistent=False)
        self.disabled = False
        self._shared_router: list[Router] = []  # a plain list: the model owns the shared router
        ids = list(range(bank.num_experts)) if expert_ids is None else [int(i) for i in expert_ids]
        self.register_buffer("_global_to_local", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("_local_to_global", torch.empty(0, dtype=torch.long), persistent=False)
        self.set_expert_ids(ids, len(ids) if num_global_experts is None else int(num_global_experts))
        bank.attach_base(self.base_weight_rows)  # kinds that read W0 at every call (DoRA) read it here

    #: The expert kinds (:mod:`molora.kinds`) the layer can run; ``None``: every kind.
    expert_kinds: tuple[str, ...] | None = None

    @staticmethod
    def router_dim(base_layer: nn.Module) -> int:
        """Width of the rows the layer's router scores: the base layer's input features."""
        return base_features(base_layer)[0]

    @property
    def router_width(self) -> int:
        """:meth:`router_dim` of this layer's base: what a router built for it takes as ``d_in``."""
        return self.router_dim(self.base_layer)

    def peft_factors(self, A: Tensor, B: Tensor) -> dict[str, Tensor]:
        """``A [r, d_in]``, ``B [d_out, r]`` as PEFT saves this layer's LoRA, by key suffix."""
        return {"lora_A.weight": A, "lora_B.weight": B}

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

    # ------------------------------------------------------------------ the wrapped layer's face
    # Model code reads these on the modules it built (T5's feed-forward casts its input to
    # ``wo.weight.dtype``; GPT-2 splits ``c_attn`` by ``nf``): a routed layer answers with the
    # wrapped base layer's own attributes, in its own layout (as PEFT's LoRA layers do), so the
    # model runs unchanged. While merged, ``weight`` is the merged base weight.
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (``[d_out, d_in]``; ``Conv1D``: ``[d_in, d_out]``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias (``None`` when it has none)."""
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return base_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return base_features(self.base_layer)[1]

    @property
    def nf(self) -> int:
        """``Conv1D``'s output size (an AttributeError for an ``nn.Linear`` base, which has none)."""
        return self._conv1d_attr("nf")

    @property
    def nx(self) -> int:
        """``Conv1D``'s input size (an AttributeError for an ``nn.Linear`` base, which has none)."""
        return self._conv1d_attr("nx")

    def _conv1d_attr(self, name: str) -> int:
        if not self.transposed:
            raise AttributeError(f"module {self.name!r} wraps {type(self.base_layer).__name__}, which has no {name!r}")
        return getattr(self.base_layer, name)

    # ------------------------------------------------------------------ routing
    def set_shared_router(self, router: Router | None) -> None:
        """Called by the model that owns the shared router (:meth:`MoLoRAModel.set_router`)."""
        self._shared_router = [] if router is None else [router]

    def _decide(self, x: Tensor, signals: RoutingSignals, scope: ForwardScope | None,
                logits: Tensor | None = None) -> RoutingDecision:
        """The router's decision for this call (a shared router's once per forward scope; in a
        ``generate`` call a per-example decision once per generation, at the prefill)."""
        generation = scope.generation if scope is not None else None
        if self.router is not None:
            router = self.router
            def decide() -> RoutingDecision:
                return router(x, signals) if logits is None else router(x, signals, logits=logits)
            return decide() if generation is None else generation.kept(self, decide)
        if not self._shared_router:
            raise MoLoRAError(f"module {self.name!r} has no router")
        shared = self._shared_router[0]
        def decide_shared() -> RoutingDecision:
            return scope.cached(shared, lambda: shared(x, signals)) if scope is not None else shared(x, signals)
        decision = decide_shared() if generation is None else generation.kept(shared, decide_shared)
        return decision if self._identity_map else self._to_local(decision)

    def _to_local(self, d: RoutingDecision) -> RoutingDecision:
        """Express a decision over the model's global experts in this layer's local experts."""
        if d.indices is None:
            return RoutingDecision(d.gates[:, self._local_to_global], None, d.logits, d.per_example)
        local = torch.where(d.indices >= 0, self._global_to_local[d.indices.clamp_min(0)], d.indices)
        return RoutingDecision(d.gates, local, d.logits, d.per_example)

    def _broadcast(self, d: RoutingDecision, x: Tensor, tokens: int) -> tuple[Tensor, Tensor | None, int]:
        """The decision's gates and indices with the rows of x each of them covers: per token
        (``1``), or per example for per-example decisions (``[B, .]`` over x's ``[B, ...]``
        leading batch dim: each covers its example's ``tokens / B`` consecutive rows)."""
        gates, indices = d.gates, d.indices
        if not d.per_example:
            if gates.shape[0] != tokens:
                raise RoutingError(f"module {self.name!r}: router gave {gates.shape[0]} rows for {tokens} tokens")
            return gates, indices, 1
        batch = x.shape[0] if x.dim() > 1 else 1
        if gates.shape[0] != batch:
            raise RoutingError(
                f"module {self.name!r}: routing signals are for {gates.shape[0]} examples but the input "
                f"{tuple(x.shape)} has batch size {batch}"
            )
        return gates, indices, tokens // batch if batch else 1

    def _record(self, scope: ForwardScope | None, signals: RoutingSignals, d: RoutingDecision, x: Tensor) -> None:
        """Put this call's decision into its forward scope, with the padding mask ``[batch, seq]``
        matching its rows when they are the tokens of a ``[batch, seq, d]`` input."""
        if scope is None:
            return
        mask = signals.attention_mask
        if mask is not None and (d.per_example or tuple(x.shape[:-1]) != tuple(mask.shape)):
            mask = None
        scope.record(self.name, d, mask)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled or self.merged_weights is not None or self.bank.num_experts == 0:
            return self.base_layer(x, *args, **kwargs)
        scope = current_scope()
        signals = scope.signals if scope is not None else current_signals()
        generation = scope.generation if scope is not None else None
        A, B = self.bank.stacked() if generation is None else generation.experts(self.bank)
        x2 = x.reshape(-1, self.bank.d_in)
        xk = x2.to(B.dtype)
        xd = self.dropout(xk)
        base = self._fusable_base(x, B.dtype, args, kwargs)
        if self.router is not None and self.router.reads_experts:
            self.router.sync_experts(self.bank)
        router_weight = self._fusable_router_weight(B.dtype)
        # a router that scores its own input (or a shared one, deciding from the call's signals)
        # decides first, so that its k picks the form; a linear router's logits come from step 1
        decision = None if router_weight is not None else self._decide(x, signals, scope)
        k = _selected(decision) if decision is not None else _static_k(self.router)
        plan = kernels.plan(kernels.default_backend(xk), self.bank.num_experts, B.shape[-1], k)
        # 1. base output, LoRA shrink and router logits: one GEMM over x (the shrink reads the
        # experts' input, so it joins only while no dropout changes that)
        proj = kernels.project(xk, plan, A, *(base or (None, None)), router_weight=router_weight,
                               shrink=xd is xk)
        out = proj.out
        if base is None:
            result = self.base_layer(x2, *args, **kwargs)
            out = result if result.dtype == B.dtype and result.is_contiguous() else None
        # 2. the router decides
        if decision is None:
            decision = self._decide(x, signals, scope, proj.logits)
        self._record(scope, signals, decision, x)
        gates, indices, group_rows = self._broadcast(decision, x, x2.shape[0])
        # 3. the kind's rescaling of the base output (DoRA's magnitude), if it has one: taken
        # before step 4 adds into the base output's buffer
        rescaled = self._rescaled_base(gates, indices, group_rows, out if base is not None else result, xk, xd)
        # 4. the routed delta, added into the base output
        y = kernels.expand(xd, plan, proj.shrink, A, B, gates.to(B.dtype), indices, self.bank.scaling, out=out,
                           group_rows=group_rows)
        if out is None:
            y = result + y.to(result.dtype)
        if rescaled is not None:
            y = y + rescaled.to(y.dtype)
        return y.view(*x.shape[:-1], self.bank.d_out)

    def _rescaled_base(self, gates: Tensor, indices: Tensor | None, group_rows: int, base_out: Tensor,
                       xk: Tensor, xd: Tensor) -> Tensor | None:
        """``scale * (W0 x')`` with the bank's :meth:`~molora.bank.BaseExpertBank.output_scale`
        (``None`` for kinds without one). ``W0 x'`` is the base output minus its bias, or, while
        dropout changes the experts' input (training), ``W0`` applied to that input: as PEFT's DoRA."""
        scale = self.bank.output_scale(gates, indices)
        if scale is None:
            return None
        if xd is not xk:
            w0x = torch.nn.functional.linear(xd, self.base_weight_rows().to(xd.dtype))
        else:  # a new tensor, not a view: step 4 writes into base_out in place
            bias = self.base_layer.bias
            w0x = base_out - bias if bias is not None else base_out.clone()
        d_out = self.bank.d_out
        return (scale.to(w0x.dtype).unsqueeze(1) * w0x.view(-1, group_rows, d_out)).view(-1, d_out)

    def _fusable_base(self, x: Tensor, dtype: torch.dtype, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None] | None:
        """``(W [d_out, d_in], b)`` of the base layer when its GEMM can also compute the LoRA shrink
        and the router logits (:func:`molora.kernels.project`): a plain ``nn.Linear`` or
        ``Conv1D`` (not a subclass: quantised layers compute differently), frozen, called with
        no extra arguments, with weights and input of the experts' dtype, in memory (not offloaded
        to the meta device), and no autocast (whose base linear would compute, and return, the
        autocast dtype)."""
        base = self.base_layer
        if args or kwargs or type(base) not in (nn.Linear, Conv1D) or x.dtype != dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        weight, bias = base.weight, base.bias
        if weight.dtype != dtype or weight.requires_grad or (bias is not None and (bias.requires_grad or bias.dtype != dtype)):
            return None
        if weight.is_meta:  # offloaded (accelerate): calling the layer runs its hook, which brings the weight in
            return None
        return (weight.T if self.transposed else weight), bias

    def _fusable_router_weight(self, dtype: torch.dtype) -> Tensor | None:
        """The own router's projection when its logits can share the GEMM over x with the base
        output and the LoRA shrink: a per-layer router scoring the token rows as they are (see
        ``SoftRouter.fusable_weight``; it reads x, not the experts' dropped-out input), weights
        of the experts' dtype."""
        fusable = getattr(self.router, "fusable_weight", None)
        if fusable is None:
            return None
        weight = fusable()
        return weight if weight is not None and weight.dtype == dtype else None

    # ------------------------------------------------------------------ merging
    def unmerged_weight(self) -> Tensor:
        """The base weight without any merged mixture (the stored original while merged; an
        offloaded weight read from its offload map, :func:`resident_weight`)."""
        return resident_weight(self.base_layer) if self._unmerged is None else self._unmerged

    def base_weight_rows(self) -> Tensor:
        """The unmerged base weight as ``[d_out, d_in]`` (a view; ``Conv1D`` stores it transposed):
        what expert kinds built on ``W0`` read (:meth:`~molora.bank.BaseExpertBank.attach_base`)."""
        W = self.unmerged_weight()
        return W.T if self.transposed else W

    def merge(self, weights: Sequence[float] | Tensor) -> None:
        """Fold the static mixture ``sum_e w_e s_e B_e A_e`` into the base weight (no added latency).

        ``weights`` has one finite entry per *local* expert. The sum is formed in float32 and
        checked before the weight is written (as PEFT's ``merge(safe_merge=True)``); the original
        weight is kept, so :meth:`unmerge` restores it bit-exactly in every dtype. While merged
        the layer runs the base only.
        """
        if self.merged_weights is not None:
            raise MoLoRAError(f"module {self.name!r} is already merged; unmerge() first")
        merged, w = self.merged_weight(weights)
        self.commit_merge(merged, w)

    def merged_weight(self, weights: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
        """``(W + delta, w)`` in the base weight's dtype, checked finite; changes nothing."""
        w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
        if w.shape != (self.bank.num_experts,):
            raise MoLoRAError(f"module {self.name!r}: merge needs {self.bank.num_experts} weights (one per local expert); "
                              f"got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise MoLoRAError(f"module {self.name!r}: merge weights must be finite; got {w.tolist()}")
        W = self.base_layer.weight
        if W.is_meta:
            raise MoLoRAError(f"module {self.name!r}: the base weight is offloaded (on the meta device; accelerate brings "
                              "it in per forward), so there is no weight to merge into: load the base without offloading "
                              "to merge, or export_peft() the mix")
        if not W.is_floating_point():
            raise MoLoRAError(f"module {self.name!r}: the base weight is {W.dtype} ({type(self.base_layer).__name__}: a "
                              "quantised layer); folding a mixture into it would need dequantising and requantising "
                              "(lossy): export_peft() the mix, or merge on the base loaded in floating point")
        delta = self.bank.delta_weight(w)
        delta = delta.T if self.transposed else delta
        merged = (W.detach().float() + delta.to(W.device).reshape(W.shape)).to(W.dtype)  # a conv's kernel: [d_out, c_in, kh, kw]
        if not torch.isfinite(merged).all():
            raise MoLoRAError(f"module {self.name!r}: merging gives NaN or inf in the base weight; nothing was merged")
        return merged, w

    def commit_merge(self, merged: Tensor, weights: Tensor) -> None:
        """Write a weight from :meth:`merged_weight`, keeping the original (cannot fail halfway)."""
        W = self.base_layer.weight
        self._unmerged = W.detach().clone()
        with torch.no_grad():
            W.copy_(merged)
        self.merged_weights = weights

    def unmerge(self) -> None:
        """Restore the base weight as it was before :meth:`merge` (bit-exact)."""
        if self.merged_weights is None:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._unmerged)
        self._unmerged = None
        self.merged_weights = None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, experts={self.bank.num_experts}, shared_router={bool(self._shared_router)}"


def _selected(d: RoutingDecision) -> int | None:
    """Experts per row of a decision (``None``: dense gates over every expert)."""
    return None if d.indices is None else int(d.indices.shape[1])


def _static_k(router: Router | None) -> int | None:
    """The most experts a per-layer router selects per row, known before it runs (``None``: dense)."""
    return getattr(router, "top_k", None) or getattr(router, "max_k", None)


def layer_spec(layer: RoutedLoRALinear) -> dict:
    """JSON description of a routed layer's adapters (not of its base layer)."""
    router = None if layer.router is None else {"name": layer.router.name, "config": layer.router.get_config()}
    dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
    return {"bank": layer.bank.spec(), "expert_ids": layer.expert_ids, "dropout": dropout, "router": router}


def build_routed_layer(
    base_layer: nn.Module,
    *,
    name: str,
    bank: BaseExpertBank | dict,
    router: Router | dict | None,
    expert_ids: Sequence[int],
    num_global_experts: int,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
    from_base: bool = True,
    device: torch.device | None = None,
    copies: Mapping[int, nn.Module] | None = None,
) -> RoutedLoRALinear:
    """The one place routed layers are built (``get_molora_model``, ``compose``, checkpoints), of the
    class :func:`routed_layer_class` picks for ``base_layer``.

    ``bank`` is an expert bank or its :meth:`~molora.bank.BaseExpertBank.spec` (fresh experts of that
    layout); ``router`` a per-layer router, its ``{"name", "config"}`` spec, or ``None`` (the
    model's shared router decides). Checks shapes against ``base_layer`` and changes nothing
    outside the new layer: the base layer is frozen when the model commits the layers.
    ``from_base``: expert kinds built from the base weight (QR-LoRA's ``Q``) take it from
    ``base_layer``; ``False`` (a checkpoint, whose tensors hold them) skips that work.
    ``device``: where the experts live (:func:`layer_device`; default: the base weight's device).
    ``copies``: ``{global expert: module}``, whole per-expert copies of ``base_layer`` (PEFT's
    ``modules_to_save``): a :class:`~molora.routed_copies.RoutedCopies` instead (``bank`` and
    ``router`` are ``None``; the model's shared router decides).
    """
    from molora.routers import build_router

    if copies is not None:
        from molora.routed_copies import build_routed_copies

        if bank is not None or router is not None:
            raise MoLoRAError(f"module {name!r}: per-expert copies take no bank or router")
        return build_routed_copies(base_layer, name=name, copies=copies, num_global_experts=num_global_experts)

    d_in, d_out, _ = base_features(base_layer)
    cls = routed_layer_class(base_layer)
    kind = bank.get("kind", "lora") if isinstance(bank, dict) else bank.kind
    if cls.expert_kinds is not None and kind not in cls.expert_kinds:
        raise MoLoRAError(f"module {name!r}: a routed {type(base_layer).__name__} holds experts of kind "
                          f"{' or '.join(map(repr, cls.expert_kinds))}; got {kind!r}")
    device = base_layer.weight.device if device is None else device
    if isinstance(bank, dict):
        if (bank["d_in"], bank["d_out"]) != (d_in, d_out):
            raise MoLoRAError(f"module {name!r}: the experts are [{bank['d_out']} x {bank['d_in']}] "
                              f"but the base layer is [{d_out} x {d_in}]")
        base_weight = None
        if from_base:
            base_weight = base_layer.weight.T if base_features(base_layer)[2] else base_layer.weight
        try:
            bank = BaseExpertBank.from_spec(bank, dtype=dtype, device=device, base_weight=base_weight)
        except ValueError as exc:  # the bank's own checks (rank, shapes), named for the module
            raise MoLoRAError(f"module {name!r}: {exc}") from None
    if isinstance(router, dict):
        try:
            router = build_router(router["name"], num_experts=bank.num_experts, d_in=cls.router_dim(base_layer),
                                  **router["config"])
        except MoLoRAError:
            raise
        except ValueError as exc:  # e.g. a top_k above the experts this layer holds
            raise MoLoRAError(f"module {name!r}: {exc}") from None
        router = router.to(device=device, dtype=dtype)
    return cls(base_layer, bank, router, dropout=dropout, name=name, expert_ids=expert_ids,
               num_global_experts=num_global_experts, freeze_base=False)


def layer_from_spec(base_layer: nn.Module, spec: dict, *, name: str, num_global_experts: int, dtype: torch.dtype,
                    device: torch.device | None = None) -> RoutedLoRALinear:
    """Rebuild an (untrained) routed layer around ``base_layer`` from :func:`layer_spec`'s output."""
    return build_routed_layer(base_layer, name=name, bank=spec["bank"], router=spec["router"], expert_ids=spec["expert_ids"],
                              num_global_experts=num_global_experts, dropout=spec["dropout"], dtype=dtype,
                              from_base=False, device=device)
