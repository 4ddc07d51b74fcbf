"""MoLoRAConfig: what to wrap, how many experts, and how to route them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch


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
        shared_a: HydraLoRA layout (one shared ``A``, one ``B`` per expert).
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
    """

    target_modules: list[str] | str
    num_experts: int = 4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    shared_a: bool = False
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

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"MoLoRAConfig: target_modules must be non-empty names; got {self.target_modules!r}")
        elif isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"MoLoRAConfig: target_modules regex {self.target_modules!r} is invalid: {exc}") from None
        else:
            raise ValueError(f"MoLoRAConfig: target_modules must be a list of names or a regex; got {self.target_modules!r}")
        for name in ("num_experts", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MoLoRAConfig: {name} must be a positive int; got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLoRAConfig: dropout must be in [0, 1); got {self.dropout!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"MoLoRAConfig: top_k must be in [1, num_experts={self.num_experts}]; got {self.top_k!r}")
        if self.expert_names is not None:
            if len(self.expert_names) != self.num_experts or len(set(self.expert_names)) != self.num_experts:
                raise ValueError(f"MoLoRAConfig: expert_names must be {self.num_experts} distinct names; got {self.expert_names!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "entropy_loss_coef", "localized_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoLoRAConfig: {name} must be >= 0; got {getattr(self, name)!r}")
        if not 0.0 <= self.localized_alpha <= 1.0:
            raise ValueError(f"MoLoRAConfig: localized_alpha must be in [0, 1]; got {self.localized_alpha!r}")
        if self.expert_types is not None:
            self.expert_types = [int(t) for t in self.expert_types]
            if len(self.expert_types) != self.num_experts:
                raise ValueError(f"MoLoRAConfig: expert_types must give a type for each of the {self.num_experts} experts; got {self.expert_types!r}")
        if self.localized_loss_coef > 0 and self.expert_types is None:
            raise ValueError("MoLoRAConfig: localized_loss_coef > 0 needs expert_types (the type of each expert)")
        self._check_layer_overrides()
        self.torch_dtype  # validates adapter_dtype

    def _check_layer_overrides(self) -> None:
        if not isinstance(self.layer_overrides, dict):
            raise ValueError(f"MoLoRAConfig: layer_overrides must map patterns to dicts; got {self.layer_overrides!r}")
        self.layer_overrides = {str(k): dict(v) for k, v in self.layer_overrides.items()}
        for pattern, values in self.layer_overrides.items():
            where = f"MoLoRAConfig: layer_overrides[{pattern!r}]"
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{where}: invalid regex: {exc}") from None
            unknown = sorted(set(values) - set(LAYER_FIELDS))
            if unknown:
                raise ValueError(f"{where}: unknown settings {unknown}; allowed: {list(LAYER_FIELDS)}")
            n = values.get("num_experts", self.num_experts)
            if not isinstance(n, int) or not 1 <= n <= self.num_experts:
                raise ValueError(f"{where}: num_experts must be an int in [1, num_experts={self.num_experts}]; got {n!r}")
            k = values.get("top_k")
            if k is not None and not (isinstance(k, int) and 1 <= k <= n):
                raise ValueError(f"{where}: top_k must be in [1, {n}] (the layer's experts); got {k!r}")
            r = values.get("rank", self.rank)
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"{where}: rank must be a positive int; got {r!r}")
            if self.shared_a and "rank" in values:
                raise ValueError(f"{where}: a shared-A (HydraLoRA) model has one rank; drop 'rank'")

    def layer_settings(self, module_name: str) -> dict[str, Any]:
        """``num_experts``, ``top_k``, ``rank`` and ``alpha`` of the layer at ``module_name``:
        the config's values, updated by the first matching :attr:`layer_overrides` pattern."""
        settings = {"num_experts": self.num_experts, "top_k": self.top_k, "rank": self.rank, "alpha": self.alpha}
        for pattern, values in self.layer_overrides.items():
            if pattern_matches(pattern, module_name):
                settings.update(values)
                if "num_experts" in values and "top_k" not in values and settings["top_k"] is not None:
                    settings["top_k"] = min(settings["top_k"], values["num_experts"])
                break
        return settings

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.adapter_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"MoLoRAConfig: adapter_dtype {self.adapter_dtype!r} is not a floating torch dtype")
        return dtype

    def matches(self, module_name: str) -> bool:
        """Whether ``module_name`` is a target (PEFT's matching rules)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def names(self) -> list[str]:
        return list(self.expert_names) if self.expert_names else [f"expert_{i}" for i in range(self.num_experts)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoLoRAConfig: unknown fields {unknown}")
        return cls(**data)
