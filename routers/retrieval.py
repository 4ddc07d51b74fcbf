"""Retrieval routing: each expert has a key embedding; an input goes to the experts whose keys
are most similar to its query.

    key_e   = mu_e = (1/n_e) sum_i x_i / ||x_i||            (fit_keys: a few examples of expert e)
    K_b     = argtopk_k(s_b);   g_{b,e} = softmax_{e in K_b}(s_{b,e} / T),  0 outside K_b

with one of two scores ``s``:

* ``metric="cosine"`` (default; LoraRetriever): ``s_{b,e} = cos(q_b, mu_e)``;
* ``metric="mahalanobis"`` (linear discriminant analysis): the log-likelihood, up to a constant
  per query, of ``q_b / ||q_b||`` under a Gaussian per expert with mean ``mu_e`` and one shared
  covariance,

      s_{b,e} = -1/2 (q_b - mu_e)^T S^-1 (q_b - mu_e) + 1/2 q_b^T S^-1 q_b
              = q_b^T S^-1 mu_e - 1/2 mu_e^T S^-1 mu_e,
      S = (1 - a) C + a (tr C / D) I,   C = sum_e sum_i (x_i - mu_e)(x_i - mu_e)^T / sum_e n_e,

  where ``C`` is the pooled within-expert covariance of the key examples and ``a`` the
  ``shrinkage`` towards a scaled identity (needed: a few hundred examples in 384 dimensions give
  a singular ``C``). Whitening by ``C`` discounts the directions every text varies along (length,
  style, the shared instruction) and keeps those that separate the experts: tasks that share an
  instruction and a topic style (Amazon vs Yelp reviews, DBpedia vs AG News) are told apart far
  better than by cosine (``benchmarks/continual.py``). ``C`` is built from sufficient statistics
  only (each expert's mean and scatter), so experts can be added one at a time without keeping
  earlier examples, as in FeCAM (Goswami et al., 2023) and RanPAC (McDonnell et al., 2023).

One decision per example (context level), shared by all layers. The query ``q`` is

* ``source="embeddings"`` (default): the routing signal ``embeddings [batch, key_dim]`` given by
  the caller, e.g. the frozen all-MiniLM-L6-v2 sentence embedding of the prompt
  (:func:`embed_texts`);
* ``source="hidden"``: the model's own hidden states, i.e. the input of the first routed layer of
  the forward pass pooled over the attention mask (``key_dim`` = that layer's ``d_in``).

Follows LoraRetriever (Zhao et al., 2024; default k = 3) and CoLoR. (Arrow, which needs no
example data and routes each token by the experts' singular vectors, is
:mod:`molora.routers.arrow`.) All
keys are compared in one ``[B, key_dim] x [key_dim, E]`` matmul followed by ``topk``, so a bank
of thousands of experts costs one small GEMM per forward (see ``benchmarks/retrieval.py``).

The keys are buffers ``keys [E, key_dim]`` and ``fitted [E]``, plus ``covariance [key_dim,
key_dim]`` and ``cov_count []`` for the Mahalanobis metric (all saved with the model); their
shapes follow from the constructor arguments, so a checkpoint rebuilds and loads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from molora.checks import finite_number, finite_tensor
from molora.context import RoutingSignals
from molora.errors import CheckpointError, RoutingError

from .base import (Router, RoutingDecision, check_choice, check_int, check_positive, check_probability, check_top_k,
                   check_width)
from .key_search import SEARCHES, HNSWKeyIndex, exact_topk
from .pooling import QUERY_SOURCES, query_vectors

_ENCODER: tuple[Any, Any] | None = None


def embed_texts(texts: Sequence[str], encoder: tuple[Any, Any] | None = None, batch_size: int = 64) -> Tensor:
    """L2-normalised sentence embeddings ``[len(texts), 384]`` of the shipped all-MiniLM-L6-v2.

    ``encoder`` is a ``(model, tokenizer)`` pair; by default the frozen MiniLM of
    :func:`molora.encoder.load_encoder`, loaded once (lazily: only callers that embed texts
    pay for it).
    """
    from molora.encoder import embed, load_encoder

    global _ENCODER
    if encoder is None:
        if _ENCODER is None:
            _ENCODER = load_encoder()
        encoder = _ENCODER
    model, tokenizer = encoder
    return embed(model, tokenizer, list(texts), batch_size=batch_size)


METRICS = ("cosine", "mahalanobis")


def key_statistics(embeddings: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(mu, scatter, n)`` of ``n`` example embeddings ``[n, D]`` after L2 normalisation:
    ``mu = mean_i x_i/||x_i||`` and ``scatter = sum_i (x_i/||x_i|| - mu)(x_i/||x_i|| - mu)^T``
    (float64), the sufficient statistics of a key and its share of the pooled covariance."""
    x = F.normalize(torch.as_tensor(embeddings).double(), dim=-1)
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred, x.shape[0]


