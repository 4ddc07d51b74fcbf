"""Balancing losses for routers — the one place they are computed.

Router logits of several layers are concatenated along the token axis before the loss, as
transformers' Mixtral and MoE-PEFT do, so the loss balances the load of the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from molora.model import MoLoRAModel


def _concat(router_logits: Tensor | Sequence[Tensor], attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Stack per-layer ``[tokens, E]`` logits to ``[layers * tokens, E]`` with a matching mask."""
    layers = [router_logits] if isinstance(router_logits, Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits is empty")
    num_experts = layers[0].shape[-1]
    for i, t in enumerate(layers):
        if t.dim() != 2 or t.shape[-1] != num_experts:
            raise ValueError(f"router_logits[{i}] must be [tokens, {num_experts}]; got shape {tuple(t.shape)}")
    logits = torch.cat([t.float() for t in layers], dim=0)
    if attention_mask is None:
        return logits, None
    flat = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
    if any(t.shape[0] != flat.numel() for t in layers):
        raise ValueError(
            f"attention_mask has {flat.numel()} positions but router_logits have "
            f"{[t.shape[0] for t in layers]} tokens per layer"
        )
    return logits, flat.repeat(len(layers))


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    top_k: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Switch/GShard auxiliary loss with the semantics of transformers' Mixtral
    ``load_balancing_loss_func``.

    Over the N real tokens of all layers, with ``p = softmax(logits)`` and ``M`` the one-hot
    top-k selection::

        f_e = (1/N) sum_n sum_j M[n, j, e]     P_e = (1/N) sum_n p[n, e]
        L_aux = E * sum_e f_e * P_e

    Fedus et al. (2021), "Switch Transformers", eqs. 4-6; Lepikhin et al. (2020), GShard.
    Uniform routing gives ``L_aux = top_k``. Gradients flow through ``P`` (``f`` is a count).

    Args:
        router_logits: one ``[tokens, E]`` tensor, or a sequence of them (one per layer).
        top_k: experts selected per token.
        attention_mask: ``[batch, seq]`` with ``batch * seq == tokens``; padding is ignored.
    """
    logits, mask = _concat(router_logits, attention_mask)
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}]; got {top_k}")
    probs = torch.softmax(logits, dim=-1)
    selected = probs.topk(top_k, dim=-1).indices
    weight = torch.ones(logits.shape[0], device=logits.device) if mask is None else mask
    counts = torch.zeros(num_experts, device=logits.device).scatter_add_(
        0, selected.reshape(-1), weight.repeat_interleave(top_k)
    )
    total = weight.sum().clamp_min(1.0)
    f = counts / total
    p = (probs * weight.unsqueeze(-1)).sum(dim=0) / total
    return num_experts * (f * p).sum()


def z_loss(router_logits: Tensor | Sequence[Tensor], attention_mask: Tensor | None = None) -> Tensor:
    """Router z-loss (Zoph et al., 2022, ST-MoE, eq. 5): ``L_z = mean_n (logsumexp_e logits[n, e])^2``.

    Keeps router logits small for numerical stability; padding tokens are ignored under a mask.
    """
    logits, mask = _concat(router_logits, attention_mask)
    z = torch.logsumexp(logits, dim=-1).square()
    if mask is None:
        return z.mean()
    return (z * mask).sum() / mask.sum().clamp_min(1.0)


def model_aux_loss(model: MoLoRAModel) -> Tensor:
    """``aux_loss_coef * L_aux + z_loss_coef * L_z`` over the routed layers' last forward.

    Logits of all layers are concatenated (transformers' Mixtral, MoE-PEFT); layers with
    different expert counts (MoLA) are balanced group by group, each group weighted by its
    share of the layers. Returns 0 when no coefficient is set or no router produced logits.
    """
    cfg = model.config
    records = [
        (layer.last_decision.logits, layer.last_mask)
        for layer in model.routed_layers().values()
        if layer.last_decision is not None and layer.last_decision.logits is not None
    ]
    device = records[0][0].device if records else None
    total = torch.zeros((), device=device)
    if not records or (cfg.aux_loss_coef == 0 and cfg.z_loss_coef == 0):
        return total
    groups: dict[int, list[tuple[Tensor, Tensor | None]]] = {}
    for logits, mask in records:
        groups.setdefault(logits.shape[-1], []).append((logits, mask))
    for items in groups.values():
        logits = tuple(lg for lg, _ in items)
        masks = [m for _, m in items]
        mask = masks[0] if all(m is not None for m in masks) else None
        share = len(items) / len(records)
        if cfg.aux_loss_coef:
            total = total + share * cfg.aux_loss_coef * load_balancing_loss(logits, cfg.top_k or 1, mask)
        if cfg.z_loss_coef:
            total = total + share * cfg.z_loss_coef * z_loss(logits, mask)
    return total
