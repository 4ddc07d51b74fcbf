"""Sequence pooling for sequence-level routing: mean of token inputs over the attention mask."""

from __future__ import annotations

from torch import Tensor

from molora.errors import RoutingError

GRANULARITIES = ("token", "sequence")


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
