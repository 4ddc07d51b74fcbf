"""Choosing a few-shot composition by cross-validation on the shots alone.

``train_router(model, shots, loss_fn=..., method="auto")`` (or :func:`select_router`) scores each
candidate composition by k-fold cross-validation: for fold ``f`` the candidate is fitted on the
other folds and its mean ``loss_fn`` on fold ``f`` recorded; the score is the mean over folds,
``CV(c) = (1/k) sum_f L_f(c)``. The default rule (``rule="gradient"``, :func:`choose`) keeps the
per-layer gradient router unless a candidate beats it on the same folds by more than two standard
errors of the paired differences ``d_f = L_f(per_layer) - L_f(c)``; ``rule="paired"`` is the same
test anchored at the uniform mixture with one standard error, and ``rule="one_se"`` takes the
simplest candidate within one standard error of the best (Breiman et al., 1984), in the order

    uniform < retrieval < weights < lorahub < per_layer

(free parameters: none, one pick, ``E``, ``E`` searched gradient-free, ``L x E x d``). On the
11-target clbench grid at k = 16 (README) the rule was chosen on seeds 0-2 (gradient 52.6, paired
50.9, one_se 49.1) and checked on the held-out seeds 3-4 (gradient 52.2, paired 51.1; the
per-layer router alone 52.1): held-out losses of 16 shots rank the candidates too noisily to beat
the best single method, so the rule departs from it only on a clear gain. The winner is then fitted on all shots and left applied to
the model. Candidates:

* ``"uniform"``: every expert with weight ``1/E`` (a static router; nothing fitted).
* ``"retrieval"``: the expert whose key is closest to the shots' mean embedding
  (:func:`molora.expert_retrieval.retrieve_expert`); only with ``retrieval=(keys, embed)``,
  ``embed(examples) -> [n, dim]``.
* ``"weights"``, ``"per_layer"``: :func:`molora.train_router` with that router (its own prior
  and step selection, run inside each fold too, so the score is of the procedure applied).
* ``"lorahub"``: :func:`molora.lorahub.lorahub` in ``mode="output"`` (the exact output mixture:
  it adds no expert to the model, so the folds all see the same experts).

Cost: ``k + 1`` fits of every candidate.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from molora.errors import MoLoRAError
from molora.model import MoLoRAModel

__all__ = ["AUTO_CANDIDATES", "DEFAULT_RULE", "RULES", "SIMPLICITY", "AutoRouterResult", "choose", "select_router"]

#: Candidates tried when none are named ("retrieval" joins them when ``retrieval=`` is given).
AUTO_CANDIDATES = ("uniform", "weights", "lorahub", "per_layer")
#: Tie-break order, simplest first.
SIMPLICITY = ("uniform", "retrieval", "weights", "lorahub", "per_layer")
#: Selection rules of :func:`choose`.
RULES = ("one_se", "paired", "gradient")
DEFAULT_RULE = "gradient"  # measured on the 11-target clbench grid (README, Few-shot composition)


@dataclasses.dataclass
class AutoRouterResult:
    """What ``method="auto"`` chose and why.

    Attributes:
        method: the candidate applied to the model.
        scores: mean held-out loss over the folds, by candidate; std_errors: their standard errors.
        fold_losses: each candidate's held-out loss on every fold.
        folds: k; seconds: wall time of the whole selection (and the final fit).
        final: the final fit's own result (``RouterTrainResult``, ``LoraHubResult``, the retrieved
            expert index, or ``None`` for uniform).
    """

    method: str
    scores: dict[str, float]
    std_errors: dict[str, float]
    fold_losses: dict[str, list[float]]
    folds: int
    seconds: float
    final: Any

    @property
    def best_val_loss(self) -> float:
        return self.scores[self.method]


def select_router(
    model: MoLoRAModel,
    examples: Sequence[Any],
    *,
    loss_fn: Callable[[MoLoRAModel, list[Any]], Tensor],
    candidates: Sequence[str] | None = None,
    retrieval: tuple[Any, Callable[[list[Any]], Tensor]] | None = None,
    folds: int | None = None,
    seed: int = 0,
    router_kwargs: dict[str, Any] | None = None,
    lorahub_kwargs: dict[str, Any] | None = None,
    batch_size: int = 32,
    rule: str = DEFAULT_RULE,
) -> AutoRouterResult:
    """Pick a composition by k-fold CV on ``examples`` and apply it (module docstring).

    Args:
        model, examples, loss_fn: as for :func:`molora.train_router`.
        candidates: names from :data:`SIMPLICITY`; default :data:`AUTO_CANDIDATES` (+ retrieval).
        retrieval: ``(keys, embed)``: a fitted ``RetrievalRouter`` or ``[E, dim]`` keys, and a
            function giving ``[n, dim]`` embeddings of a list of examples.
        folds: k (default ``min(5, n)``); needs ``2 <= k <= n``.
        seed: folds and every fit are deterministic given it.
        router_kwargs: extra arguments of the gradient fits (``steps``, ``lr``, ``prior``, ...).
        lorahub_kwargs: extra arguments of :func:`molora.lorahub.lorahub` (``budget``, ``l1``, ...).
        rule: how the fold losses pick the winner (:func:`choose`).
    """
    examples = list(examples)
    n = len(examples)
    if candidates is None:
        candidates = AUTO_CANDIDATES if retrieval is None else ("uniform", "retrieval") + AUTO_CANDIDATES[1:]
    candidates = list(dict.fromkeys(candidates))
    unknown = [c for c in candidates if c not in SIMPLICITY]
    if unknown or not candidates:
        raise ValueError(f"molora.train_router(method='auto'): candidates must be among {SIMPLICITY}; got {candidates!r}")
    if "retrieval" in candidates and retrieval is None:
        raise ValueError("molora.train_router(method='auto'): candidate 'retrieval' needs retrieval=(keys, embed)")
    k = min(5, n) if folds is None else folds
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= n:
        raise ValueError(f"molora.train_router(method='auto'): needs 2 <= folds <= {n} (the number of shots); got folds={k!r}")
    if rule not in RULES:
        raise ValueError(f"molora.train_router(method='auto'): rule must be one of {RULES}; got {rule!r}")
    if not isinstance(model, MoLoRAModel):
        raise ValueError(f"molora.train_router: expected a MoLoRAModel; got {type(model).__name__}")
    if not model.routed_layers():
        raise MoLoRAError("molora.train_router: the model has no routed layers")

    def fit(name: str, shots: list[Any]) -> Any:
        return _fit(model, name, shots, loss_fn, retrieval, seed, dict(router_kwargs or {}), dict(lorahub_kwargs or {}))

    from molora.train_router import _mean_loss  # one definition of "mean loss over shots"

    with model.routers_kept_on_error():  # a failed fit leaves the model's routers as they were
        return _select(model, examples, candidates, k, seed, fit, loss_fn, batch_size, _mean_loss, rule)


def _select(model: MoLoRAModel, examples: list[Any], candidates: list[str], k: int, seed: int, fit: Callable,
            loss_fn: Callable, batch_size: int, _mean_loss: Callable, rule: str) -> AutoRouterResult:
    n = len(examples)
    t0 = time.perf_counter()
    order = list(range(n))
    random.Random(seed).shuffle(order)
    losses: dict[str, list[float]] = {c: [] for c in candidates}
    for f in range(k):
        held = set(order[f::k])
        val = [examples[i] for i in order if i in held]
        train = [examples[i] for i in order if i not in held]
        for c in candidates:
            fit(c, train)
            model.eval()
            with torch.no_grad():
                losses[c].append(_mean_loss(model, loss_fn, val, batch_size))
    scores = {c: sum(v) / k for c, v in losses.items()}
    errors = {c: _std(v) / math.sqrt(k) for c, v in losses.items()}
    chosen = choose(losses, rule)
    final = fit(chosen, examples)
    model.eval()
    return AutoRouterResult(chosen, scores, errors, losses, k, time.perf_counter() - t0, final)


#: The anchor and the margin (in standard errors of the paired differences) of each paired rule.
PAIRED_RULES = {"paired": ("uniform", 1.0), "gradient": ("per_layer", 2.0)}


def choose(fold_losses: dict[str, list[float]], rule: str = DEFAULT_RULE, z: float | None = None) -> str:
    """The candidate a selection ``rule`` picks from each candidate's held-out loss on the same folds.

    * ``"one_se"``: the simplest candidate (:data:`SIMPLICITY`) whose mean is within one standard
      error of the best mean (Breiman et al., 1984).
    * ``"paired"``: ``"uniform"`` unless some candidate beats it on the folds by more than ``z``
      (default 1) standard errors of the *paired* differences ``d_f = L_f(uniform) - L_f(c)``
      (``mean(d) > z * std(d) / sqrt(k)``); among those, the largest mean improvement (ties: the
      simpler). The folds are shared, so the paired test sees a consistent gain that the spread
      of either candidate's own losses would hide, and a gain on one lucky fold does not pass.
    * ``"gradient"``: the same test anchored at the per-layer gradient router (``"per_layer"``)
      with ``z = 2``: it is kept unless another candidate is clearly better on the folds.

    A paired rule whose anchor is not among the candidates takes the least mean loss.
    """
    if rule not in RULES:
        raise ValueError(f"molora.train_router(method='auto'): rule must be one of {RULES}; got {rule!r}")
    names = sorted(fold_losses, key=SIMPLICITY.index)
    means = {c: sum(v) / len(v) for c, v in fold_losses.items()}
    best = min(names, key=lambda c: (means[c], SIMPLICITY.index(c)))
    if rule == "one_se":
        bar = means[best] + _std(fold_losses[best]) / math.sqrt(len(fold_losses[best]))
        return min((c for c in names if means[c] <= bar), key=SIMPLICITY.index)
    anchor, default_z = PAIRED_RULES[rule]
    z = default_z if z is None else z
    if anchor not in fold_losses:
        return best
    base = fold_losses[anchor]
    chosen, gain = anchor, 0.0
    for c in names:
        if c == anchor:
            continue
        d = [u - v for u, v in zip(base, fold_losses[c])]
        m = sum(d) / len(d)
        if m > z * _std(d) / math.sqrt(len(d)) and m > gain:
            chosen, gain = c, m
    return chosen


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _fit(model: MoLoRAModel, name: str, shots: list[Any], loss_fn: Callable, retrieval: Any, seed: int,
         router_kwargs: dict[str, Any], lorahub_kwargs: dict[str, Any]) -> Any:
    from molora.expert_retrieval import retrieve_expert, route_to_expert
    from molora.routers import StaticRouter

    if name == "uniform":
        first = next(iter(model.routed_layers().values()))
        E = model.num_experts
        model.set_router(StaticRouter(E, first.router_width, weights=[1.0 / E] * E).to(first.bank.device))
        return None
    if name == "retrieval":
        keys, embed = retrieval
        index, _ = retrieve_expert(keys, embed(shots))
        route_to_expert(model, index)
        return index
    if name == "lorahub":
        from molora.lorahub import lorahub
        return lorahub(model, loss_fn, shots, **{"mode": "output", "seed": seed, **lorahub_kwargs})
    from molora.train_router import train_router
    return train_router(model, shots, loss_fn=loss_fn, router=name, seed=seed, **router_kwargs)
