"""LoRAHub: gradient-free composition of pretrained adapters with CMA-ES (Huang et al., 2023).

One weight ``w_i`` per adapter, searched by CMA-ES (Hansen, the ``cma`` package) within bounds
``[-1.5, 1.5]`` from ``w = 0``, minimising

    J(w) = loss(model with mixture w; shots) + l1 * mean_i |w_i|          (LoRAHub: l1 = 0.05)

under a budget of ``budget`` evaluations of ``J`` (LoRAHub: 40; every evaluation is one forward
over the shots, no gradient). Two mixtures:

* ``mode="elementwise"`` (LoRAHub's): the adapters' factors are mixed separately,
  ``A' = sum_i w_i A_i``, ``B' = sum_i w_i B_i``, ``delta W = s B' A'`` (cross terms
  ``w_i w_j B_i A_j`` included). Needs, per layer, adapters of one rank and one scaling ``s``.
  The mixture is held by an extra expert named ``"lorahub"`` that the model routes to alone.
* ``mode="output"``: the exact output mixture ``delta W = sum_i w_i s_i B_i A_i`` (no cross
  terms; any ranks), held by a static router over the adapters
  (:class:`~molora.routers.static.StaticRouter`).

Either way the result stays applied to the model and exports exactly as one PEFT adapter:
``model.export_peft(folder, result.export_weights)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molora.checks import finite_number, mixture_weights, positive_int
from molora.errors import MoLoRAError
from molora.expert_retrieval import route_to_expert
from molora.model import MoLoRAModel
from molora.routers import StaticRouter

__all__ = ["LORAHUB_EXPERT", "LoraHubResult", "cma_minimize", "elementwise_factors", "lorahub"]

MODES = ("elementwise", "output")
LORAHUB_EXPERT = "lorahub"


@dataclasses.dataclass
class LoraHubResult:
    """The outcome of :func:`lorahub`.

    Attributes:
        weights: the best weight per adapter (by adapter name).
        objective: ``J`` at those weights; loss: its loss part.
        evaluations: how many times ``J`` was evaluated (``<= budget``).
        history: ``J`` of every evaluation, in order.
        mode: ``"elementwise"`` or ``"output"``.
    """

    weights: dict[str, float]
    objective: float
    loss: float
    evaluations: int
    history: list[float]
    mode: str
    seconds: float

    @property
    def export_weights(self) -> dict[str, float]:
        """The weights to pass to ``model.export_peft`` for this result's mixture."""
        return {LORAHUB_EXPERT: 1.0} if self.mode == "elementwise" else dict(self.weights)


def _search_settings(dim: int, budget: Any, bounds: Any, x0: Any, sigma0: Any) -> tuple[float, float, int, float, np.ndarray]:
    """CMA-ES settings checked: finite ``low < high`` bounds, an int budget >= 1, a finite
    ``sigma0 > 0`` and ``dim`` finite start weights (clipped into the bounds)."""
    where = "molora.lorahub"
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__") or len(bounds) != 2:
        raise MoLoRAError(f"{where}: bounds must be (low, high); got {bounds!r}")
    lo, hi = finite_number(bounds[0], where, "bounds[0]"), finite_number(bounds[1], where, "bounds[1]")
    if not lo < hi:
        raise MoLoRAError(f"{where}: bounds must be (low, high) with low < high; got {bounds!r}")
    budget = positive_int(budget, where, "budget")
    sigma0 = finite_number(sigma0, where, "sigma0", low=0.0, low_open=True)
    if x0 is None:
        return lo, hi, budget, sigma0, np.zeros(dim)
    if isinstance(x0, (str, bytes)) or not hasattr(x0, "__len__") or len(x0) != dim:
        raise MoLoRAError(f"{where}: x0 must have {dim} entries (one weight per adapter); got {x0!r}")
    start = np.array([finite_number(v, where, f"x0[{i}]") for i, v in enumerate(x0)], dtype=float)
    return lo, hi, budget, sigma0, np.clip(start, lo, hi)


