"""Cluster-conditional routing: k-means over training-example embeddings, one expert per cluster.

    fit:    mu_1..mu_C = KMeans_C({ x_i / ||x_i|| })            (scikit-learn, on training examples)
    route:  c(b) = argmin_c || q_b / ||q_b|| - mu_c ||;   expert(b) = cluster_experts[c(b)]
            g = 1 for expert(b)  (+ gate ``universal_gate`` for the universal expert, if set)

One decision per example, shared by all layers (context level). MoCLE (Gou et al., 2024,
"Mixture of Cluster-conditional LoRA Experts for Vision-language Instruction Tuning"): instructions
are clustered, each cluster trains its own expert, and an always-on *universal expert*
(``universal_expert=e``) is added to every example's cluster expert for generalisation to unseen
instructions. The query comes from the routing signal ``embeddings`` (default; e.g. MiniLM, see
:func:`molora.routers.retrieval.embed_texts`) or the model's pooled hidden states
(``source="hidden"``), as for retrieval routing (:mod:`molora.routers.pooling`).

Buffers ``centroids [C, key_dim]``, ``cluster_experts [C]`` and ``fitted`` are saved with the
model; ``C = num_clusters`` (default: one cluster per non-universal expert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from molora.context import RoutingSignals
from molora.errors import RoutingError

from .base import Router, RoutingDecision, check_choice, check_int, check_positive, check_width
from .pooling import QUERY_SOURCES, query_vectors


class ClusterRouter(Router):
    """k-means cluster -> expert routing with an optional universal expert (MoCLE)."""

    name = "cluster"
    shared = True

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        num_clusters: int | None = None,
        universal_expert: int | None = None,
        universal_gate: float = 1.0,
        source: str = "embeddings",
        key_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(num_experts, d_in)
        if universal_expert is not None:
            check_int(self.name, "universal_expert", universal_expert, 0, num_experts - 1)
        self.universal_expert = universal_expert
        cluster_experts = [e for e in range(num_experts) if e != universal_expert]
        if not cluster_experts:
            raise ValueError(f"router {self.name!r}: needs at least one expert besides universal_expert={universal_expert}")
        self.num_clusters = check_int(self.name, "num_clusters", len(cluster_experts) if num_clusters is None else num_clusters, 1)
        self.universal_gate = check_positive(self.name, "universal_gate", universal_gate)
        self.source = check_choice(self.name, "source", source, QUERY_SOURCES)
        self.key_dim = d_in if key_dim is None else check_int(self.name, "key_dim", key_dim, 1)
        self.seed = int(seed)
        self.register_buffer("centroids", torch.zeros(self.num_clusters, self.key_dim))
        # Default cluster c -> c-th non-universal expert (cyclically when C exceeds them).
        default = [cluster_experts[c % len(cluster_experts)] for c in range(self.num_clusters)]
        self.register_buffer("cluster_experts", torch.tensor(default, dtype=torch.long))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def get_config(self) -> dict[str, Any]:
        return {
            "num_clusters": self.num_clusters, "universal_expert": self.universal_expert,
            "universal_gate": self.universal_gate, "source": self.source, "key_dim": self.key_dim, "seed": self.seed,
        }

    @torch.no_grad()
    def fit(self, embeddings: Tensor, cluster_experts: Sequence[int] | None = None, n_init: int = 4) -> Tensor:
        """Run k-means on ``embeddings [n, key_dim]`` (L2-normalised first); returns each row's cluster.

        ``cluster_experts`` optionally maps cluster c to an expert (default: c-th non-universal one).
        """
        from sklearn.cluster import KMeans

        emb = torch.as_tensor(embeddings)
        check_width(self.name, "embeddings", emb, self.key_dim)
        if emb.shape[0] < self.num_clusters:
            raise ValueError(f"router {self.name!r}: fit needs >= num_clusters={self.num_clusters} embeddings; got {emb.shape[0]}")
        if cluster_experts is not None:
            mapping = [int(e) for e in cluster_experts]
            if len(mapping) != self.num_clusters or not all(0 <= e < self.num_experts for e in mapping):
                raise ValueError(
                    f"router {self.name!r}: cluster_experts must be {self.num_clusters} experts in [0, {self.num_experts}); got {mapping}"
                )
            self.cluster_experts.copy_(torch.tensor(mapping))
        x = F.normalize(emb.detach().float().cpu(), dim=-1).numpy()
        km = KMeans(n_clusters=self.num_clusters, n_init=n_init, random_state=self.seed).fit(x)
        self.centroids.copy_(torch.as_tensor(km.cluster_centers_).to(self.centroids))
        self.fitted.fill_(True)
        return torch.as_tensor(km.labels_, dtype=torch.long)

    def assign(self, query: Tensor) -> Tensor:
        """Nearest centroid (Euclidean, on the normalised query, as k-means assigns) per row."""
        q = F.normalize(query.to(self.centroids.dtype), dim=-1)
        return torch.cdist(q, self.centroids).argmin(dim=-1)

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        if not bool(self.fitted):
            raise RoutingError(f"router {self.name!r}: clusters are not fitted; call fit(embeddings) on training examples first")
        query = check_width(self.name, self.source, query_vectors(self.name, x, signals, self.source), self.key_dim)
        experts = self.cluster_experts[self.assign(query)].unsqueeze(-1)
        gates = torch.ones(experts.shape, device=experts.device)
        if self.universal_expert is not None:
            experts = torch.cat([experts, torch.full_like(experts, self.universal_expert)], dim=-1)
            gates = torch.cat([gates, torch.full_like(gates, self.universal_gate)], dim=-1)
        return RoutingDecision(gates=gates, indices=experts, per_example=True)
