"""Retrieval over many keys: the HNSW index (faiss) against exact search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from molora.context import RoutingSignals
from molora.routers import RetrievalRouter

pytest.importorskip("faiss")


def routers(metric: str, E: int = 3000, D: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(E, D, generator=g), dim=-1)
    kw = {"covariance": torch.eye(D) * 0.5 + 0.02 * torch.ones(D, D), "count": 50} if metric == "mahalanobis" else {}
    pair = [RetrievalRouter(E, D, top_k=4, metric=metric, search=s, ef_search=400) for s in ("exact", "hnsw")]
    for r in pair:
        r.set_keys(keys, **kw)
    queries = keys[torch.randint(0, E, (40,), generator=g)] + 0.2 * torch.randn(40, D, generator=g)
    return pair, queries


@pytest.mark.parametrize("metric", ["cosine", "mahalanobis"])
def test_wide_hnsw_search_finds_the_exact_top_keys_and_gates(metric):
    (exact, hnsw), q = routers(metric)
    a, b = exact(q, RoutingSignals(embeddings=q)), hnsw(q, RoutingSignals(embeddings=q))
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.gates, a.gates, atol=1e-6, rtol=1e-6)


def test_index_follows_new_keys():
    (exact, hnsw), q = routers("cosine")
    hnsw(q, RoutingSignals(embeddings=q))
    new = F.normalize(torch.randn(exact.keys.shape, generator=torch.Generator().manual_seed(5)), dim=-1)
    for r in (exact, hnsw):
        r.set_keys(new)
    assert torch.equal(hnsw(q, RoutingSignals(embeddings=q)).indices, exact(q, RoutingSignals(embeddings=q)).indices)


def test_search_is_part_of_the_config_and_checked():
    (_, hnsw), _ = routers("cosine", E=10)
    assert hnsw.get_config()["search"] == "hnsw"
    with pytest.raises(ValueError, match="search"):
        RetrievalRouter(4, 8, search="annoy")