class RetrievalRouter(Router):
    """Top-k routing of each example to the experts with the closest keys, by cosine
    (LoraRetriever) or by the Mahalanobis distance under a shared covariance (LDA); module docstring."""

    name = "retrieval"
    shared = True
    # Continual learning grows the bank: a new expert starts with a zero, unfitted key.
    expert_dims = {"keys": 0, "fitted": 0}

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        top_k: int | None = None,
        temperature: float = 1.0,
        source: str = "embeddings",
        key_dim: int | None = None,
        metric: str = "cosine",
        shrinkage: float = 0.3,
        search: str = "exact",
        ef_search: int = 64,
    ) -> None:
        super().__init__(num_experts, d_in)
        # LoraRetriever retrieves k = 3 adapters; fewer when the bank is smaller.
        self.top_k = check_top_k(self.name, min(3, num_experts) if top_k is None else top_k, num_experts)
        self.temperature = check_positive(self.name, "temperature", finite_number(temperature, f"router {self.name!r}", "temperature"))
        self.source = check_choice(self.name, "source", source, QUERY_SOURCES)
        self.key_dim = d_in if key_dim is None else check_int(self.name, "key_dim", key_dim, 1)
        if self.source == "hidden" and self.key_dim != d_in:
            raise ValueError(f"router {self.name!r}: key_dim must equal d_in={d_in} for source='hidden'; got {key_dim!r}")
        self.register_buffer("keys", torch.zeros(num_experts, self.key_dim))
        self.register_buffer("fitted", torch.zeros(num_experts, dtype=torch.bool))
        self.metric = check_choice(self.name, "metric", metric, METRICS)
        self.shrinkage = check_probability(self.name, "shrinkage", shrinkage)
        self.search = check_choice(self.name, "search", search, SEARCHES)
        self.ef_search = check_int(self.name, "ef_search", ef_search, 1)
        if self.metric == "mahalanobis":
            # Pooled within-expert covariance C of the key examples and how many examples made it.
            self.register_buffer("covariance", torch.zeros(self.key_dim, self.key_dim))
            self.register_buffer("cov_count", torch.zeros((), dtype=torch.long))
        self._captured: list[Tensor] | None = None

    def get_config(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature, "source": self.source, "key_dim": self.key_dim,
                "metric": self.metric, "shrinkage": self.shrinkage, "search": self.search, "ef_search": self.ef_search}

    # ------------------------------------------------------------------ keys
    def _expert(self, expert: int) -> int:
        if not isinstance(expert, int) or not 0 <= expert < self.num_experts:
            raise ValueError(f"router {self.name!r}: expert must be an int in [0, {self.num_experts}); got {expert!r}")
        return expert

    @torch.no_grad()
    def fit_keys(self, expert: int, embeddings: Tensor) -> Tensor:
        """Set ``key_expert = mean_i(x_i / ||x_i||)`` from a few example embeddings ``[n, key_dim]``.

        With ``metric="mahalanobis"`` the examples' scatter around that key is also added to the
        pooled covariance, so fit each expert once (refitting would count its examples twice).
        """
        expert = self._expert(expert)
        emb = torch.as_tensor(embeddings)
        if emb.dim() == 1:
            emb = emb.unsqueeze(0)
        check_width(self.name, "embeddings", emb, self.key_dim)
        finite_tensor(emb, f"router {self.name!r}: fit_keys(expert={expert})", "embeddings", error=RoutingError)
        if emb.shape[0] == 0:
            raise ValueError(f"router {self.name!r}: fit_keys(expert={expert}) got no embeddings")
        mu, scatter, n = key_statistics(emb.to(self.keys.device))
        self.keys[expert] = mu.to(self.keys.dtype)
        self.fitted[expert] = True
        if self.metric == "mahalanobis":
            total = self.covariance.double() * int(self.cov_count) + scatter
            self.cov_count += n
            self.covariance.copy_(total / int(self.cov_count))
        return self.keys[expert]

    @torch.no_grad()
    def set_keys(self, keys: Tensor, covariance: Tensor | None = None, count: int | None = None) -> None:
        """Set all keys at once from ``[E, key_dim]`` (e.g. precomputed); every expert counts as fitted.

        ``covariance [key_dim, key_dim]`` (the pooled within-expert covariance ``C``) and ``count``
        (the number of examples behind it) are required with ``metric="mahalanobis"``.
        """
        keys = finite_tensor(keys, f"router {self.name!r}: set_keys", "keys", error=RoutingError)
        if tuple(keys.shape) != (self.num_experts, self.key_dim):
            raise ValueError(
                f"router {self.name!r}: keys must be [{self.num_experts}, {self.key_dim}]; got shape {tuple(keys.shape)}"
            )
        if self.metric == "mahalanobis":
            if covariance is None or count is None:
                raise ValueError(f"router {self.name!r}: metric='mahalanobis' needs set_keys(keys, covariance=, count=)")
            covariance = finite_tensor(covariance, f"router {self.name!r}: set_keys", "covariance", error=RoutingError)
            if tuple(covariance.shape) != (self.key_dim, self.key_dim):
                raise ValueError(f"router {self.name!r}: covariance must be [{self.key_dim}, {self.key_dim}]; "
                                 f"got shape {tuple(covariance.shape)}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"router {self.name!r}: count must be an int >= 1; got {count!r}")
            self.covariance.copy_(covariance.to(self.covariance))
            self.cov_count.fill_(count)
        elif covariance is not None:
            raise ValueError(f"router {self.name!r}: covariance is only used with metric='mahalanobis'")
        self.keys.copy_(keys.to(self.keys))
        self.fitted.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        # A checkpoint's keys and covariance are checked as they are loaded: NaN/inf there would
        # make every similarity NaN and the routing silently arbitrary.
        for name in ("keys", "covariance"):
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor):
                finite_tensor(t, f"router {self.name!r}", f"checkpoint tensor {prefix + name!r}", error=CheckpointError)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit_keys_from_texts(self, expert: int, texts: Sequence[str], encoder: tuple[Any, Any] | None = None) -> Tensor:
        """:meth:`fit_keys` from texts embedded by the frozen MiniLM (:func:`embed_texts`)."""
        return self.fit_keys(expert, embed_texts(texts, encoder))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Tensor]]:
        """Collect the queries of the forwards inside the block instead of routing them.

        The forwards run with all gates 0 (the base model alone), so keys can be fitted from the
        model's own hidden states before any key exists::

            with router.capture() as queries:
                model(**batch_of_expert_3)
            router.fit_keys(3, torch.cat(queries))
        """
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    # ------------------------------------------------------------------ routing
    def similarities(self, query: Tensor) -> Tensor:
        """The scores ``s_{b,e}`` of the metric (module docstring) for all pairs:
        ``[B, key_dim] -> [B, E]`` (one matmul)."""
        q = F.normalize(query.to(self.keys.dtype), dim=-1)
        weight, bias = self._scoring()
        return q @ weight if bias is None else torch.addmm(bias, q, weight)

    def top_keys(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """``(scores [B, top_k], experts [B, top_k])``: the best keys by :attr:`search` (exact, or
        candidates from an HNSW index over the keys, rebuilt when the keys change; see
        :mod:`molora.routers.key_search`)."""
        q = F.normalize(query.to(self.keys.dtype), dim=-1)
        weight, bias = self._scoring()
        if self.search == "exact":
            return exact_topk(q, weight, bias, self.top_k)
        stamp, index = getattr(self, "_index", (None, None))
        if stamp is not weight:  # built from this scoring (a new one whenever the keys change)
            index = HNSWKeyIndex(weight, bias, ef_search=self.ef_search)
            self._index = (weight, index)  # one assignment: a concurrent reader sees old or new whole
        return index.topk(q, self.top_k)

    def _scoring(self) -> tuple[Tensor, Tensor | None]:
        """``(W [key_dim, E], b [E] or None)`` with ``s = q W + b``, cached until the keys or the
        covariance change: with thousands of experts, preparing the keys on every forward costs
        more than the matmul itself."""
        stamp = (self.keys.data_ptr(), self.keys._version, self.keys.dtype)
        if self.metric == "mahalanobis":
            stamp += (self.covariance.data_ptr(), self.covariance._version)
        cached = getattr(self, "_scoring_state", None)
        if cached is None or cached[0] != stamp:
            if self.metric == "cosine":
                scoring = (F.normalize(self.keys, dim=-1).T, None)
            else:
                C = self.covariance.double()
                D = C.shape[0]
                S = (1 - self.shrinkage) * C + self.shrinkage * (C.trace() / D) * torch.eye(D, dtype=C.dtype, device=C.device)
                if float(S.trace()) <= 0:  # no spread yet (one example per expert): fall back to the identity
                    S = torch.eye(D, dtype=C.dtype, device=C.device)
                mu = self.keys.double()
                P_mu = torch.linalg.solve(S, mu.T)  # [D, E] = S^-1 mu_e
                bias = -0.5 * (mu * P_mu.T).sum(-1)
                scoring = (P_mu.to(self.keys.dtype), bias.to(self.keys.dtype))
            cached = self._scoring_state = (stamp, scoring)  # one assignment: threads see old or new whole
        return cached[1]

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        query = check_width(self.name, self.source, query_vectors(self.name, x, signals, self.source), self.key_dim)
        if self.source == "embeddings":  # the caller's signal; hidden states are the model's own
            finite_tensor(query, f"router {self.name!r}", "the routing signal embeddings", error=RoutingError)
        if self._captured is not None:
            self._captured.append(query.detach().float().cpu())
            zeros = torch.zeros(query.shape[0], self.num_experts, device=query.device)
            return RoutingDecision(gates=zeros, per_example=True)
        if not bool(self.fitted.all()):
            missing = (~self.fitted).nonzero().flatten().tolist()
            raise RoutingError(
                f"router {self.name!r}: experts {missing[:10]}{'...' if len(missing) > 10 else ''} have no key; "
                "call fit_keys(expert, embeddings) (or set_keys) first"
            )
        scores, indices = self.top_keys(query)
        gates = torch.softmax(scores / self.temperature, dim=-1)
        return RoutingDecision(gates=gates, indices=indices, per_example=True)