def cma_minimize(objective: Callable[[np.ndarray], float], dim: int, *, budget: int, bounds: tuple[float, float],
                 x0: Sequence[float] | None = None, sigma0: float = 0.5, seed: int = 0,
                 progress: bool = False) -> tuple[np.ndarray, float, list[float]]:
    """Minimise ``objective`` over ``[lo, hi]^dim`` with CMA-ES using at most ``budget`` evaluations.

    Every candidate is evaluated inside the bounds (``cma``'s boundary handling repairs
    the samples before they are returned). The last generation is truncated if the budget ends
    inside it (its candidates are evaluated but not told to CMA-ES). Returns the best point seen,
    its value and the values of all evaluations. ``seed`` is shifted by one: ``cma`` treats
    seed 0 as "random".
    """
    import cma
    from tqdm.auto import tqdm

    lo, hi, budget, sigma0, x0 = _search_settings(dim, budget, bounds, x0, sigma0)
    es = cma.CMAEvolutionStrategy(list(x0), sigma0, {"bounds": [lo, hi], "seed": int(seed) + 1, "verbose": -9,
                                                      "maxfevals": budget})
    history: list[float] = []
    best_x, best_f = x0.copy(), float("inf")
    bar = tqdm(total=budget, desc="CMA-ES", disable=not progress, leave=False)
    while len(history) < budget:
        xs = es.ask()
        take = xs[: budget - len(history)]
        fs = []
        for x in take:
            x = np.clip(np.asarray(x, dtype=float), lo, hi)
            f = float(objective(x))
            fs.append(f)
            history.append(f)
            bar.update(1)
            if f < best_f:
                best_x, best_f = x.copy(), f
        if len(take) < len(xs):
            break
        es.tell(xs, fs)
    bar.close()
    return best_x, best_f, history


def elementwise_factors(model: MoLoRAModel, weights: Sequence[float] | Tensor) -> dict[str, tuple[Tensor, Tensor, float]]:
    """LoRAHub's element-wise mix per layer: ``(A' = sum_e w_e A_e, B' = sum_e w_e B_e, s)``.

    ``weights`` has one entry per model expert (a layer mixes the experts it holds). Raises a
    MoLoRAError for a layer whose experts differ in rank or scaling (no element-wise sum exists).
    """
    per_layer = model.layer_weights(mixture_weights(weights, model.expert_names, "molora.lorahub"))
    out = {}
    for name, layer in model.routed_layers().items():
        bank = layer.bank
        ids = [e for e, g in enumerate(layer.expert_ids) if model.expert_names[g] != LORAHUB_EXPERT]
        if not ids:
            continue
        ranks = {bank.ranks[e] for e in ids}
        scalings = {round(float(bank.scaling[e]), 9) for e in ids}
        if len(ranks) != 1 or len(scalings) != 1 or bank.kind != "lora" or bank.shared_a:
            raise MoLoRAError(
                f"molora.lorahub: mode='elementwise' needs plain LoRA adapters of one rank and scaling per layer; module "
                f"{name!r} has kind {bank.kind!r}, ranks {sorted(ranks)} and scalings {sorted(scalings)}; use mode='output'"
            )
        w = per_layer[name]
        A = sum(float(w[e]) * bank.A[e].detach().float() for e in ids)
        B = sum(float(w[e]) * bank.B[e].detach().float() for e in ids)
        out[name] = (A, B, float(bank.scaling[ids[0]]))
    return out


def _lorahub_expert(model: MoLoRAModel) -> int:
    """The index of the expert that holds the element-wise mixture (added on first use)."""
    if LORAHUB_EXPERT in model.expert_names:
        return model.expert_names.index(LORAHUB_EXPERT)
    ranks = {r for layer in model.routed_layers().values() for r in layer.bank.ranks}
    # alpha = rank gives scaling 1; the layer's own scaling s is folded into B' when filled in.
    rank = max(ranks)
    return model.add_expert(LORAHUB_EXPERT, rank=rank, alpha=float(rank), trainable=False)


