"""Few-shot router training: fit only the router of a composed model on a handful of examples.

The experts (pretrained adapters) stay frozen; only the routing is learned, by gradient descent
(AdamW) on the caller's loss over the shots, with early stopping on a held-out part of them::

    model = molora.compose(base, adapters)                       # any router; replaced below
    result = molora.train_router(model, shots, loss_fn=my_loss)

What is trained (``router=``):

* ``"per_layer"``: a fresh soft router per routed layer, ``g_l(x) = softmax(W_l x)`` with
  ``W_l`` zero-initialised (uniform mixture at step 0), sequence-level by default (one decision
  per example from the layer's masked-mean input): MoLoRA/MoV (Zadouri et al., 2023) routers
  trained as in LoRAHub's few-shot setting (Huang et al., 2023) but with gradients.
* ``"shared"``: one soft router whose weight ``W`` every layer uses on its own input (``E x d``
  parameters in all); needs every layer to hold every expert and the same input width.
* ``"weights"``: per-expert global weights ``g = softmax(theta)``
  (:class:`~molora.routers.weights.GlobalWeightsRouter`), ``E`` parameters, the same for all tokens
  and layers: the gradient counterpart of LoRAHub's output mixture.
* ``"existing"``: whatever routers the model has (e.g. :func:`molora.xlora_style.attach_xlora_style`).

``examples`` is a sequence of anything; ``loss_fn(model, batch)`` receives the model and a list of
examples and returns a scalar loss (it runs the forward itself, under any ``model.routing(...)``
it needs). For text classification, :func:`molora.apps.textcls.text_classification_loss` is such a
loss (cross-entropy over a task's label prototypes).

Early stopping: ``val_fraction`` of the shots (at least one, when there are 4 or more) is held
out; the validation loss is computed every ``eval_every`` steps, training stops after
``patience`` evaluations without improvement and the router with the best validation loss is
restored. With fewer than 4 shots everything trains and the last step is kept. Opt-in:
``folds=k`` chooses the number of steps by k-fold cross-validation and retrains on all shots, and
``prior=λ`` adds a uniform prior (KL from the uniform mixture) to the loss (:func:`train_router`);
on the 11-target clbench grid at k = 16 neither beat these defaults (README). ``method="auto"``
chooses among compositions (:mod:`molora.auto_router`). Deterministic under
``seed`` (split and batch order from ``random.Random(seed)``; torch's RNG forked and seeded, the
caller's RNG state is left as it was).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molora import context
from molora.errors import MoLoRAError
from molora.model import MoLoRAModel
from molora.routers import Router, SoftRouter
from molora.routers.weights import GlobalWeightsRouter

__all__ = ["DEFAULT_PRIOR", "ROUTER_KINDS", "RouterTrainResult", "install_router", "router_parameters", "train_router",
           "uniform_prior_penalty"]

ROUTER_KINDS = ("per_layer", "shared", "weights", "existing")
#: Weight of the uniform prior (:func:`train_router`): 0, as measured (prior 0.1 and 1 did not help on the grid).
DEFAULT_PRIOR = 0.0
LossFn = Callable[[MoLoRAModel, list[Any]], Tensor]


@dataclasses.dataclass
class RouterTrainResult:
    """What :func:`train_router` did.

    Attributes:
        train_losses: training loss of every step.
        val_losses: ``(step, loss)`` of every validation (empty without a held-out part).
        best_step: the step whose router was kept (validation-best, else the last).
        steps: steps run; ``stopped_early``: whether patience ran out before ``steps``.
        num_train, num_val: shots used for training and held out (with k folds: all, 0; the
            ``val_losses`` are then the mean held-out loss over the folds at each step).
        seconds: wall time; folds: 1 for the single split, else k.
    """

    train_losses: list[float]
    val_losses: list[tuple[int, float]]
    best_step: int
    steps: int
    stopped_early: bool
    num_train: int
    num_val: int
    seconds: float
    folds: int = 1

    @property
    def best_val_loss(self) -> float | None:
        return min((v for _, v in self.val_losses), default=None)


def install_router(model: MoLoRAModel, router: str = "per_layer", *, granularity: str = "sequence",
                   temperature: float = 1.0, normalize: str = "softmax") -> None:
    """Replace the routing of ``model`` by a fresh router of kind ``router`` (see the module docstring).

    Fresh routers start at the uniform mixture over each layer's experts.
    """
    if router not in ROUTER_KINDS:
        raise ValueError(f"molora.train_router: router must be one of {ROUTER_KINDS}; got {router!r}")
    layers = model.routed_layers()
    if not layers:
        raise MoLoRAError("molora.train_router: the model has no routed layers")
    if router == "existing":
        return
    first = next(iter(layers.values()))
    device = first.bank.device
    dtype = model.molora_config.torch_dtype
    if router == "weights":
        model.set_router(GlobalWeightsRouter(model.num_experts, first.router_width, normalize=normalize).to(device))
        return
    kwargs = {"granularity": granularity, "temperature": temperature}
    if router == "per_layer":
        model.set_layer_routers(lambda _, layer: SoftRouter(layer.bank.num_experts, layer.router_width, **kwargs).to(device, dtype),
                                "soft", kwargs)
        return
    widths = {layer.router_width for layer in layers.values()}
    partial = [n for n, layer in layers.items() if layer.bank.num_experts != model.num_experts]
    if len(widths) != 1 or partial:
        raise MoLoRAError(
            "molora.train_router: router='shared' needs every layer to hold every expert and the same input width; "
            f"input widths {sorted(widths)}, layers with a subset of the experts {partial[:4]}; use router='per_layer'"
        )
    shared = SoftRouter(model.num_experts, widths.pop(), **kwargs).to(device, dtype)
    model.set_layer_routers(lambda _, layer: shared, "soft", kwargs)


def router_parameters(model: MoLoRAModel) -> list[nn.Parameter]:
    """The parameters of all routers of ``model`` (per-layer and shared), each once."""
    seen: dict[int, nn.Parameter] = {}
    modules = [layer.router for layer in model.routed_layers().values() if layer.router is not None]
    if model.shared_router is not None:
        modules.append(model.shared_router)
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def train_router(
    model: MoLoRAModel,
    examples: Sequence[Any],
    *,
    loss_fn: LossFn | None = None,
    router: str = "per_layer",
    granularity: str = "sequence",
    normalize: str = "softmax",
    steps: int = 100,
    lr: float | None = None,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    val_fraction: float = 0.25,
    folds: int | None = None,
    prior: float = DEFAULT_PRIOR,
    patience: int = 10,
    eval_every: int = 1,
    min_delta: float = 1e-4,
    seed: int = 0,
    grad_clip: float | None = 1.0,
    progress: bool = False,
    method: str | None = None,
    candidates: Sequence[str] | None = None,
    retrieval: tuple[Any, Callable[[list[Any]], Tensor]] | None = None,
    rule: str | None = None,
) -> RouterTrainResult | Any:
    """Train only the router of ``model`` on few-shot ``examples`` (module docstring).

    ``method="auto"`` instead chooses among uniform weights, retrieval, LoRAHub and the gradient
    routers by k-fold cross-validation on the shots (:mod:`molora.auto_router`; ``candidates``,
    ``retrieval=(keys, embed)``, ``folds`` and the selection ``rule`` go there, ``steps``/``lr``/``prior``/... to the
    gradient candidates) and returns an :class:`~molora.auto_router.AutoRouterResult`.

    The loss minimised is ``loss_fn(model, batch) + prior * R`` with the uniform prior

    ``R = mean_l mean_i KL(u || g_{l,i}) = mean_l mean_i [ -log E_l - (1/E_l) sum_e log g_{l,i,e} ]``

    over the routed layers ``l`` and the rows ``i`` (examples, or tokens) of the batch's last
    forward (:meth:`MoLoRAModel.last_routing`), ``g`` the routing weights and ``u = 1/E_l``: zero
    exactly at the uniform mixture the fresh routers start from, growing without bound as an
    expert's weight goes to zero. Per row, not of the mean mixture, so an input-dependent router
    cannot satisfy it by routing each input elsewhere while averaging to uniform (a prior toward
    the uniform mixture, cf. LoRAHub's L1 toward zero weights).

    Step selection: with ``folds = k >= 2`` the shots are split into ``k`` folds; for each, the
    router is trained from scratch on the other folds and its held-out loss recorded every
    ``eval_every`` steps (after early stopping, the fold's last value carries forward); the step
    with the least mean held-out loss over folds is chosen and a fresh router is then trained on
    all shots for exactly that many steps. ``folds=None`` (default) or ``1``: the single
    ``val_fraction`` split (k-fold becomes the default once the few-shot grid measures it).

    Args:
        model: a :class:`MoLoRAModel` (e.g. from :func:`molora.compose`); its experts are frozen.
        examples: the shots, a sequence of anything ``loss_fn`` takes.
        loss_fn: ``loss_fn(model, batch) -> scalar`` on a list of examples.
        router: ``"per_layer"``, ``"shared"``, ``"weights"`` or ``"existing"``.
        granularity, normalize: of the fresh soft routers / global weights.
        steps: maximum optimisation steps; lr: AdamW learning rate (default 0.05 for
            ``"weights"``, 0.005 otherwise).
        batch_size: shots per step (all training shots when fewer).
        val_fraction, patience, eval_every, min_delta: early stopping (module docstring).
        folds: k-fold step selection (above); prior: the weight of ``R`` (0 disables it).
        seed: makes the split, the batches and the result reproducible.

    Returns:
        A :class:`RouterTrainResult`; the model keeps the best router and is left in eval mode.
    """
    if method is not None and method != "auto":
        raise ValueError(f"molora.train_router: method must be None (train router=...) or 'auto'; got {method!r}")
    examples = list(examples)
    if method == "auto":
        if loss_fn is None:
            raise ValueError("molora.train_router: pass loss_fn=(model, batch) -> loss")
        from molora.auto_router import select_router
        kwargs = dict(granularity=granularity, normalize=normalize, steps=steps, lr=lr, weight_decay=weight_decay,
                      batch_size=batch_size, val_fraction=val_fraction, prior=prior, patience=patience,
                      eval_every=eval_every, min_delta=min_delta, grad_clip=grad_clip)
        extra = {} if rule is None else {"rule": rule}
        return select_router(model, examples, loss_fn=loss_fn, candidates=candidates, retrieval=retrieval, folds=folds,
                             seed=seed, router_kwargs=kwargs, batch_size=batch_size, **extra)
    if loss_fn is None:
        raise ValueError("molora.train_router: pass loss_fn=(model, batch) -> loss (for a text task: "
                         "molora.apps.textcls.text_classification_loss(tokenizer, task))")
    if len(examples) < 1:
        raise ValueError("molora.train_router: got no examples")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("patience", patience, 1), ("eval_every", eval_every, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"molora.train_router: {name} must be an int >= {low}; got {value!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"molora.train_router: val_fraction must be in [0, 1); got {val_fraction!r}")
    if folds is not None and (not isinstance(folds, int) or isinstance(folds, bool) or not 1 <= folds <= len(examples)):
        raise ValueError(f"molora.train_router: folds must be None or an int in [1, {len(examples)}] (the number of shots); got {folds!r}")
    if not isinstance(prior, (int, float)) or not prior >= 0.0 or prior == float("inf"):
        raise ValueError(f"molora.train_router: prior must be a finite number >= 0; got {prior!r}")
    if not isinstance(model, MoLoRAModel):
        raise ValueError(f"molora.train_router: expected a MoLoRAModel; got {type(model).__name__}")

    install_router(model, router, granularity=granularity, normalize=normalize)
    model.set_experts_trainable(False)
    params = router_parameters(model)
    if not params:
        raise MoLoRAError(f"molora.train_router: the model's routers ({model.molora_config.router!r}) have no parameters to train")
    for p in params:
        p.requires_grad_(True)
    if lr is None:
        lr = 0.05 if router == "weights" else 0.005
    fit = dataclasses.replace(_Fit(), lr=lr, weight_decay=weight_decay, batch_size=batch_size, patience=patience,
                              eval_every=eval_every, min_delta=min_delta, grad_clip=grad_clip, prior=float(prior),
                              progress=progress)

    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n = len(examples)
    if folds is None:
        folds = 1
    model.eval()  # frozen encoder: no dropout noise on a handful of shots
    t0 = time.perf_counter()
    if folds >= 2:
        start = [p.detach().clone() for p in params]
        curves: list[dict[int, float]] = []
        for f in range(folds):
            held = set(order[f::folds])
            val = [examples[i] for i in order if i in held]
            train = [examples[i] for i in order if i not in held]
            _reset(params, start)
            _, vl, _, _ = _fit_router(model, loss_fn, params, train, val, steps, fit, seed + 1 + f)
            curves.append(dict(vl))
        grid = sorted({s for c in curves for s in c})
        mean_curve = []
        for s in grid:
            vals = [c[s] if s in c else c[max(k for k in c if k <= s)] for c in curves]
            mean_curve.append((s, sum(vals) / len(vals)))
        best_step = min(mean_curve, key=lambda sv: (sv[1], sv[0]))[0]
        _reset(params, start)
        train_losses: list[float] = []
        if best_step > 0:
            train_losses, _, _, _ = _fit_router(model, loss_fn, params, [examples[i] for i in order], [], best_step, fit, seed)
        model.eval()
        return RouterTrainResult(train_losses, mean_curve, best_step, len(train_losses), best_step < max(grid), n, 0,
                                 time.perf_counter() - t0, folds)
    n_val = max(1, round(val_fraction * n)) if n >= 4 and val_fraction > 0 else 0
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    train_losses, val_losses, best_step, stopped = _fit_router(model, loss_fn, params, train, val, steps, fit, seed, rng)
    model.eval()
    return RouterTrainResult(train_losses, val_losses, best_step, len(train_losses), stopped, len(train), len(val),
                             time.perf_counter() - t0, 1)


@dataclasses.dataclass
class _Fit:
    lr: float = 0.005
    weight_decay: float = 0.0
    batch_size: int = 32
    patience: int = 10
    eval_every: int = 1
    min_delta: float = 1e-4
    grad_clip: float | None = 1.0
    prior: float = 0.0
    progress: bool = False


def _reset(params: list[nn.Parameter], values: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def uniform_prior_penalty(model: MoLoRAModel, records: dict[str, context.LayerRecord] | None = None) -> Tensor:
    """``R = mean_l mean_i KL(u || g_{l,i})`` over the routed layers ``l`` and rows ``i`` of
    ``records`` (default: ``model``'s last forward, :meth:`MoLoRAModel.last_routing`;
    :func:`train_router`), ``g`` the gates, ``u = 1/E_l``.

    Zero when no layer recorded dense gates (e.g. before any forward)."""
    terms = []
    for rec in (model.last_routing() if records is None else records).values():
        d = rec.decision
        if d.indices is not None or d.gates.dim() != 2 or d.gates.shape[-1] < 2:
            continue  # sparse (top-k) decisions have no dense mixture to compare with uniform
        g = d.gates.float().clamp_min(1e-12)
        terms.append((-math.log(g.shape[-1]) - torch.log(g).mean(-1)).mean())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def _routed_loss(model: MoLoRAModel, loss_fn: LossFn, batch: list[Any]) -> tuple[Tensor, dict[str, context.LayerRecord]]:
    """``loss_fn(model, batch)`` and what the routed layers decided during it. A forward scope of
    the model is open around the call, so a loss that runs the model's modules directly (cached
    inputs of the top layers, an encoder's layers one by one) records its decisions there; one
    that calls ``model(...)`` records in that forward's own scope (:meth:`MoLoRAModel.last_routing`)."""
    with context.forward_scope(owner=model._scope_owner) as scope:
        loss = loss_fn(model, batch)
    return loss, scope.records or model.last_routing()


def _fit_router(model: MoLoRAModel, loss_fn: LossFn, params: list[nn.Parameter], train: list[Any], val: list[Any],
                steps: int, fit: _Fit, seed: int, rng: random.Random | None = None
                ) -> tuple[list[float], list[tuple[int, float]], int, bool]:
    """AdamW on ``params`` over ``train`` for up to ``steps`` steps, early-stopped on ``val`` (the
    best router restored); returns train losses, ``(step, val loss)``, the kept step, stopped."""
    from tqdm.auto import tqdm  # here, not at module level: `import molora` loads no tqdm

    rng = rng if rng is not None else random.Random(seed)
    opt = torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)
    batch_size = fit.batch_size
    train_losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    bad = 0
    stopped = False
    best = (float("inf"), 0, [p.detach().clone() for p in params])
    if val:  # step 0 (the fresh router) competes too: training never ends worse than it on the held-out shots
        with torch.no_grad():
            v0 = _mean_loss(model, loss_fn, val, batch_size)
        val_losses.append((0, v0))
        best = (v0, 0, best[2])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        queue: list[int] = []
        for step in tqdm(range(1, steps + 1), desc="train router", disable=not fit.progress, leave=False):
            if len(queue) < min(batch_size, len(train)):
                fresh = list(range(len(train)))
                rng.shuffle(fresh)
                queue += fresh
            idx, queue = queue[:batch_size], queue[batch_size:]
            loss, records = _routed_loss(model, loss_fn, [train[i] for i in idx])
            total = loss + fit.prior * uniform_prior_penalty(model, records).to(loss.device) if fit.prior > 0 else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            if fit.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, fit.grad_clip)
            opt.step()
            train_losses.append(float(loss.detach()))
            if val and step % fit.eval_every == 0:
                with torch.no_grad():
                    v = _mean_loss(model, loss_fn, val, batch_size)
                val_losses.append((step, v))
                if v < best[0] - fit.min_delta:
                    best, bad = (v, step, [p.detach().clone() for p in params]), 0
                else:
                    bad += 1
                    if bad >= fit.patience:
                        stopped = True
                        break
    if val_losses:
        _reset(params, best[2])
        return train_losses, val_losses, best[1], stopped
    return train_losses, val_losses, len(train_losses), stopped


def _mean_loss(model: MoLoRAModel, loss_fn: LossFn, examples: list[Any], batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        total += float(loss_fn(model, chunk)) * len(chunk)
    return total / len(examples)
