"""Block-wise LoRA: each expert's rank and alpha per block of the model.

Block-wise LoRA (Li et al. 2024, arXiv 2403.07500, "Block-wise LoRA: Revisiting Fine-grained
LoRA for Effective Personalization and Stylization in Text-to-Image Generation") gives the
in (``down_blocks``), mid (``mid_block``) and out (``up_blocks``) blocks of a diffusion UNet
their own LoRA rank, rank 0 meaning no LoRA there, so that e.g. an identity adapter owns some
blocks and a style adapter others. Here the setting is per expert: a block entry gives one rank
(and alpha) for each of the model's E experts,

    block_ranks = {"down_blocks": [4, 0], "up_blocks.1": [0, 8], "mid_block": 0}

and a layer in that block holds only its *live* experts (rank > 0), each with scaling
``s_e = alpha_e / r_e`` (``alpha_e / sqrt(r_e)`` with rsLoRA). The layer keeps the model's
global expert indexing through its ``expert_ids`` (the experts it holds, as for MoLA's
per-layer expert counts): a shared router's gates over all E experts are read at the live
experts only, so routing a token to absent experts adds exactly nothing. A target module where
every expert has rank 0 is not wrapped at all: it stays the base module, with no parameters
added and its outputs the base's bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from molora.checks import finite_number, positive_int
from molora.errors import MoLoRAError


def block_matches(pattern: str, module_name: str) -> bool:
    """Whether ``module_name`` lies in the block ``pattern`` names: the regular expression must
    match whole dotted components of the path, anywhere in it, ``(.*\\.)?(pattern)(\\..*)?``
    matching the whole path. ``"down_blocks.0"`` covers
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` (not ``down_blocks.01...``),
    ``r"up_blocks\\.[01]"`` both up blocks, ``"mid_block"`` the mid block, ``"attn2"`` every
    cross-attention; a full module path names that module alone (PEFT's ``rank_pattern`` rule
    is the case of a pattern at the end of the path)."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})(?:\..*)?", module_name) is not None


def check_block_values(values: Any, num_experts: int, field: str, check: Callable[[Any, str], Any],
                       where: str = "MoLoRAConfig") -> dict[str, list]:
    """``values`` (``{pattern: one value for all experts, or a list of num_experts}``) with every
    entry as a list of ``num_experts`` checked values; MoLoRAError naming the pattern and value
    for a bad pattern, a list of the wrong length or a bad value (``check(value, name)``)."""
    if not isinstance(values, Mapping):
        raise MoLoRAError(f"{where}: {field} must map block patterns to a value or a list of {num_experts} "
                          f"(one per expert); got {values!r}")
    out: dict[str, list] = {}
    for pattern, value in values.items():
        name = f"{field}[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern:
            raise MoLoRAError(f"{where}: {field} patterns must be non-empty strings; got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise MoLoRAError(f"{where}: {name}: invalid regex: {exc}") from None
        if isinstance(value, (list, tuple)):
            if len(value) != num_experts:
                raise MoLoRAError(f"{where}: {name} must give one value for all experts or a list of {num_experts} "
                                  f"(one per expert); got {len(value)}: {list(value)!r}")
            out[pattern] = [check(v, f"{name}[{e}]") for e, v in enumerate(value)]
        else:
            out[pattern] = [check(value, name)] * num_experts
    return out


def check_block_ranks(values: Any, num_experts: int, fixed_rank: bool, where: str = "MoLoRAConfig") -> dict[str, list[int]]:
    """:func:`check_block_values` for ranks (ints >= 0; 0 = the expert is absent there). With a
    shared factor (``fixed_rank``: HydraLoRA's ``A``, QR-LoRA's ``Q``) a layer's experts share one
    rank, so an entry's non-zero ranks must be equal."""
    out = check_block_values(values, num_experts, "block_ranks",
                             lambda v, name: positive_int(v, where, f"{name} (rank; 0 = no expert there)", low=0), where)
    for pattern, ranks in out.items():
        live = sorted({r for r in ranks if r > 0})
        if fixed_rank and len(live) > 1:
            raise MoLoRAError(f"{where}: block_ranks[{pattern!r}]: experts with a shared factor (shared_a, qr_lora) "
                              f"have one rank per layer; got ranks {ranks}")
    return out


def check_block_alphas(values: Any, num_experts: int, where: str = "MoLoRAConfig") -> dict[str, list[float]]:
    """:func:`check_block_values` for alphas (finite numbers)."""
    return check_block_values(values, num_experts, "block_alphas", lambda v, name: finite_number(v, where, name), where)


def block_value(values: Mapping[str, list], module_name: str) -> list | None:
    """The per-expert list of the first pattern of ``values`` whose block holds ``module_name``
    (the first match wins, as for ``layer_overrides``: list specific blocks first), else ``None``."""
    for pattern, per_expert in values.items():
        if block_matches(pattern, module_name):
            return per_expert
    return None


def check_patterns_match(values: Mapping[str, Any], field: str, module_names: Iterable[str]) -> None:
    """MoLoRAError naming every pattern of ``values`` that covers none of ``module_names`` (the
    target modules): a block name with a typo would otherwise leave its setting silently unused."""
    names = list(module_names)
    unused = [p for p in values if not any(block_matches(p, n) for n in names)]
    if unused:
        raise MoLoRAError(f"{field} patterns {unused} match no target module; target modules are e.g. {names[:4]}")


def with_new_expert(ranks: Mapping[str, list[int]], alphas: Mapping[str, list[float]], rank: int, alpha: float,
                    fixed_rank: bool) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """The block settings once a new expert joins every routed layer (``add_expert``): a block
    with a live expert has routed layers, and the new expert there gets ``rank`` (with a shared
    factor, ``fixed_rank``, the block's own rank, as the layers give it); a block whose experts
    were all absent has no routed layer, so the new expert is absent there too (rank 0)."""
    new_ranks = {}
    for pattern, per_expert in ranks.items():
        live = [r for r in per_expert if r > 0]
        new_ranks[pattern] = [*per_expert, (live[0] if fixed_rank else rank) if live else 0]
    return new_ranks, {pattern: [*per_expert, float(alpha)] for pattern, per_expert in alphas.items()}
