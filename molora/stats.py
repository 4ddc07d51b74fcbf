"""Routing statistics of a model's last forward: how tokens and gate mass spread over experts.

For each routed layer, from its record in the last forward (:meth:`MoLoRAModel.last_routing`),
over the real (unpadded) tokens ``n`` with weight ``w_n`` (the attention mask; per-example
decisions count each example once)::

    token_fraction[e] = sum_n w_n [e chosen for n] / sum_n w_n       (sums to the mean k)
    gate_share[e]     = sum_n w_n g_n[e] / sum_n w_n sum_e' g_n[e']   (sums to 1)
    load_cv           = std_e(count_e) / mean_e(count_e)              (population std; 0 = balanced)

and ``dropped_tokens`` (capacity-limited routers, e.g. switch). Dense routers choose every expert
with a non-zero gate. Expert names are the model's (global) names of the layer's experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from molora.routers import RoutingDecision

if TYPE_CHECKING:
    from molora.model import MoLoRAModel


def coefficient_of_variation(counts: Tensor) -> float:
    """``std / mean`` (population std) of per-expert loads; 0 for an all-zero load."""
    counts = counts.double()
    mean = counts.mean()
    return float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0


def decision_stats(decision: RoutingDecision, mask: Tensor | None, num_experts: int) -> dict[str, Any]:
    """Statistics of one routing decision over ``num_experts`` (local) experts."""
    gates = decision.gates.detach().float()
    rows = gates.shape[0]
    if mask is not None and mask.numel() == rows:
        w = mask.reshape(-1).to(gates.device, torch.float32)
    else:
        w = torch.ones(rows, device=gates.device)
    if decision.indices is None:
        mass = gates
        chosen = (gates > 0).float()
    else:
        idx = decision.indices.detach()
        valid = idx >= 0
        safe = idx.clamp_min(0)
        mass = torch.zeros(rows, num_experts, device=gates.device).scatter_add_(1, safe, gates * valid)
        chosen = torch.zeros(rows, num_experts, device=gates.device).scatter_add_(1, safe, valid.float()).clamp_max(1)
    counts = (chosen * w.unsqueeze(1)).sum(0)
    mass_e = (mass * w.unsqueeze(1)).sum(0)
    total = float(w.sum())
    dropped = decision.dropped
    return {
        "rows": int(rows),
        "tokens": total,
        "per_example": bool(decision.per_example),
        "token_fraction": (counts / max(total, 1e-12)).tolist(),
        "gate_share": (mass_e / mass_e.sum().clamp_min(1e-12)).tolist(),
        "load_cv": coefficient_of_variation(counts),
        "dropped_tokens": None if dropped is None else int(dropped),
    }


def routing_stats(model: MoLoRAModel) -> dict[str, Any]:
    """Per routed layer (by module path) the statistics above, plus a model-wide summary.

    Layers that have not run yet (or are disabled/merged) are left out.
    """
    layers: dict[str, Any] = {}
    records = model.last_routing()
    for name, layer in model.routed_layers().items():
        if name not in records:
            continue
        stats = decision_stats(records[name].decision, records[name].mask, layer.bank.num_experts)
        stats["experts"] = [model.expert_names[g] for g in layer.expert_ids]
        layers[name] = stats
    cvs = [s["load_cv"] for s in layers.values()]
    dropped = [s["dropped_tokens"] for s in layers.values() if s["dropped_tokens"] is not None]
    return {
        "experts": list(model.expert_names),
        "layers": layers,
        "mean_load_cv": sum(cvs) / len(cvs) if cvs else None,
        "dropped_tokens": sum(dropped) if dropped else None,
    }


def plot_routing_heatmap(stats: dict[str, Any], path: str | Path, value: str = "gate_share", title: str | None = None) -> Path:
    """Save a layers x experts heatmap of ``value`` (``gate_share`` or ``token_fraction``) as PNG.

    ``stats`` is :func:`routing_stats`' output (or pass the model). matplotlib is imported lazily
    with the Agg backend (no display needed); experts a layer lacks are blank.
    """
    if not isinstance(stats, dict):
        stats = routing_stats(stats)
    if value not in ("gate_share", "token_fraction"):
        raise ValueError(f"plot_routing_heatmap: value must be 'gate_share' or 'token_fraction'; got {value!r}")
    if not stats["layers"]:
        raise ValueError("plot_routing_heatmap: no layer has routed yet; run a forward pass first")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = stats["experts"]
    names = list(stats["layers"])
    grid = torch.full((len(names), len(experts)), float("nan"))
    for i, name in enumerate(names):
        s = stats["layers"][name]
        for e, v in zip(s["experts"], s[value]):
            grid[i, experts.index(e)] = v
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(experts), 1.0 + 0.3 * len(names)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(experts)), experts, rotation=90)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("expert")
    ax.set_title(title or value)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class RoutingTally:
    """Routing statistics accumulated over many forwards (a data set, or the steps between two
    training logs), in :func:`routing_stats`' format.

    Call :meth:`update` after each forward. Per layer, expert counts and gate mass add up over
    forwards (``count_e = sum_n w_n [e chosen for n]``; gate mass weights each forward's
    ``gate_share`` by its tokens, exact when every token's gates sum to the same value, as with
    softmax or renormalised top-k), so ``token_fraction``, ``gate_share`` and ``load_cv`` describe
    all tokens seen, not the last batch.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._layers: dict[str, dict[str, Any]] = {}
        self._experts: list[str] = []
        self.forwards = 0

    def update(self, model: MoLoRAModel) -> None:
        """Add the last forward's decisions of every routed layer of ``model``."""
        self._experts = list(model.expert_names)
        self.forwards += 1
        records = model.last_routing()
        for name, layer in model.routed_layers().items():
            if name not in records:
                continue
            s = decision_stats(records[name].decision, records[name].mask, layer.bank.num_experts)
            acc = self._layers.setdefault(name, {
                "experts": [model.expert_names[g] for g in layer.expert_ids], "tokens": 0.0, "dropped": None,
                "counts": torch.zeros(layer.bank.num_experts, dtype=torch.float64),
                "mass": torch.zeros(layer.bank.num_experts, dtype=torch.float64),
            })
            acc["counts"] += torch.tensor(s["token_fraction"], dtype=torch.float64) * s["tokens"]
            acc["mass"] += torch.tensor(s["gate_share"], dtype=torch.float64) * s["tokens"]
            acc["tokens"] += s["tokens"]
            if s["dropped_tokens"] is not None:
                acc["dropped"] = (acc["dropped"] or 0) + s["dropped_tokens"]

    def result(self) -> dict[str, Any]:
        """``{"experts", "layers": {name: {token_fraction, gate_share, load_cv, tokens, ...}}, "mean_load_cv", ...}``."""
        layers = {}
        for name, acc in self._layers.items():
            total = max(acc["tokens"], 1e-12)
            mass = acc["mass"]
            layers[name] = {
                "experts": acc["experts"],
                "tokens": acc["tokens"],
                "token_fraction": (acc["counts"] / total).tolist(),
                "gate_share": (mass / mass.sum().clamp_min(1e-12)).tolist(),
                "load_cv": coefficient_of_variation(acc["counts"]),
                "dropped_tokens": acc["dropped"],
            }
        cvs = [s["load_cv"] for s in layers.values()]
        dropped = [s["dropped_tokens"] for s in layers.values() if s["dropped_tokens"] is not None]
        return {
            "experts": list(self._experts),
            "layers": layers,
            "mean_load_cv": sum(cvs) / len(cvs) if cvs else None,
            "dropped_tokens": sum(dropped) if dropped else None,
            "forwards": self.forwards,
        }
