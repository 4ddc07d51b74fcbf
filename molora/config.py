"""MoLoRAConfig: what to wrap, how many experts, and how to route them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from molora.bank import INITS
from molora.blockwise import block_value, check_block_alphas, check_block_ranks
from molora.kinds import EXPERT_KINDS
from molora.checks import finite_number, finite_tensor, positive_int, unique_names
from molora.errors import MoLoRAError

LAYER_FIELDS = ("num_experts", "top_k", "rank", "alpha")


def pattern_matches(pattern: str, module_name: str) -> bool:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: ``pattern`` is a regular expression that
    must match the end of the module path, ``(.*\\.)?(pattern)$``."""
    return re.match(rf"(.*\.)?({pattern})$", module_name) is not None


@dataclasses.dataclass
class MoLoRAConfig:
    """Configuration of a mixture of LoRA experts.

    Args:
        target_modules: module names to wrap. A list matches a module whose path equals an entry
            or ends with ``"." + entry`` (``["query", "value"]``); a string is a regular
            expression the whole path must match — PEFT's semantics.
        num_experts: experts per wrapped layer.
        rank, alpha: LoRA rank ``r`` and ``alpha``; scaling ``alpha / r`` (or ``alpha / sqrt(r)``
            with ``use_rslora``).
        dropout: LoRA dropout on the adapters' input.
        shared_a: HydraLoRA layout (one shared ``A``, one ``B`` per expert; with ``"moslora"``
            the mixer is shared too).
        expert_kind: what each expert is (:mod:`molora.kinds`): ``"lora"`` (``B A``, default),
            ``"qr_lora"`` (QR-LoRA, Li et al. 2025: ``Q triu(dR)``, ``Q`` frozen from the base
            weight and shared by the layer's experts) or ``"moslora"`` (MoSLoRA, Wu et al. 2024:
            ``B M A`` with a trainable mixer), ``"ard_lora"`` (ARD-LoRA, Shinwari & Usama 2025:
            ``B diag(alpha) A`` with learnable non-negative per-rank gates, see
            :mod:`molora.kinds.ard_lora`), ``"dora"`` (DoRA, Liu et al. 2024: a trained
            magnitude over the column norm of ``W0 + s B A``), ``"ortho_lora"`` (T-LoRA's
            Ortho-LoRA, Soboleva et al. 2025: ``P diag(lambda) Q`` minus its frozen start; with
            ``router="tlora"`` and rank-1 experts it is T-LoRA, see :mod:`molora.kinds.ortho_lora`)
            or ``"riemann_lora"`` (RiemannLoRA, Bogachev et al. 2025: ``U S V^T`` on the fixed-rank
            manifold, trained by :class:`molora.optim.RiemannianSGD`). A list gives each expert its
            kind (``["lora", "dora", "qr_lora", "moslora"]``): each layer holds them in one mixed bank
            behind one router (:mod:`molora.kinds.mixed`).
        init: ``"kaiming"`` (default), ``"gaussian"`` or ``"orthogonal"`` rows of ``A``; ``B`` = 0.
        router: router name (see :data:`molora.routers.ROUTERS`).
        top_k: experts per token for top-k routers; also the ``k`` of the balancing loss.
        router_kwargs: extra constructor arguments of the router.
        aux_loss_coef: weight of the Switch/GShard load-balancing loss in :meth:`aux_loss`.
        z_loss_coef: weight of the router z-loss in :meth:`aux_loss`.
        expert_names: names of the experts (default ``expert_0``, ...).
        adapter_dtype: dtype of the experts and routers (``"float32"`` by default, also for
            half-precision base models, as PEFT's ``autocast_adapter_dtype`` does).
        entropy_loss_coef: weight of the mean gate entropy in :meth:`aux_loss` (sharpens routing).
        localized_loss_coef: weight of LoRAMoE's localized balancing constraint in :meth:`aux_loss`
            (needs ``expert_types`` and the routing signal ``task_ids`` as example types).
        localized_alpha: LoRAMoE's ``alpha`` in ``[0, 1]``.
        expert_types: the type (group) of each expert for the localized balancing constraint.
        layer_overrides: per-layer settings, MoLA style (Gao et al., 2024: e.g. more experts in
            higher layers). Maps a pattern to a dict of ``num_experts``, ``top_k``, ``rank``,
            ``alpha``; a module whose path matches ``(.*\\.)?<pattern>$`` (PEFT's
            ``rank_pattern`` rule) takes those values, the first matching pattern winning. A
            layer with ``n < num_experts`` experts holds the model's first ``n`` experts.
        modules_to_save: whole modules of the base model that train with the experts and are
            saved with the checkpoint, e.g. a new classification head (``["classifier"]``):
            PEFT's ``modules_to_save`` names and matching rules (a path equal to an entry or
            ending with ``"." + entry``). They are trained in place (PEFT trains a copy), so
            :meth:`~molora.MoLoRAModel.disable_adapters` and ``unload`` keep the trained module.
        block_ranks: Block-wise LoRA (Li et al. 2024, :mod:`molora.blockwise`): each expert's rank
            per block. Maps a block pattern (a regular expression over whole dotted components of
            the module path: ``"down_blocks.0"``, ``"mid_block"``, ``r"up_blocks\\.[01]"``,
            ``"attn2"``) to one rank for all experts or a list of ``num_experts`` ranks; rank 0 =
            that expert is absent there (a layer holds its live experts only; a module with no
            live expert is not wrapped). The first matching pattern wins; modules no pattern
            covers take ``rank`` for every expert. Every pattern must cover some target module.
        block_alphas: the experts' alphas per block, as :attr:`block_ranks` (scaling
            ``alpha_e / r_e`` per block); modules no pattern covers take ``alpha``.
    """

    target_modules: list[str] | str
    num_experts: int = 4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    shared_a: bool = False
    expert_kind: str | list[str] = "lora"
    init: str = "kaiming"
    router: str = "soft"
    top_k: int | None = None
    router_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_names: list[str] | None = None
    adapter_dtype: str = "float32"
    entropy_loss_coef: float = 0.0
    localized_loss_coef: float = 0.0
    localized_alpha: float = 0.1
    expert_types: list[int] | None = None
    layer_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None
    block_ranks: dict[str, int | list[int]] = dataclasses.field(default_factory=dict)
    block_alphas: dict[str, float | list[float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        where = "MoLoRAConfig"
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise MoLoRAError(f"{where}: target_modules must be non-empty names; got {self.target_modules!r}")
        elif isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise MoLoRAError(f"{where}: target_modules regex {self.target_modules!r} is invalid: {exc}") from None
        else:
            raise MoLoRAError(f"{where}: target_modules must be a list of names or a regex; got {self.target_modules!r}")
        self.num_experts = positive_int(self.num_experts, where, "num_experts")
        self.rank = positive_int(self.rank, where, "rank")
        self.alpha = finite_number(self.alpha, where, "alpha")
        self.dropout = finite_number(self.dropout, where, "dropout", low=0.0, high=1.0, high_open=True)
        for name in ("use_rslora", "shared_a"):
            if not isinstance(getattr(self, name), bool):
                raise MoLoRAError(f"{where}: {name} must be true or false; got {getattr(self, name)!r}")
        if isinstance(self.expert_kind, (list, tuple)):
            kinds = list(self.expert_kind)
            if len(kinds) != self.num_experts or not all(isinstance(k, str) and k in EXPERT_KINDS for k in kinds):
                raise MoLoRAError(f"{where}: expert_kind as a list gives each of the num_experts={self.num_experts} "
                                  f"experts one of {list(EXPERT_KINDS)}; got {self.expert_kind!r}")
            # one kind for every expert is that kind's bank; several make mixed banks
            self.expert_kind = kinds[0] if len(set(kinds)) == 1 else kinds
            if isinstance(self.expert_kind, list) and self.shared_a:
                raise MoLoRAError(f"{where}: experts of mixed kinds {sorted(set(kinds))} own their A; shared_a=True is "
                                  "not allowed with them")
        elif not isinstance(self.expert_kind, str) or self.expert_kind not in EXPERT_KINDS:
            raise MoLoRAError(f"{where}: expert_kind must be one of {list(EXPERT_KINDS)} or a list of one per expert; "
                              f"got {self.expert_kind!r}")
        if self.expert_kind == "qr_lora" and self.shared_a:
            raise MoLoRAError(f"{where}: expert_kind 'qr_lora' already shares its B side (Q) across experts; "
                              "shared_a=True is not allowed with it")
        if self.expert_kind == "ard_lora" and self.shared_a:
            raise MoLoRAError(f"{where}: expert_kind 'ard_lora' gates and prunes each expert's own A rows; "
                              "shared_a=True is not allowed with it")
        if self.expert_kind == "dora" and self.shared_a:
            raise MoLoRAError(f"{where}: expert_kind 'dora' has one A per expert; shared_a=True is not allowed with it")
        if self.expert_kind == "ortho_lora" and self.shared_a:
            raise MoLoRAError(f"{where}: expert_kind 'ortho_lora' has its own P, lambda, Q per expert; "
                              "shared_a=True is not allowed with it")
        if self.expert_kind == "riemann_lora" and self.shared_a:
            raise MoLoRAError(f"{where}: expert_kind 'riemann_lora' makes every expert its own point U S V^T; "
                              "shared_a=True is not allowed with it")
        if self.init not in INITS:
            raise MoLoRAError(f"{where}: init must be one of {INITS}; got {self.init!r}")
        if not isinstance(self.router, str) or not self.router:
            raise MoLoRAError(f"{where}: router must be a router name; got {self.router!r}")
        if self.top_k is not None:
            self.top_k = positive_int(self.top_k, where, "top_k")
            if self.top_k > self.num_experts:
                raise MoLoRAError(f"{where}: top_k must be in [1, num_experts={self.num_experts}]; got {self.top_k!r}")
        self._check_router_kwargs()
        if self.expert_names is not None:
            self.expert_names = unique_names(self.expert_names, where, what="expert_names")
            if len(self.expert_names) != self.num_experts:
                raise MoLoRAError(f"{where}: expert_names must be {self.num_experts} distinct names (one per expert); "
                                  f"got {len(self.expert_names)}: {self.expert_names!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "entropy_loss_coef", "localized_loss_coef"):
            setattr(self, name, finite_number(getattr(self, name), where, name, low=0.0))
        self.localized_alpha = finite_number(self.localized_alpha, where, "localized_alpha", low=0.0, high=1.0)
        if self.expert_types is not None:
            if isinstance(self.expert_types, (str, bytes)) or not isinstance(self.expert_types, (list, tuple)):
                raise MoLoRAError(f"{where}: expert_types must be a list of ints; got {self.expert_types!r}")
            self.expert_types = [positive_int(t, where, f"expert_types[{i}]", low=0) for i, t in enumerate(self.expert_types)]
            if len(self.expert_types) != self.num_experts:
                raise MoLoRAError(f"{where}: expert_types must give a type for each of the {self.num_experts} experts; got {self.expert_types!r}")
        if self.localized_loss_coef > 0 and self.expert_types is None:
            raise MoLoRAError(f"{where}: localized_loss_coef > 0 needs expert_types (the type of each expert)")
        self._check_layer_overrides()
        self._check_blocks()
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not isinstance(self.modules_to_save, (list, tuple)):
                raise MoLoRAError(f"{where}: modules_to_save must be a list of module names; got {self.modules_to_save!r}")
            self.modules_to_save = unique_names(self.modules_to_save, where, what="modules_to_save") or None
        if not isinstance(self.adapter_dtype, str):
            raise MoLoRAError(f"{where}: adapter_dtype must be a dtype name such as 'float32'; got {self.adapter_dtype!r}")
        self.torch_dtype  # validates adapter_dtype

    def _check_router_kwargs(self) -> None:
        """``router_kwargs``: a dict keyed by argument name; every number in it (also inside
        lists and dicts, e.g. a static router's ``weights``) finite. The router checks its own
        ranges and types when it is built."""
        if not isinstance(self.router_kwargs, dict):
            raise MoLoRAError(f"MoLoRAConfig: router_kwargs must be a dict of router arguments; got {self.router_kwargs!r}")

        def visit(value: Any, field: str) -> None:
            if isinstance(value, bool) or value is None or isinstance(value, str):
                return
            if isinstance(value, (int, float)):
                finite_number(value, "MoLoRAConfig", field)
            elif isinstance(value, dict):
                for k, v in value.items():
                    visit(v, f"{field}[{k!r}]")
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    visit(v, f"{field}[{i}]")
            elif isinstance(value, torch.Tensor):
                finite_tensor(value, "MoLoRAConfig", field)

        for key, value in self.router_kwargs.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise MoLoRAError(f"MoLoRAConfig: router_kwargs keys must be argument names; got {key!r}")
            visit(value, f"router_kwargs[{key!r}]")

    def _check_layer_overrides(self) -> None:
        if not isinstance(self.layer_overrides, dict) or not all(isinstance(v, dict) for v in self.layer_overrides.values()):
            raise MoLoRAError(f"MoLoRAConfig: layer_overrides must map patterns to dicts; got {self.layer_overrides!r}")
        bad = [k for k in self.layer_overrides if not isinstance(k, str) or not k]
        if bad:
            raise MoLoRAError(f"MoLoRAConfig: layer_overrides patterns must be non-empty strings; got {bad!r}")
        self.layer_overrides = {k: dict(v) for k, v in self.layer_overrides.items()}
        for pattern, values in self.layer_overrides.items():
            where = f"MoLoRAConfig: layer_overrides[{pattern!r}]"
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MoLoRAError(f"{where}: invalid regex: {exc}") from None
            unknown = sorted(map(str, set(values) - set(LAYER_FIELDS)))
            if unknown:
                raise MoLoRAError(f"{where}: unknown settings {unknown}; allowed: {list(LAYER_FIELDS)}")
            for key in ("num_experts", "rank"):
                if key in values:
                    values[key] = positive_int(values[key], where, key)
            n = values.get("num_experts", self.num_experts)
            if n > self.num_experts:
                raise MoLoRAError(f"{where}: num_experts must be an int in [1, num_experts={self.num_experts}]; got {n!r}")
            k = values.get("top_k")
            if k is not None:
                k = values["top_k"] = positive_int(k, where, "top_k")
                if k > n:
                    raise MoLoRAError(f"{where}: top_k must be in [1, {n}] (the layer's experts); got {k!r}")
            if "alpha" in values:
                values["alpha"] = finite_number(values["alpha"], where, "alpha")
            if self.shared_a and "rank" in values:
                raise MoLoRAError(f"{where}: a shared-A (HydraLoRA) model has one rank; drop 'rank'")

    def _check_blocks(self) -> None:
        """Block-wise LoRA settings: lists of ``num_experts`` per pattern (an int is given to
        every expert), ranks >= 0, finite alphas; per-layer expert counts and ranks come from
        one place, so ``layer_overrides`` may not also set ``num_experts`` or ``rank``."""
        fixed = self.shared_a or self.expert_kind == "qr_lora"
        self.block_ranks = check_block_ranks(self.block_ranks, self.num_experts, fixed)
        self.block_alphas = check_block_alphas(self.block_alphas, self.num_experts)
        if self.block_ranks:
            clash = {p: sorted(set(v) & {"num_experts", "rank"}) for p, v in self.layer_overrides.items()
                     if set(v) & {"num_experts", "rank"}}
            if clash:
                raise MoLoRAError(f"MoLoRAConfig: layer_overrides {clash} set experts or ranks per layer and block_ranks "
                                  "is set: give per-expert ranks in block_ranks only (rank 0 = no expert there)")

    def layer_settings(self, module_name: str) -> dict[str, Any]:
        """The layer at ``module_name``: ``num_experts``, ``top_k``, ``rank`` and ``alpha`` (the
        config's values, updated by the first matching :attr:`layer_overrides` pattern), and its
        live experts, ``expert_ids`` (global indices), ``ranks`` and ``alphas`` (one each):
        the first ``num_experts`` experts with ``rank`` and ``alpha``, or, where a
        :attr:`block_ranks` / :attr:`block_alphas` pattern covers the module, the experts whose
        block rank is > 0 with their block ranks and alphas (``num_experts`` is then their count,
        ``top_k`` at most that; no live expert: an empty ``expert_ids``, the module stays base)."""
        settings = {"num_experts": self.num_experts, "top_k": self.top_k, "rank": self.rank, "alpha": self.alpha}
        for pattern, values in self.layer_overrides.items():
            if pattern_matches(pattern, module_name):
                settings.update(values)
                if "num_experts" in values and "top_k" not in values and settings["top_k"] is not None:
                    settings["top_k"] = min(settings["top_k"], values["num_experts"])
                break
        n = settings["num_experts"]
        ranks = block_value(self.block_ranks, module_name) or [settings["rank"]] * n
        alphas = block_value(self.block_alphas, module_name) or [settings["alpha"]] * n
        live = [e for e in range(n) if ranks[e] > 0]
        settings.update(expert_ids=live, ranks=[ranks[e] for e in live], alphas=[float(alphas[e]) for e in live],
                        num_experts=len(live))
        if settings["top_k"] is not None and live:
            settings["top_k"] = min(settings["top_k"], len(live))
        return settings

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.adapter_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MoLoRAError(f"MoLoRAConfig: adapter_dtype {self.adapter_dtype!r} is not a floating torch dtype")
        return dtype

    def matches(self, module_name: str) -> bool:
        """Whether ``module_name`` is a target (PEFT's matching rules)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    @property
    def has_aux_loss(self) -> bool:
        """Whether any balancing-loss coefficient is set (:meth:`~molora.MoLoRAModel.aux_loss` is not 0)."""
        return any((self.aux_loss_coef, self.z_loss_coef, self.entropy_loss_coef, self.localized_loss_coef))

    def saves_module(self, module_name: str) -> bool:
        """Whether ``module_name`` is one of :attr:`modules_to_save` (PEFT's matching rules)."""
        return any(module_name == t or module_name.endswith("." + t) for t in self.modules_to_save or ())

    def kinds(self) -> list[str]:
        """The kind of each expert (:attr:`expert_kind` given once, or one per expert)."""
        kind = self.expert_kind
        return list(kind) if isinstance(kind, list) else [kind] * self.num_experts

    def names(self) -> list[str]:
        return list(self.expert_names) if self.expert_names else [f"expert_{i}" for i in range(self.num_experts)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLoRAConfig:
        """The config saved by :meth:`to_dict`; MoLoRAError naming the field for an unknown,
        missing or wrongly typed field (never a TypeError or KeyError)."""
        if not isinstance(data, dict):
            raise MoLoRAError(f"MoLoRAConfig: the config must be a JSON object of fields; got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise MoLoRAError(f"MoLoRAConfig: unknown fields {unknown}; known fields: {sorted(known)}")
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise MoLoRAError(f"MoLoRAConfig: missing fields {missing}")
        return cls(**data)
