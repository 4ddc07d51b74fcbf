"""Retrieval experts: one expert per task, chosen per example by retrieval, no task id.

Each task trains a new expert of the bank (a plain LoRA, or a HydraLoRA head ``B_t`` on a shared
``A`` that is frozen after the first task) while every earlier expert is frozen, so earlier
tasks' parameters cannot drift. During the task only the new expert is active (static one-hot
gates). At the end of the task its retrieval key is set from a few of the task's inputs,

    key_t = mean_i q(x_i) / ||q(x_i)||        (q: a frozen sentence encoder, e.g. all-MiniLM-L6-v2)

and inference routes each example to the experts with the most similar keys
(:class:`molora.routers.RetrievalRouter`: top-k, softmax over the kept scores / T). The score is
the cosine, or (``metric="mahalanobis"``) the linear discriminant under the pooled within-task
covariance of the key examples, accumulated task by task from each task's mean and scatter, so
no earlier task's inputs are kept (FeCAM, Goswami et al., 2023). Tasks that share an instruction
and a register, such as Amazon and Yelp reviews, are told apart much better that way.
With ``top_k = 1`` an example correctly identified uses exactly its task's expert, which was
frozen when the task ended: forgetting can only come from misidentified examples.
:meth:`RetrievalExpertsManager.task_identification` reports how often the top-1 expert is the
example's own task.

Follows LoraRetriever (Zhao et al., 2024) and CoLoR for the keys; HydraLoRA (Tian et al., 2024)
for the shared-A layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ContextManager

import torch
from torch import Tensor

from molora.checks import finite_number, finite_tensor, positive_int
from molora.routers import RetrievalRouter, StaticRouter
from molora.routers.retrieval import METRICS, key_statistics

from .manager import MANAGERS, ContinualError, ContinualManager

__all__ = ["RetrievalExpertsManager"]

EmbedFn = Callable[[Sequence[str]], Tensor]


def _default_embed(texts: Sequence[str]) -> Tensor:
    from molora.routers.retrieval import embed_texts

    return embed_texts(texts)


class RetrievalExpertsManager(ContinualManager):
    """A retrieval-routed expert per task (module docstring).

    Args:
        shared_a: HydraLoRA layout (one shared ``A``, one head ``B_t`` per task).
        top_k, temperature: of the retrieval router (``top_k`` is capped by the number of experts).
        key_examples: how many of a task's inputs make its key (the first ones given).
        metric, shrinkage: of the retrieval router (``"cosine"`` or ``"mahalanobis"``).
        embed_fn: texts -> query embeddings ``[n, key_dim]`` (default: the frozen MiniLM,
            :func:`molora.routers.retrieval.embed_texts`); not saved, pass it again on resume.
        key_dim: width of the query embeddings (384 for MiniLM).
        Other arguments: :class:`~molora.continual.manager.ContinualManager`.
    """

    strategy = "retrieval"

    def __init__(self, base_model: torch.nn.Module, *, shared_a: bool = False, top_k: int = 1,
                 temperature: float = 1.0, key_examples: int = 32, key_dim: int = 384,
                 embed_fn: EmbedFn | None = None, metric: str = "cosine", shrinkage: float = 0.3,
                 **kwargs: Any) -> None:
        where = type(self).__name__
        top_k = positive_int(top_k, where, "top_k", error=ContinualError)
        key_examples = positive_int(key_examples, where, "key_examples", error=ContinualError)
        key_dim = positive_int(key_dim, where, "key_dim", error=ContinualError)
        temperature = finite_number(temperature, where, "temperature", low=0.0, low_open=True, error=ContinualError)
        if metric not in METRICS:
            raise ContinualError(f"{type(self).__name__}: metric must be one of {METRICS}; got {metric!r}")
        shrinkage = finite_number(shrinkage, where, "shrinkage", low=0.0, high=1.0, low_open=True, error=ContinualError)
        super().__init__(base_model, **kwargs)
        self.metric, self.shrinkage = metric, float(shrinkage)
        self.shared_a, self.top_k, self.temperature = bool(shared_a), top_k, float(temperature)
        self.key_examples, self.key_dim = key_examples, int(key_dim)
        self.embed_fn: EmbedFn = embed_fn or _default_embed
        self.keys: list[Tensor] = []  # one per finished task, in task order
        # Pooled within-task scatter of all finished tasks' key examples, and how many there were.
        self._scatter = torch.zeros(self.key_dim, self.key_dim, dtype=torch.float64)
        self._count = 0
        self._pending: tuple[Tensor, Tensor, int] | None = None
        self._retrieval: RetrievalRouter | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "shared_a": self.shared_a, "top_k": self.top_k, "temperature": self.temperature,
                "key_examples": self.key_examples, "key_dim": self.key_dim, "metric": self.metric,
                "shrinkage": self.shrinkage}

    # ------------------------------------------------------------------ task hooks
    def _embed(self, texts: Sequence[str] | None, embeddings: Tensor | None) -> Tensor:
        if (texts is None) == (embeddings is None):
            raise ContinualError(f"{type(self).__name__}: give texts or embeddings (exactly one)")
        source = "embed_fn(texts)" if embeddings is None else "embeddings"
        emb = self.embed_fn(list(texts)) if embeddings is None else embeddings
        emb = finite_tensor(emb, type(self).__name__, f"query {source}", error=ContinualError)
        if emb.dim() != 2 or emb.shape[1] != self.key_dim or emb.shape[0] == 0:
            raise ContinualError(f"{type(self).__name__}: query embeddings must be [n >= 1, key_dim={self.key_dim}]; "
                                 f"got shape {tuple(emb.shape)}")
        return emb.float()

    def _check_begin(self, name: str, examples: Sequence[str] | Tensor | None = None, **kwargs: Any) -> None:
        super()._check_begin(name, **kwargs)
        if examples is None:
            raise ContinualError(f"{type(self).__name__}.begin_task({name!r}) needs examples=: a few of the task's "
                                 "inputs (texts, or their query embeddings) to make its retrieval key")
        # Embed now (before anything changes) so bad examples leave the manager untouched.
        self._pending = self._key_from(examples)

    def _key_from(self, examples: Sequence[str] | Tensor) -> tuple[Tensor, Tensor, int]:
        if isinstance(examples, Tensor):
            emb = self._embed(None, examples[: self.key_examples])
        else:
            emb = self._embed(list(examples)[: self.key_examples], None)
        return key_statistics(emb)

    def _begin(self, name: str, examples: Any = None, **kwargs: Any) -> None:
        extra = {"shared_a": True} if self.shared_a else {}
        idx = self._add_expert(name, **extra)
        model = self.model
        # Train the new expert alone: one-hot static gates (no routing signal needed in the loop).
        onehot = [1.0 if i == idx else 0.0 for i in range(model.num_experts)]
        model.set_router(StaticRouter(model.num_experts, model.shared_router.d_in, weights=onehot).to(self._zero().device))

    def _end(self, name: str) -> None:
        mu, scatter, n = self._pending
        self.keys.append(mu.float())
        self._scatter, self._count = self._scatter + scatter.cpu(), self._count + n
        self._pending = None
        self._freeze(name)
        self._install_router()

    def _freeze(self, name: str) -> None:
        self.model.set_experts_trainable(False, [name])
        for layer in self.model.routed_layers().values():
            if layer.bank.A_shared is not None:  # HydraLoRA: the shared A would move earlier experts
                layer.bank.A_shared.requires_grad_(False)

    def _install_router(self) -> None:
        model = self.model
        router = RetrievalRouter(model.num_experts, model.shared_router.d_in, top_k=min(self.top_k, model.num_experts),
                                 temperature=self.temperature, source="embeddings", key_dim=self.key_dim,
                                 metric=self.metric, shrinkage=self.shrinkage)
        if self.metric == "mahalanobis":
            router.set_keys(torch.stack(self.keys), covariance=self._scatter / self._count, count=self._count)
        else:
            router.set_keys(torch.stack(self.keys))
        self._retrieval = router.to(self._zero().device)
        model.set_router(self._retrieval)

    # ------------------------------------------------------------------ inference
    def routing(self, texts: Sequence[str] | None = None, embeddings: Tensor | None = None) -> ContextManager[Any]:
        """``with manager.routing(texts=batch_texts):`` routes the forwards inside by retrieval."""
        return self.model.routing(embeddings=self._embed(texts, embeddings))

    def identify(self, texts: Sequence[str] | None = None, embeddings: Tensor | None = None) -> list[str]:
        """The top-1 retrieved task of each input."""
        if not self.keys:
            raise ContinualError(f"{type(self).__name__}: no finished task to retrieve")
        # The installed router of the finished tasks (during a task the model routes one-hot).
        scores = self._retrieval.similarities(self._embed(texts, embeddings).to(self._zero().device))
        return [self.tasks[i] for i in scores.argmax(-1).tolist()]

    def task_identification(self, inputs: dict[str, Sequence[str] | Tensor]) -> float:
        """Fraction of inputs whose top-1 retrieved expert is their own task's:
        ``inputs = {task name: texts or query embeddings}``."""
        hits = total = 0
        for task, x in inputs.items():
            pred = self.identify(embeddings=x) if isinstance(x, Tensor) else self.identify(texts=x)
            hits += sum(p == task for p in pred)
            total += len(pred)
        if total == 0:
            raise ContinualError(f"{type(self).__name__}: task_identification got no inputs")
        return hits / total

    # ------------------------------------------------------------------ persistence
    def _restore(self, extra: dict[str, Any]) -> None:
        if self._model is None:
            return
        router = self._retrieval = self.model.shared_router
        # The router checked its keys as they were loaded (RetrievalRouter._load_from_state_dict).
        self.keys = [router.keys[i].detach().clone() for i in range(router.num_experts)]
        if self.metric == "mahalanobis":
            self._count = int(router.cov_count)
            self._scatter = router.covariance.detach().double().cpu() * self._count
        for name in self.tasks:
            self._freeze(name)


MANAGERS[RetrievalExpertsManager.strategy] = RetrievalExpertsManager
