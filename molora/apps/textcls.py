"""Text classification with a sentence encoder and no per-task head.

Method. A text ``x`` of a task with instruction ``I`` and label strings ``l_1..l_L`` is scored

    score_j(x) = cos(e(I + " " + x), P_j) / tau,        P_j = e_frozen(l_j)

where ``e`` is the (possibly adapted) encoder with sentence-transformers mean pooling and L2
normalisation, and ``P_j`` are *label prototypes*: embeddings of the label strings by the frozen
encoder (adapters off), computed once and cached. Training minimises cross-entropy over the task's
own labels, i.e. an InfoNCE-style contrastive loss that pulls the input towards its label's name
and away from the task's other label names.

Why this rather than a linear head per task: nothing here is chosen by a task id, so mixtures
of adapters can be routed by anything (task id, retrieval, a learned router) and the classifier
stays the same; label strings shared by several tasks (amazon/yelp star levels, NLI labels) mean
the same point in embedding space for all of them; a new task needs only its label strings; and
the untrained encoder already gives a (zero-shot) score, which is the ``b_j`` of forward transfer.
``tau`` is fixed (0.05, close to the temperatures used for contrastive sentence encoders), not learned,
to keep the only trainable parameters those the caller passes.

Routing hooks. ``batch_context(texts, task_indices)`` is entered around every forward of the
adapted encoder, with the exact strings fed to the encoder (:func:`format_input`) and each
example's task index, e.g. ``lambda t, ids: model.routing(task_ids=torch.tensor(ids))``.
``extra_loss()`` is added to every training step's loss (an O-LoRA penalty, a balancing loss).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from molora.apps.data import TextTask
from molora.encoder import _forward_embed

__all__ = [
    "DEFAULT_TAU",
    "LabelPrototypes",
    "TrainStats",
    "encode_labels",
    "evaluate",
    "format_input",
    "logits",
    "predict",
    "text_classification_loss",
    "train",
]

DEFAULT_TAU = 0.05
BatchContext = Callable[[list[str], list[int]], ContextManager[Any]]


# ---------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------

def format_input(instruction: str, text: str) -> str:
    """The string the encoder sees: ``instruction + " " + text`` (no instruction: the text alone)."""
    return f"{instruction} {text}" if instruction else text


def encode_labels(model: torch.nn.Module, tokenizer: Any, labels: Sequence[str], *,
                  frozen_context: Callable[[], ContextManager[Any]] | None = None, max_length: int = 32) -> Tensor:
    """Label prototypes ``[len(labels), d]``: normalised embeddings of the label strings, no grad,
    computed inside ``frozen_context()`` so they come from the frozen encoder: pass the adapter-off
    context of your wrapper (``model.disable_adapters`` for molora, ``model.disable_adapter`` for
    PEFT), or compute them before any adapter is trained. Not auto-detected: on a plain
    transformers model ``disable_adapters`` is an ordinary method that raises without PEFT adapters."""
    ctx = frozen_context or contextlib.nullcontext
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ctx():
            return _forward_embed(model, tokenizer, list(labels), max_length).cpu()
    finally:
        model.train(was_training)


class LabelPrototypes:
    """Cache of label prototypes by label string (see :func:`encode_labels`).

    Create it before training (or pass ``frozen_context``) so that every prototype comes from the
    frozen encoder; reuse one instance across tasks of a continual run so shared label strings keep
    one fixed prototype.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *,
                 frozen_context: Callable[[], ContextManager[Any]] | None = None, max_length: int = 32) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.frozen_context, self.max_length = frozen_context, max_length
        self._cache: dict[str, Tensor] = {}

    def __call__(self, labels: Sequence[str]) -> Tensor:
        """Prototypes ``[len(labels), d]`` for these label strings, computing the missing ones."""
        missing = [lab for lab in dict.fromkeys(labels) if lab not in self._cache]
        if missing:
            P = encode_labels(self.model, self.tokenizer, missing, frozen_context=self.frozen_context,
                              max_length=self.max_length)
            self._cache.update(zip(missing, P))
        return torch.stack([self._cache[lab] for lab in labels])

    def precompute(self, tasks: Iterable[TextTask]) -> "LabelPrototypes":
        """Embed the labels of all these tasks now (e.g. before any adapter is trained)."""
        self([lab for t in tasks for lab in t.labels])
        return self


