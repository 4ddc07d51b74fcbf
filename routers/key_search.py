"""Searching many expert keys: exact (one GEMM + ``topk``) or approximate (faiss HNSW).

Every retrieval score is affine in the normalised query, ``s_{b,e} = q_b . w_e + c_e`` (cosine:
``w_e = mu_e / ||mu_e||, c_e = 0``; Mahalanobis: ``w_e = S^-1 mu_e, c_e = -1/2 mu_e^T S^-1 mu_e``),
so the top-k keys are a maximum-inner-product search over ``[w_e; c_e]`` with queries
``[q_b; 1]``. Exact search is one ``[B, D] x [D, E]`` GEMM; with 10^5 keys and more an
approximate index answers in time sub-linear in E: :class:`HNSWKeyIndex` (a hierarchical navigable
small-world graph, Malkov & Yashunin, 2018, through the maintained ``faiss`` library, optional:
``pip install faiss-cpu``). The index only proposes candidates; their scores are recomputed exactly
in torch, so the gates of the keys it finds are those of the exact search.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEARCHES = ("exact", "hnsw")


def exact_topk(q: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """``(scores [B, k], indices [B, k])`` of the k largest ``q W + b`` per row."""
    s = q @ weight if bias is None else torch.addmm(bias, q, weight)
    return s.topk(k, dim=-1)


class HNSWKeyIndex:
    """An immutable faiss ``IndexHNSWFlat`` (inner product) over the columns of ``W`` (and ``b``).

    Args:
        weight: ``[D, E]`` key directions; bias: ``[E]`` or None.
        neighbors: graph degree ``M`` (faiss default 32); ef_search: candidates kept per query
            (recall against speed; at least ``k``).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, *, neighbors: int = 32, ef_search: int = 64) -> None:
        try:
            import faiss
        except ImportError as exc:  # an optional dependency: say how to get it
            raise ImportError("search='hnsw' needs faiss: pip install faiss-cpu") from exc
        vectors = weight.T if bias is None else torch.cat([weight.T, bias.unsqueeze(1)], dim=1)
        self.weight, self.bias, self.ef_search = weight, bias, ef_search
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], neighbors, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = max(40, 2 * neighbors)
        self.index.add(vectors.detach().float().cpu().contiguous().numpy())

    def topk(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Approximate ``exact_topk``: candidates from the graph, scores recomputed exactly."""
        import faiss

        queries = q if self.bias is None else torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        _, found = self.index.search(queries.detach().float().cpu().contiguous().numpy(), k, params=params)
        indices = torch.from_numpy(found).to(device=q.device, dtype=torch.long).clamp_min(0)
        w = self.weight.T[indices]                                     # [B, k, D]
        s = torch.einsum("bd,bkd->bk", q.to(w.dtype), w)
        if self.bias is not None:
            s = s + self.bias[indices]
        scores, order = s.sort(dim=-1, descending=True)
        return scores, indices.gather(1, order)