def _fill_elementwise(model: MoLoRAModel, weights: dict[str, float], index: int) -> None:
    factors = elementwise_factors(model, [weights.get(name, 0.0) for name in model.expert_names])
    with torch.no_grad():
        for name, layer in model.routed_layers().items():
            local = layer.expert_ids.index(index)
            A_dst, B_dst = layer.bank.A[local], layer.bank.B[local]
            A_dst.zero_()
            B_dst.zero_()
            if name in factors:
                A, B, s = factors[name]
                r = A.shape[0]
                A_dst[:r].copy_(A.to(A_dst))
                B_dst[:, :r].copy_((s / float(layer.bank.scaling[local])) * B.to(B_dst))


def lorahub(
    model: MoLoRAModel,
    loss_fn: Callable[[MoLoRAModel, list[Any]], Tensor],
    examples: Sequence[Any],
    *,
    mode: str = "elementwise",
    budget: int = 40,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1: float = 0.05,
    x0: Sequence[float] | None = None,
    sigma0: float = 0.5,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> LoraHubResult:
    """Search one weight per adapter with CMA-ES and apply the best mixture (module docstring).

    Args:
        model: a composed :class:`MoLoRAModel` (its experts are the adapters).
        loss_fn: ``loss_fn(model, batch) -> scalar`` on a list of examples (as in
            :func:`molora.train_router`; e.g. :func:`molora.train_router.text_classification_loss`).
        examples: the shots; every evaluation computes the mean loss over all of them.
        mode: ``"elementwise"`` (LoRAHub's A/B mix) or ``"output"`` (exact output mixture).
        budget: evaluations of the objective; bounds: of every weight; l1: the regulariser's weight.
        x0, sigma0: CMA-ES start (default all 0, as LoRAHub) and initial step size.
        seed: CMA-ES sampling seed (the search is deterministic given it).

    Returns:
        A :class:`LoraHubResult`; the model is left routing the best mixture.
    """
    if mode not in MODES:
        raise MoLoRAError(f"molora.lorahub: mode must be one of {MODES}; got {mode!r}")
    l1 = finite_number(l1, "molora.lorahub", "l1", low=0.0)
    batch_size = positive_int(batch_size, "molora.lorahub", "batch_size")
    examples = list(examples)
    if not examples:
        raise MoLoRAError("molora.lorahub: got no examples")
    adapters = [n for n in model.expert_names if n != LORAHUB_EXPERT]
    n = len(adapters)
    _search_settings(n, budget, bounds, x0, sigma0)  # checked before the model is changed
    first = next(iter(model.routed_layers().values()))
    if mode == "elementwise":
        elementwise_factors(model, [1.0] * model.num_experts)  # validates ranks/scalings before anything changes
        index = _lorahub_expert(model)
        route_to_expert(model, index)

        def apply(w: np.ndarray) -> None:
            _fill_elementwise(model, dict(zip(adapters, w.tolist())), index)
    else:
        def apply(w: np.ndarray) -> None:
            full = dict(zip(adapters, w.tolist()))
            gates = [full.get(name, 0.0) for name in model.expert_names]
            model.set_router(StaticRouter(model.num_experts, first.router_width, weights=gates).to(first.bank.device))

    model.eval()
    losses: dict[bytes, float] = {}

    def objective(w: np.ndarray) -> float:
        apply(w)
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                total += float(loss_fn(model, chunk)) * len(chunk)
        loss = total / len(examples)
        losses[w.tobytes()] = loss
        return loss + l1 * float(np.abs(w).mean())

    t0 = time.perf_counter()
    best_w, best_f, history = cma_minimize(objective, n, budget=budget, bounds=bounds, x0=x0, sigma0=sigma0,
                                            seed=seed, progress=progress)
    apply(best_w)
    return LoraHubResult(weights=dict(zip(adapters, best_w.tolist())), objective=best_f,
                         loss=losses.get(best_w.tobytes(), float("nan")), evaluations=len(history),
                         history=history, mode=mode, seconds=time.perf_counter() - t0)