def logits(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], instruction: str, label_prototypes: Tensor, *,
           tau: float = DEFAULT_TAU, max_length: int = 64) -> Tensor:
    """Scores ``[len(texts), L]`` = cos(e(instruction + " " + text), P_j) / tau, with grad if enabled.

    Enter any routing context yourself around this call (``train``/``evaluate`` do it for you).
    """
    emb = _forward_embed(model, tokenizer, [format_input(instruction, t) for t in texts], max_length)
    return emb @ label_prototypes.to(emb.device, emb.dtype).T / tau


def text_classification_loss(tokenizer: Any, task: TextTask, *, prototypes: LabelPrototypes | None = None,
                             max_length: int = 64, tau: float | None = None) -> Callable[[Any, list[Any]], Tensor]:
    """``loss_fn(model, batch)`` for :func:`molora.train_router`, on ``(text, label_index)`` examples of ``task``: the mean
    cross-entropy of :func:`logits` over the task's label prototypes.

    Prototypes come from the frozen encoder (computed once, inside ``model.disable_adapters()``)
    unless ``prototypes`` (a :class:`LabelPrototypes`) is given.
    """
    cache: dict[str, Tensor] = {}

    def loss_fn(model: Any, batch: list[Any]) -> Tensor:
        if "P" not in cache:
            protos = prototypes or LabelPrototypes(model, tokenizer, frozen_context=model.disable_adapters)
            cache["P"] = protos(task.labels)
        texts = [t for t, _ in batch]
        ys = torch.tensor([int(y) for _, y in batch])
        lg = logits(model, tokenizer, texts, task.instruction, cache["P"], tau=tau or DEFAULT_TAU, max_length=max_length)
        return F.cross_entropy(lg, ys.to(lg.device))

    return loss_fn


def _as_tasks(tasks: TextTask | Sequence[TextTask]) -> list[TextTask]:
    if isinstance(tasks, TextTask):
        return [tasks]
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, TextTask) for t in tasks):
        raise TypeError("expected a TextTask or a non-empty sequence of TextTask")
    return tasks


def _enter(batch_context: BatchContext | None, texts: list[str], ids: list[int]) -> ContextManager[Any]:
    return batch_context(texts, ids) if batch_context is not None else contextlib.nullcontext()


