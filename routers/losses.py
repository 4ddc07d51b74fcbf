"""Balancing losses for routers — the one place they are computed.

* :func:`load_balancing_loss`: Switch/GShard auxiliary loss, transformers' Mixtral semantics;
* :func:`switch_loss`: its top-1 case (Switch Transformers);
* :func:`z_loss`: router z-loss (ST-MoE);
* :func:`localized_balancing_loss`: LoRAMoE's localized balancing constraint;
* :func:`gate_entropy`: mean entropy of the gate distributions;
* :func:`model_aux_loss`: the configured weighted sum over a model's last forward.

Router logits of several layers are concatenated along the token axis before the loss, as
transformers' Mixtral and MoE-PEFT do, so the loss balances the load of the whole model. Every
loss ignores padding tokens under an ``attention_mask [batch, seq]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from molora.errors import RoutingError

from .base import RoutingDecision

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


def _concat_indices(selected: Tensor | Sequence[Tensor], tokens: int) -> Tensor:
    """Stack per-layer ``[tokens, k_l]`` index tensors, padding narrower ones with ``-1``."""
    layers = [selected] if isinstance(selected, Tensor) else list(selected)
    width = max(t.shape[-1] for t in layers)
    padded = [torch.nn.functional.pad(t.reshape(t.shape[0], t.shape[-1]), (0, width - t.shape[-1]), value=-1) for t in layers]
    out = torch.cat(padded, dim=0)
    if out.shape[0] != tokens:
        raise ValueError(f"selected has {out.shape[0]} rows but router_logits have {tokens}")
    return out


def load_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    top_k: int,
    attention_mask: Tensor | None = None,
    *,
    selected: Tensor | Sequence[Tensor] | None = None,
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
        selected: optional expert indices ``[tokens, k]`` (one tensor per layer; ``-1`` = none)
            the routers actually chose; ``f`` then counts them instead of recomputing a top-k
            from the logits (top-p, capacity-limited switch, per-layer k). ``top_k`` is unused.
    """
    logits, mask = _concat(router_logits, attention_mask)
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    if selected is None:
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}]; got {top_k}")
        selected = probs.topk(top_k, dim=-1).indices
    else:
        selected = _concat_indices(selected, logits.shape[0])
    weight = torch.ones(logits.shape[0], device=logits.device) if mask is None else mask
    valid = selected >= 0  # -1 = no expert (top-p padding, dropped tokens)
    counts = torch.zeros(num_experts, device=logits.device).scatter_add_(
        0, selected.clamp_min(0).reshape(-1), (weight.unsqueeze(-1) * valid).reshape(-1)
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


def switch_loss(router_logits: Tensor | Sequence[Tensor], attention_mask: Tensor | None = None) -> Tensor:
    """Switch Transformers' top-1 auxiliary loss (Fedus et al., 2021, eq. 4):
    ``L = E * sum_e f_e P_e = E^2 * mean_e(f_e P_e)`` with ``f_e`` the fraction of tokens whose
    argmax is e; :func:`load_balancing_loss` with ``top_k = 1``. Uniform routing gives 1."""
    return load_balancing_loss(router_logits, 1, attention_mask)


def gate_entropy(router_logits: Tensor | Sequence[Tensor], attention_mask: Tensor | None = None) -> Tensor:
    """Mean entropy of the gate distributions, ``mean_n -sum_e p[n, e] log p[n, e]``, ``p = softmax(logits)``.

    Minimising it (a positive coefficient) sharpens routing decisions, as the entropy
    regularisers of MoE routers do; its maximum is ``log E`` (uniform gates).
    """
    logits, mask = _concat(router_logits, attention_mask)
    logp = torch.log_softmax(logits, dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    if mask is None:
        return h.mean()
    return (h * mask).sum() / mask.sum().clamp_min(1.0)


def localized_balancing_loss(
    router_logits: Tensor | Sequence[Tensor],
    example_types: Tensor,
    expert_types: Sequence[int] | Tensor,
    alpha: float = 0.1,
    attention_mask: Tensor | None = None,
    eps: float = 1e-10,
) -> Tensor:
    """LoRAMoE's localized balancing constraint (Dou et al., 2024, "LoRAMoE: Alleviating World
    Knowledge Forgetting in Large Language Models via MoE-Style Plugin", eq. 7-8).

    Experts are split into types (e.g. world-knowledge vs downstream-task experts); each example
    has a type. With ``p = softmax(logits)`` per token of example b::

        I[b, e] = sum_t m[b, t] p[b, t, e]                 (importance of expert e for example b)
        Q[b, e] = 1 + alpha  if expert_types[e] == example_types[b]  else  1 - alpha
        L = Var(I * Q) / (mean(I * Q)^2 + eps)             (over all b, e; unbiased variance)

    i.e. the squared coefficient of variation of the weighted importance: balanced within a type,
    with more weight on the example's own type. Layers are concatenated along the example axis.

    Args:
        router_logits: per layer ``[batch * seq, E]`` (token routing) or ``[batch, E]``.
        example_types: ``[batch]`` type of each example (e.g. the routing signal ``task_ids``).
        expert_types: ``[E]`` type of each expert.
        alpha: ``a`` in ``[0, 1]``.
        attention_mask: ``[batch, seq]``; padding tokens add no importance.
    """
    layers = [router_logits] if isinstance(router_logits, Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits is empty")
    ex = torch.as_tensor(example_types).reshape(-1)
    batch = ex.numel()
    num_experts = layers[0].shape[-1]
    ext = torch.as_tensor(expert_types, device=layers[0].device).reshape(-1)
    if ext.numel() != num_experts:
        raise ValueError(f"expert_types must name the type of each of the {num_experts} experts; got {ext.numel()}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
    if batch == 0 or any(t.shape[0] % batch for t in layers):
        raise ValueError(f"router_logits rows {[t.shape[0] for t in layers]} are not a multiple of the batch size {batch}")
    same = ext.unsqueeze(0) == ex.to(ext.device).unsqueeze(1)  # [B, E]
    q = torch.where(same, 1.0 + alpha, 1.0 - alpha)
    weighted = []
    for t in layers:
        p = torch.softmax(t.float(), dim=-1).reshape(batch, -1, num_experts)
        if attention_mask is not None and attention_mask.numel() == p.shape[0] * p.shape[1]:
            p = p * attention_mask.reshape(batch, -1, 1).to(p)
        weighted.append(p.sum(dim=1) * q)
    iq = torch.cat(weighted, dim=0)
    return iq.var() / (iq.mean().square() + eps)


def model_aux_loss(model: MoLoRAModel) -> Tensor:
    """The configured balancing losses over the routed layers' decisions in this thread's last
    forward of ``model`` (:meth:`MoLoRAModel.last_routing`)::

        aux_loss_coef * L_aux + z_loss_coef * L_z + entropy_loss_coef * H
          + localized_loss_coef * L_localized(alpha=localized_alpha, expert_types)

    ``L_aux`` counts the experts each router actually chose (its decision's indices; for a
    switch router it is the Switch loss; dense routers use the config's ``top_k``, default 1).
    Logits of all layers are concatenated (transformers' Mixtral, MoE-PEFT); layers with
    different expert counts (MoLA) are balanced group by group, each group weighted by its share
    of the layers. The localized loss reads each decision's ``task_ids`` (the example types).
    Returns 0 when no coefficient is set or no router produced logits.
    """
    cfg = model.molora_config
    coefs = {
        "aux": cfg.aux_loss_coef, "z": cfg.z_loss_coef,
        "entropy": getattr(cfg, "entropy_loss_coef", 0.0), "localized": getattr(cfg, "localized_loss_coef", 0.0),
    }
    records = [(r.decision, r.mask) for r in model.last_routing().values() if r.decision.logits is not None]
    device = records[0][0].logits.device if records else None
    total = torch.zeros((), device=device)
    if not records or not any(coefs.values()) or all(d.logits.shape[0] == 0 for d, _ in records):
        return total  # nothing routed (also: an empty batch)
    groups: dict[int, list[tuple[RoutingDecision, Tensor | None]]] = {}
    for decision, mask in records:
        groups.setdefault(decision.logits.shape[-1], []).append((decision, mask))
    for items in groups.values():
        logits = tuple(d.logits for d, _ in items)
        masks = [m for _, m in items]
        mask = masks[0] if all(m is not None for m in masks) else None
        share = len(items) / len(records)
        if coefs["aux"]:
            if all(d.indices is not None and d.indices.shape[0] == d.logits.shape[0] for d, _ in items):
                lb = load_balancing_loss(logits, 0, mask, selected=[d.indices for d, _ in items])
            else:
                lb = load_balancing_loss(logits, cfg.top_k or 1, mask)
            total = total + share * coefs["aux"] * lb
        if coefs["z"]:
            total = total + share * coefs["z"] * z_loss(logits, mask)
        if coefs["entropy"]:
            total = total + share * coefs["entropy"] * gate_entropy(logits, mask)
        if coefs["localized"]:
            types = items[0][0].task_ids
            if types is None:
                raise RoutingError(
                    "localized_loss_coef > 0 needs the example types: run the forward inside "
                    "`with model.routing(task_ids=...)`"
                )
            total = total + share * coefs["localized"] * localized_balancing_loss(
                logits, types, cfg.expert_types, cfg.localized_alpha, mask
            )
    return total
