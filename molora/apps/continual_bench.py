"""Run a continual-learning strategy over a task order and measure the accuracy matrix ``R``.

Used by ``benchmarks/continual.py`` and ``molora continual``. The model is the shipped
all-MiniLM-L6-v2 with the label-prototype classifier of :mod:`molora.apps.textcls` (no per-task head:
a text is scored against the frozen embeddings of its task's label names, the input is the task's
instruction followed by the text, as in O-LoRA's prompts). LoRA adapts ``query``/``value`` of the
top ``L - frozen_layers`` layers; the frozen bottom is computed once per text
(:class:`~molora.apps.prefix_cache.FrozenPrefixCache`) and shared by every strategy.

Strategies (same encoder, data and step budget):

* ``seqlora``, ``inclora``, ``olora``, ``retrieval``: trained task after task; after each task
  every task's test split is evaluated, giving ``R[i][j]``; ACC/BWT/FWT from
  :func:`molora.continual.metrics.summarize` (FWT against the untrained encoder's accuracies).
* ``multitask``: one LoRA trained once on all tasks mixed, for as many epochs (so the same number of
  steps as a sequential run); its ``R`` is the one row of final accuracies and it has no BWT.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from molora.apps.data import TextTask, load_task_folder
from molora.apps.textcls import LabelPrototypes, evaluate, format_input, train

from molora.apps.prefix_cache import FrozenPrefixCache
from molora.continual import IncLoRAManager, OLoRAManager, RetrievalExpertsManager, SeqLoRAManager
from molora.continual.manager import ContinualManager
from molora.continual.metrics import summarize

__all__ = ["ORDERS", "STRATEGIES", "RunConfig", "build_cache", "format_table", "load_order", "make_manager", "run_strategy",
           "untrained_accuracies"]

STRATEGIES = ("seqlora", "inclora", "olora", "retrieval", "multitask")
#: Task orders of the data README (standard-4 without Yahoo, and the long order over 11 tasks).
ORDERS = {
    "standard4-1": ["dbpedia", "amazon", "yelp", "agnews"],
    "standard4-2": ["dbpedia", "amazon", "agnews", "yelp"],
    "standard4-3": ["yelp", "amazon", "agnews", "dbpedia"],
    "long": ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "sst2", "dbpedia", "agnews", "multirc"],
}


@dataclasses.dataclass
class RunConfig:
    """Budget and hyper-parameters, the same for every strategy (defaults: the benchmark's)."""

    frozen_layers: int = 4          # LoRA on layers 4-5 of 6; layers 0-3 cached
    target_modules: tuple[str, ...] = ("query", "value")
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    epochs: float = 2.0
    batch_size: int = 16
    lr: float = 2e-3
    max_length: int = 64
    train_limit: int | None = 500
    test_limit: int | None = 200
    l1: float = 0.5                 # O-LoRA's orthogonality weight (paper: 0.5)
    l2: float = 0.0
    key_examples: int = 256         # retrieval: inputs per task that make its key
    metric: str = "mahalanobis"     # retrieval: key score (cosine, or LDA under the pooled covariance)
    shrinkage: float = 0.3          # retrieval: of that covariance towards a scaled identity
    top_k: int = 1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def load_order(data_dir: str | Path, order: Sequence[str], cfg: RunConfig) -> list[TextTask]:
    """The tasks of ``order`` from a clbench-format folder, subsampled to the config's limits."""
    order = list(order)
    if len(order) < 2 or len(set(order)) != len(order):
        raise ValueError(f"continual order must name at least 2 distinct tasks; got {order}")
    return load_task_folder(data_dir, order, train_limit=cfg.train_limit, test_limit=cfg.test_limit, seed=cfg.seed)


def build_cache(tasks: Sequence[TextTask], cfg: RunConfig, encoder: tuple[Any, Any] | None = None,
                progress: bool = True) -> tuple[FrozenPrefixCache, LabelPrototypes]:
    """Cache the frozen layers for every input of ``tasks`` and the frozen label prototypes."""
    from molora.encoder import load_encoder

    model, tokenizer = encoder or load_encoder()
    texts = [format_input(t.instruction, x) for t in tasks for x, _ in t.train + t.test]
    cache = FrozenPrefixCache(model, tokenizer, texts, frozen_layers=cfg.frozen_layers, max_length=cfg.max_length,
                              progress=progress)
    protos = LabelPrototypes(model, tokenizer).precompute(tasks)
    return cache, protos


def make_manager(strategy: str, base: torch.nn.Module, cfg: RunConfig, cache: FrozenPrefixCache | None = None) -> ContinualManager:
    """The manager of ``strategy`` (``multitask`` uses SeqLoRA with one task) on ``base``."""
    common = dict(target_modules=list(cfg.target_modules), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, seed=cfg.seed)
    if strategy in ("seqlora", "multitask"):
        return SeqLoRAManager(base, **common)
    if strategy == "inclora":
        return IncLoRAManager(base, **common)
    if strategy == "olora":
        return OLoRAManager(base, l1=cfg.l1, l2=cfg.l2, **common)
    if strategy == "retrieval":
        embed_fn = cache.query_embeddings if cache is not None else None
        key_dim = cache.embeddings.shape[1] if cache is not None else 384
        return RetrievalExpertsManager(base, top_k=cfg.top_k, key_examples=cfg.key_examples, embed_fn=embed_fn,
                                       key_dim=key_dim, metric=cfg.metric, shrinkage=cfg.shrinkage, **common)
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def _accuracies(manager: ContinualManager | None, model: torch.nn.Module, tok: Any, tasks: Sequence[TextTask],
                protos: LabelPrototypes, cfg: RunConfig) -> list[float]:
    ctx = None
    if manager is not None:
        ctx = lambda inputs, ids: manager.routing(texts=inputs)  # noqa: E731 - inference: no task id
    return [evaluate(model, tok, t, max_length=cfg.max_length, prototypes=protos, batch_context=ctx) for t in tasks]


def run_strategy(strategy: str, tasks: Sequence[TextTask], cache: FrozenPrefixCache, protos: LabelPrototypes,
                 cfg: RunConfig, *, untrained: Sequence[float] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``strategy`` over ``tasks`` in order; returns ``acc``, ``bwt``, ``fwt``, ``forgetting``,
    ``R`` (fractions), ``seconds`` and, for retrieval, ``task_id_acc``."""
    from tqdm.auto import tqdm

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    t0 = time.perf_counter()
    tok = cache.tokenizer
    manager = make_manager(strategy, cache.top_model(), cfg, cache)
    train_kw = dict(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, max_length=cfg.max_length,
                    prototypes=protos, progress=progress)
    if strategy == "multitask":
        model = manager.begin_task("multitask")
        train(model, tok, list(tasks), params=manager.trainable_parameters(), seed=cfg.seed, **train_kw)
        manager.end_task()
        row = _accuracies(manager, model, tok, tasks, protos, cfg)
        out: dict[str, Any] = {"acc": sum(row) / len(row), "bwt": None, "fwt": None, "forgetting": None, "R": [row]}
    else:
        R = []
        for i, task in enumerate(tqdm(tasks, desc=strategy, disable=not progress)):
            kw = {}
            if strategy == "retrieval":
                kw["examples"] = [format_input(task.instruction, x) for x, _ in task.train[: cfg.key_examples]]
            model = manager.begin_task(task.name, **kw)
            train(model, tok, task, params=manager.trainable_parameters(), seed=cfg.seed + i,
                  extra_loss=manager.penalty, **train_kw)
            manager.end_task()
            R.append(_accuracies(manager, model, tok, tasks, protos, cfg))
        out = {**summarize(R, untrained=untrained), "R": R}
        if strategy == "retrieval":
            out["task_id_acc"] = manager.task_identification(
                {t.name: [format_input(t.instruction, x) for x, _ in t.test] for t in tasks})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def untrained_accuracies(tasks: Sequence[TextTask], cache: FrozenPrefixCache, protos: LabelPrototypes,
                         cfg: RunConfig) -> list[float]:
    """``b_j``: each task's accuracy with the frozen encoder (zero-shot label-name similarity)."""
    return _accuracies(None, cache.top_model(), cache.tokenizer, tasks, protos, cfg)


def _pts(v: float | None) -> str:
    return "     -" if v is None else f"{100 * v:6.1f}"


def format_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """``results[order][strategy]`` -> a text table of ACC, BWT, FWT, task identification (points)."""
    lines = [f"{'order':<12} {'strategy':<10} {'ACC':>6} {'BWT':>6} {'FWT':>6} {'taskID':>6} {'sec':>6}"]
    for order, per in results.items():
        for s, r in per.items():
            lines.append(f"{order:<12} {s:<10} {_pts(r['acc'])} {_pts(r['bwt'])} {_pts(r.get('fwt'))} "
                         f"{_pts(r.get('task_id_acc'))} {r['seconds']:6.0f}")
    lines.append("(ACC, BWT, FWT and task identification in points = 100 x fraction; sec = wall-clock seconds)")
    return "\n".join(lines)