@dataclass
class TrainStats:
    """What :func:`train` did: per-step losses (task loss + extra loss), step count, wall time."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


def train(model: torch.nn.Module, tokenizer: Any, tasks: TextTask | Sequence[TextTask], *,
          params: Iterable[torch.nn.Parameter] | None = None, epochs: float = 3, lr: float = 1e-3,
          batch_size: int = 32, max_length: int = 64, seed: int = 0, tau: float = DEFAULT_TAU,
          task_ids: Sequence[int] | None = None, prototypes: LabelPrototypes | None = None,
          batch_context: BatchContext | None = None, extra_loss: Callable[[], Tensor] | None = None,
          max_steps: int | None = None, grad_clip: float | None = 1.0, progress: bool = True,
          optimizers: Sequence[torch.optim.Optimizer] | None = None,
          after_step: Callable[[], None] | None = None) -> TrainStats:
    """Train ``params`` (default: all parameters with ``requires_grad``) with AdamW on the
    label-prototype cross-entropy (module docstring), over the train splits of ``tasks`` mixed.

    ``optimizers`` replace AdamW (e.g. :class:`molora.optim.RiemannianSGD` or
    :class:`molora.optim.LoFT` for the experts plus AdamW for the rest; ``lr`` is then theirs);
    each is zeroed and stepped every step, ``params`` are still the ones clipped. ``after_step()``
    runs after the optimizer steps (a projection, e.g. :func:`molora.kinds.project_ard`).

    Each batch may mix tasks: the loss is the mean over examples of the cross-entropy over each
    example's own task's labels. ``task_ids[k]`` (default ``k``) is the index passed to
    ``batch_context`` for examples of ``tasks[k]``. ``epochs`` may be fractional; ``max_steps``
    caps the steps. Deterministic under ``seed``: shuffling uses its own ``random.Random(seed)``
    and dropout runs under a forked, seeded torch RNG (the caller's RNG state is left unchanged).
    The model is put in train mode and restored to its previous mode afterwards.
    """
    from tqdm.auto import tqdm

    tasks = _as_tasks(tasks)
    task_ids = list(range(len(tasks))) if task_ids is None else list(task_ids)
    if len(task_ids) != len(tasks):
        raise ValueError(f"{len(task_ids)} task_ids for {len(tasks)} tasks")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: pass params= or set requires_grad")
    if prototypes is None:
        prototypes = LabelPrototypes(model, tokenizer)
    P = [prototypes(t.labels) for t in tasks]  # before the first step: frozen-encoder prototypes
    examples = [(k, text, y) for k, t in enumerate(tasks) for text, y in t.train]
    if not examples:
        raise ValueError(f"no training examples in tasks {[t.name for t in tasks]}")

    rng = random.Random(seed)
    steps_per_epoch = -(-len(examples) // batch_size)
    total = int(round(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    opts = list(optimizers) if optimizers is not None else [torch.optim.AdamW(params, lr=lr, weight_decay=0.0)]
    if not opts:
        raise ValueError("optimizers: give at least one optimizer (or None for AdamW)")
    stats = TrainStats()
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            order: list[int] = []
            bar = tqdm(range(total), desc=f"train {'+'.join(t.name for t in tasks)}", disable=not progress, leave=False)
            for _ in bar:
                if len(order) < batch_size:
                    fresh = list(range(len(examples)))
                    rng.shuffle(fresh)
                    # Finish the current epoch's leftovers first so every example is seen once per epoch.
                    order = order + fresh
                idx, order = order[:batch_size], order[batch_size:]
                batch = [examples[i] for i in idx]
                inputs = [format_input(tasks[k].instruction, text) for k, text, _ in batch]
                with _enter(batch_context, inputs, [task_ids[k] for k, _, _ in batch]):
                    emb = _forward_embed(model, tokenizer, inputs, max_length)
                loss = emb.new_zeros(())
                for k in sorted({k for k, _, _ in batch}):
                    rows = [i for i, (kk, _, _) in enumerate(batch) if kk == k]
                    ys = torch.tensor([batch[i][2] for i in rows], device=emb.device)
                    lg = emb[rows] @ P[k].to(emb.device).T / tau
                    loss = loss + F.cross_entropy(lg, ys, reduction="sum")
                loss = loss / len(batch)
                if extra_loss is not None:
                    loss = loss + extra_loss()
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                for opt in opts:
                    opt.step()
                if after_step is not None:
                    after_step()
                stats.losses.append(float(loss.detach()))
                stats.steps += 1
                stats.examples += len(batch)
                bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
    finally:
        model.train(was_training)
        stats.seconds = time.perf_counter() - t0
    return stats


def predict(model: torch.nn.Module, tokenizer: Any, task: TextTask, texts: Sequence[str] | None = None, *,
            batch_size: int = 64, max_length: int = 64, tau: float = DEFAULT_TAU, task_index: int = 0,
            prototypes: LabelPrototypes | None = None, batch_context: BatchContext | None = None) -> list[int]:
    """Predicted label indices (argmax of :func:`logits` over ``task.labels``) for ``texts``
    (default: the task's test texts), in eval mode without grad."""
    texts = [t for t, _ in task.test] if texts is None else list(texts)
    prototypes = prototypes or LabelPrototypes(model, tokenizer)
    P = prototypes(task.labels)
    was_training = model.training
    model.eval()
    preds: list[int] = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                inputs = [format_input(task.instruction, t) for t in chunk]
                with _enter(batch_context, inputs, [task_index] * len(chunk)):
                    lg = logits(model, tokenizer, chunk, task.instruction, P, tau=tau, max_length=max_length)
                preds.extend(lg.argmax(-1).tolist())
    finally:
        model.train(was_training)
    return preds


def evaluate(model: torch.nn.Module, tokenizer: Any, task: TextTask, *, batch_size: int = 64, max_length: int = 64,
             task_index: int = 0, prototypes: LabelPrototypes | None = None,
             batch_context: BatchContext | None = None) -> float:
    """Accuracy on ``task.test`` (argmax over the task's labels; ``task_index`` goes to ``batch_context``)."""
    if not task.test:
        raise ValueError(f"task {task.name!r} has no test examples")
    preds = predict(model, tokenizer, task, batch_size=batch_size, max_length=max_length, task_index=task_index,
                    prototypes=prototypes, batch_context=batch_context)
    return sum(int(p == y) for p, (_, y) in zip(preds, task.test)) / len(task.test)
