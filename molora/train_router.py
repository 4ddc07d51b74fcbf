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
restored. With fewer than 4 shots everything trains and the last step is kept. Deterministic under
``seed`` (split and batch order from ``random.Random(seed)``; torch's RNG forked and seeded, the
caller's RNG state is left as it was).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molora.errors import MoLoRAError
from molora.model import MoLoRAModel
from molora.routers import Router, SoftRouter
from molora.routers.weights import GlobalWeightsRouter

__all__ = ["ROUTER_KINDS", "RouterTrainResult", "install_router", "router_parameters", "train_router"]

ROUTER_KINDS = ("per_layer", "shared", "weights", "existing")
LossFn = Callable[[MoLoRAModel, list[Any]], Tensor]


@dataclasses.dataclass
class RouterTrainResult:
    """What :func:`train_router` did.

    Attributes:
        train_losses: training loss of every step.
        val_losses: ``(step, loss)`` of every validation (empty without a held-out part).
        best_step: the step whose router was kept (validation-best, else the last).
        steps: steps run; ``stopped_early``: whether patience ran out before ``steps``.
        num_train, num_val: shots used for training and held out.
    """

    train_losses: list[float]
    val_losses: list[tuple[int, float]]
    best_step: int
    steps: int
    stopped_early: bool
    num_train: int
    num_val: int
    seconds: float

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
        model.set_router(GlobalWeightsRouter(model.num_experts, first.bank.d_in, normalize=normalize).to(device))
        return
    kwargs = {"granularity": granularity, "temperature": temperature}
    if router == "per_layer":
        model.set_layer_routers(lambda _, layer: SoftRouter(layer.bank.num_experts, layer.bank.d_in, **kwargs).to(device, dtype),
                                "soft", kwargs)
        return
    widths = {layer.bank.d_in for layer in layers.values()}
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
    patience: int = 10,
    eval_every: int = 1,
    min_delta: float = 1e-4,
    seed: int = 0,
    grad_clip: float | None = 1.0,
    progress: bool = False,
) -> RouterTrainResult:
    """Train only the router of ``model`` on few-shot ``examples`` (module docstring).

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
        seed: makes the split, the batches and the result reproducible.

    Returns:
        A :class:`RouterTrainResult`; the model keeps the best router and is left in eval mode.
    """
    examples = list(examples)
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

    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_val = max(1, round(val_fraction * len(examples))) if len(examples) >= 4 and val_fraction > 0 else 0
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    train_losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    bad = 0
    stopped = False
    model.eval()  # frozen encoder: no dropout noise on a handful of shots
    from tqdm.auto import tqdm  # here, not at module level: `import molora` loads no tqdm

    t0 = time.perf_counter()
    best = (float("inf"), 0, [p.detach().clone() for p in params])
    if val:  # step 0 (the fresh router) competes too: training never ends worse than it on the held-out shots
        with torch.no_grad():
            v0 = _mean_loss(model, loss_fn, val, batch_size)
        val_losses.append((0, v0))
        best = (v0, 0, best[2])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        queue: list[int] = []
        for step in tqdm(range(1, steps + 1), desc="train router", disable=not progress, leave=False):
            if len(queue) < min(batch_size, len(train)):
                fresh = list(range(len(train)))
                rng.shuffle(fresh)
                queue += fresh
            idx, queue = queue[:batch_size], queue[batch_size:]
            loss = loss_fn(model, [train[i] for i in idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            train_losses.append(float(loss.detach()))
            if val and step % eval_every == 0:
                with torch.no_grad():
                    v = _mean_loss(model, loss_fn, val, batch_size)
                val_losses.append((step, v))
                if v < best[0] - min_delta:
                    best, bad = (v, step, [p.detach().clone() for p in params]), 0
                else:
                    bad += 1
                    if bad >= patience:
                        stopped = True
                        break
    steps_run = len(train_losses)
    if val_losses:
        with torch.no_grad():
            for p, saved in zip(params, best[2]):
                p.copy_(saved)
        best_step = best[1]
    else:
        best_step = steps_run
    model.eval()
    return RouterTrainResult(train_losses, val_losses, best_step, steps_run, stopped, len(train), len(val),
                             time.perf_counter() - t0)


def _mean_loss(model: MoLoRAModel, loss_fn: LossFn, examples: list[Any], batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        total += float(loss_fn(model, chunk)) * len(chunk)
    return total / len(examples)
