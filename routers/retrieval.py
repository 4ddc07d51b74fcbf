"""Retrieval routing: each expert has a key embedding; an input goes to the experts whose keys
are most similar to its query.

    key_e   = (1/n_e) sum_i x_i / ||x_i||                  (fit_keys: a few examples of expert e)
    c_{b,e} = cos(q_b, key_e) = <q_b / ||q_b||, key_e / ||key_e||>
    K_b     = argtopk_k(c_b);   g_{b,e} = softmax_{e in K_b}(c_{b,e} / T),  0 outside K_b

One decision per example (context level), shared by all layers. The query ``q`` is

* ``source="embeddings"`` (default): the routing signal ``embeddings [batch, key_dim]`` given by
  the caller, e.g. the frozen all-MiniLM-L6-v2 sentence embedding of the prompt
  (:func:`embed_texts`);
* ``source="hidden"``: the model's own hidden states, i.e. the input of the first routed layer of
  the forward pass pooled over the attention mask (``key_dim`` = that layer's ``d_in``).

Follows LoraRetriever (Zhao et al., 2024; default k = 3), CoLoR and PEFT's Arrow routing. All
keys are compared in one ``[B, key_dim] x [key_dim, E]`` matmul followed by ``topk``, so a bank
of thousands of experts costs one small GEMM per forward (see ``benchmarks/retrieval.py``).

The keys are buffers ``keys [E, key_dim]`` and ``fitted [E]`` (saved with the model); their
shapes follow from the constructor arguments, so a checkpoint rebuilds and loads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from molora.context import RoutingSignals
from molora.errors import RoutingError

from .base import Router, RoutingDecision, check_choice, check_int, check_positive, check_top_k, check_width
from .pooling import QUERY_SOURCES, query_vectors

_ENCODER: tuple[Any, Any] | None = None


def embed_texts(texts: Sequence[str], encoder: tuple[Any, Any] | None = None, batch_size: int = 64) -> Tensor:
    """L2-normalised sentence embeddings ``[len(texts), 384]`` of the shipped all-MiniLM-L6-v2.

    ``encoder`` is a ``(model, tokenizer)`` pair; by default the frozen MiniLM of
    :func:`molora.textcls.load_encoder`, loaded once (lazily: only callers that embed texts
    pay for it).
    """
    from molora.textcls import embed, load_encoder

    global _ENCODER
    if encoder is None:
        if _ENCODER is None:
            _ENCODER = load_encoder()
        encoder = _ENCODER
    model, tokenizer = encoder
    return embed(model, tokenizer, list(texts), batch_size=batch_size)


class RetrievalRouter(Router):
    """Cosine top-k routing of each example to the experts with the closest keys (LoraRetriever)."""

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
    ) -> None:
        super().__init__(num_experts, d_in)
        # LoraRetriever retrieves k = 3 adapters; fewer when the bank is smaller.
        self.top_k = check_top_k(self.name, min(3, num_experts) if top_k is None else top_k, num_experts)
        self.temperature = check_positive(self.name, "temperature", temperature)
        self.source = check_choice(self.name, "source", source, QUERY_SOURCES)
        self.key_dim = d_in if key_dim is None else check_int(self.name, "key_dim", key_dim, 1)
        if self.source == "hidden" and self.key_dim != d_in:
            raise ValueError(f"router {self.name!r}: key_dim must equal d_in={d_in} for source='hidden'; got {key_dim!r}")
        self.register_buffer("keys", torch.zeros(num_experts, self.key_dim))
        self.register_buffer("fitted", torch.zeros(num_experts, dtype=torch.bool))
        self._captured: list[Tensor] | None = None

    def get_config(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature, "source": self.source, "key_dim": self.key_dim}

    # ------------------------------------------------------------------ keys
    def _expert(self, expert: int) -> int:
        if not isinstance(expert, int) or not 0 <= expert < self.num_experts:
            raise ValueError(f"router {self.name!r}: expert must be an int in [0, {self.num_experts}); got {expert!r}")
        return expert

    @torch.no_grad()
    def fit_keys(self, expert: int, embeddings: Tensor) -> Tensor:
        """Set ``key_expert = mean_i(x_i / ||x_i||)`` from a few example embeddings ``[n, key_dim]``."""
        expert = self._expert(expert)
        emb = torch.as_tensor(embeddings)
        if emb.dim() == 1:
            emb = emb.unsqueeze(0)
        check_width(self.name, "embeddings", emb, self.key_dim)
        if emb.shape[0] == 0:
            raise ValueError(f"router {self.name!r}: fit_keys(expert={expert}) got no embeddings")
        key = F.normalize(emb.to(device=self.keys.device, dtype=torch.float32), dim=-1).mean(dim=0)
        self.keys[expert] = key.to(self.keys.dtype)
        self.fitted[expert] = True
        return self.keys[expert]

    @torch.no_grad()
    def set_keys(self, keys: Tensor) -> None:
        """Set all keys at once from ``[E, key_dim]`` (e.g. precomputed); every expert counts as fitted."""
        keys = torch.as_tensor(keys)
        if tuple(keys.shape) != (self.num_experts, self.key_dim):
            raise ValueError(
                f"router {self.name!r}: keys must be [{self.num_experts}, {self.key_dim}]; got shape {tuple(keys.shape)}"
            )
        self.keys.copy_(keys.to(self.keys))
        self.fitted.fill_(True)

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
        """``cos(q_b, key_e)`` for all pairs: ``[B, key_dim] -> [B, E]`` (one matmul)."""
        q = F.normalize(query.to(self.keys.dtype), dim=-1)
        return q @ self._unit_keys().T

    def _unit_keys(self) -> Tensor:
        """``keys / ||keys||``, cached until the keys change: with thousands of experts,
        normalising every key on every forward costs more than the matmul itself."""
        stamp = (self.keys.data_ptr(), self.keys._version, self.keys.dtype)
        if getattr(self, "_unit_stamp", None) != stamp:
            self._unit = F.normalize(self.keys, dim=-1)
            self._unit_stamp = stamp
        return self._unit

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        query = check_width(self.name, self.source, query_vectors(self.name, x, signals, self.source), self.key_dim)
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
        scores, indices = self.similarities(query).topk(self.top_k, dim=-1)
        gates = torch.softmax(scores / self.temperature, dim=-1)
        return RoutingDecision(gates=gates, indices=indices, per_example=True)
