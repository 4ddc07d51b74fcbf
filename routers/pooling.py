"""What a router looks at: the token inputs, their masked mean (sequence), or an outside signal.

The one place where routing inputs are pooled or read from the routing signals, so every router
means the same by ``granularity="sequence"`` or ``source="hidden"``:

* ``token``: one decision per position, from the layer input ``x [..., d_in]``;
* ``sequence``: one decision per example, from ``mean_s m_bs x_bs / max(1, sum_s m_bs)`` (the
  masked mean over the attention mask, :func:`pool_sequence`);
* ``context``: one decision per example, from the routing signal ``embeddings [batch, dim]``
  given by the caller (e.g. a frozen sentence encoder's embedding of the prompt).
"""

from __future__ import annotations

from torch import Tensor

from molora.context import RoutingSignals
from molora.errors import RoutingError

GRANULARITIES = ("token", "sequence", "context")
#: Where a context-level router (retrieval, cluster) takes its query from.
QUERY_SOURCES = ("embeddings", "hidden")


def pool_sequence(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Masked mean over the sequence axis: ``x [B, S, d] -> [B, d]``.

    ``pooled_b = sum_s m_bs x_bs / max(1, sum_s m_bs)``; without a mask all positions count.
    A 2-D input ``[B, d]`` is one token per example and is returned as is.
    """
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise RoutingError(f"sequence-level routing needs an input [batch, seq, dim]; got shape {tuple(x.shape)}")
    if attention_mask is None or attention_mask.shape != x.shape[:2]:
        # A cached generation step sees only the newest position(s): the mask then covers the
        # whole sequence so far and does not apply to this input.
        return x.mean(dim=1)
    m = attention_mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def routing_input(router: str, x: Tensor, signals: RoutingSignals, granularity: str) -> tuple[Tensor, bool]:
    """The rows a router scores, and whether they are per example: ``(rows [n, d], per_example)``.

    ``token``: ``x`` flattened to ``[tokens, d_in]``; ``sequence``: the masked mean ``[B, d_in]``;
    ``context``: the routing signal ``embeddings [B, dim]`` (a RoutingError if it is missing).
    """
    if granularity == "token":
        return x.reshape(-1, x.shape[-1]), False
    if granularity == "sequence":
        return pool_sequence(x, signals.attention_mask), True
    if granularity == "context":
        emb = signals.embeddings
        if emb is None:
            raise RoutingError(
                f"router {router!r} with granularity='context' needs embeddings: wrap the call in "
                "`with model.routing(embeddings=...)`"
            )
        return emb, True
    raise ValueError(f"router {router!r}: granularity must be one of {GRANULARITIES}; got {granularity!r}")


def query_vectors(router: str, x: Tensor, signals: RoutingSignals, source: str) -> Tensor:
    """Per-example query ``[B, dim]`` of a context-level router (retrieval, cluster).

    ``embeddings``: the caller's routing signal (e.g. MiniLM sentence embeddings); ``hidden``: the
    model's own hidden states, i.e. the first routed layer's input pooled over the attention mask.
    """
    return routing_input(router, x, signals, "context" if source == "embeddings" else "sequence")[0]
