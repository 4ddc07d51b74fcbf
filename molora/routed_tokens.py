"""Trainable tokens: PEFT's ``trainable_token_indices`` as per-expert copies of embedding rows.

A PEFT adapter saved with ``trainable_token_indices`` carries new values ``V [n, d]`` for the rows
``I`` of an embedding matrix ``W [V, d]`` (PEFT's ``TrainableTokensLayer``: it runs the embedding
with ``W' = W.index_copy(0, I, V)``; where the output embedding shares ``W``, e.g. GPT-2's tied
``lm_head``, it also computes the logits with ``W'``). One adapter's version of the embedding is
therefore the base module with a few rows replaced: :class:`TokenRows` stores just those rows
(not a full copy of ``W``) and :class:`TiedTokenRows` is its tied output layer.

Both serve as an expert's "copy" of the module in :class:`~molora.routed_copies.RoutedCopies`,
which runs each example through its expert's copy (router ``"task"``, or a static/mixture mix),
so task routing equals PEFT with that adapter active, per row of a mixed batch. For a soft mix of
weights ``g_e`` the copies' outputs mix as modules do there: a token ``t`` of ``I_e`` gets
``W[t] + sum_e g_e (V_e[t] - W[t])``, linear in the gates like every routed delta.

    e = TokenRows(embedding, indices=[1, 5, 7], values=V)   # e(x) = embedding(x), rows 1, 5, 7 from V
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molora.errors import MoLoRAError


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose forward is nn.Embedding's (a subclass that rescales its output,
    as Gemma's does, would see its trained rows unscaled)."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


class TokenRows(nn.Module):
    """The base embedding with rows ``indices`` replaced by ``values`` (trainable): one expert's
    trained tokens. Holds only the rows; the base embedding is the model's (not a submodule, so
    not saved again)."""

    def __init__(self, base: nn.Embedding, indices: Sequence[int], values: Tensor, *, name: str = "embedding") -> None:
        super().__init__()
        if not is_plain_embedding(base):
            raise MoLoRAError(f"module {name!r}: trainable tokens need a plain nn.Embedding; got {type(base).__name__}")
        idx = [int(i) for i in indices]
        V, d = base.weight.shape
        if not idx or len(set(idx)) != len(idx) or any(not 0 <= i < V for i in idx):
            raise MoLoRAError(f"module {name!r}: token indices must be distinct ids in [0, {V}); got {idx[:8]}")
        if tuple(values.shape) != (len(idx), d):
            raise MoLoRAError(f"module {name!r}: {len(idx)} trainable tokens need values [{len(idx)}, {d}]; got "
                              f"{list(values.shape)}")
        self._base = [base]
        device = base.weight.device
        self.register_buffer("indices", torch.tensor(idx, dtype=torch.long, device=device), persistent=False)
        order = torch.argsort(self.indices)
        self.register_buffer("sorted_indices", self.indices[order], persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.values = nn.Parameter(values.detach().to(device=device, dtype=base.weight.dtype).clone())

    @property
    def base(self) -> nn.Embedding:
        return self._base[0]

    def weight_rows(self) -> Tensor:
        """The base weight's original rows ``W[I]`` (what the trained rows replace)."""
        return self.base.weight.index_select(0, self.indices)

    @classmethod
    def placeholder(cls, base: nn.Embedding, indices: Sequence[int], *, name: str = "embedding") -> TokenRows:
        """Rows of zeros for ``indices`` (a checkpoint's tensors then give their values)."""
        if not is_plain_embedding(base):
            raise MoLoRAError(f"module {name!r}: trainable tokens need a plain nn.Embedding; got {type(base).__name__}")
        return cls(base, indices, base.weight.new_zeros(len(indices), base.weight.shape[1]), name=name)

    def lookup(self, embedding: nn.Embedding, x: Tensor) -> Tensor:
        """``embedding(x)`` with the trained ids' rows taken from :attr:`values` (as they are)."""
        out = embedding(x)
        # each id's place among the sorted trained ids: a hit takes its trained row
        pos = torch.searchsorted(self.sorted_indices, x).clamp_max(self.sorted_indices.numel() - 1)
        hit = self.sorted_indices[pos] == x
        rows = self.values[self.order[pos]].to(out.dtype)
        return torch.where(hit.unsqueeze(-1), rows, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.lookup(self.base, x)

    def extra_repr(self) -> str:
        return f"tokens={self.indices.numel()}, dim={self.values.shape[1]}"


class TiedTokenRows(nn.Module):
    """A module tied to a :class:`TokenRows`' embedding (its weight *is* ``W``): another
    embedding (T5's ``encoder.embed_tokens`` and ``decoder.embed_tokens`` beside ``shared``) looks
    the trained rows up too, and an output layer (GPT-2's ``lm_head``) takes the logits of the
    trained tokens from them, ``out[..., I] = h V^T``. Reads the rows of ``rows`` (no tensors of
    its own)."""

    def __init__(self, base: nn.Module, rows: TokenRows, *, name: str = "lm_head") -> None:
        super().__init__()
        head = type(base) is nn.Linear and base.bias is None
        if not (head or is_plain_embedding(base)) or base.weight is not rows.base.weight:
            raise MoLoRAError(f"module {name!r}: trained tokens follow into a plain nn.Embedding or a bias-free "
                              f"nn.Linear sharing the embedding's weight; got {type(base).__name__}")
        self.head = head
        self._base = [base]
        self._rows = [rows]

    @property
    def rows(self) -> TokenRows:
        return self._rows[0]

    def forward(self, x: Tensor) -> Tensor:
        rows = self.rows
        if not self.head:  # its own lookup, with the rows of the embedding it is tied to
            return rows.lookup(self._base[0], x)
        out = self._base[0](x)
        cols = x @ rows.values.to(x.dtype).T
        return out.index_copy(out.dim() - 1, rows.indices, cols.to(out.dtype))

    def extra_repr(self) -> str:
        return f"{'logits' if self.head else 'lookup'} of trained tokens: {self.rows.indices.numel()}"
