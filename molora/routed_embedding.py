"""Routed LoRA experts on an ``nn.Embedding`` (PEFT's ``lora.Embedding``, as a mixture).

PEFT's Embedding LoRA (``lora_embedding_A [r, V]``, ``lora_embedding_B [d, r]``) adds to the
base embedding of token id ``i``

    delta(i) = s B A[:, i] = s * F.embedding(i, A^T) @ B^T

so with E experts behind a router (Hu et al., 2021; routed as in MoLoRA / LoRAMoE):

    y(i) = W0[i] + sum_e g_e(i) s_e B_e A_e[:, i]

The shrink is a row gather of every expert's ``A^T`` at once (``[T, E r]``), the expand the
kernels' dense gate-and-expand (:mod:`molora.routed_rank`). The router scores the token's base
embedding ``W0[i]`` (``d_router = embedding_dim``); shared routers (task ids, ...) decide per
example. As in PEFT, LoRA dropout does not apply to an embedding and a scalar ``embed_scale``
of the base layer (Gemma's scaled embeddings) scales the delta too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from molora.errors import MoLoRAError
from molora.routed_rank import RoutedRankLayer


class RoutedEmbedding(RoutedRankLayer):
    """A frozen ``nn.Embedding`` with a bank of LoRA experts (``A_e [r_e, V]``, ``B_e [d, r_e]``)
    behind a router; arguments as :class:`~molora.layer.RoutedLoRALinear`.

    The base layer's ``padding_idx`` holds as in ``F.embedding``: the padding row's experts'
    columns get no gradient. ``max_norm`` (which renormalises the looked-up rows, and PEFT's
    LoRA factors with them, in place) and ``scale_grad_by_freq`` are refused.
    """

    @staticmethod
    def _check_base(base_layer: nn.Module, name: str) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise MoLoRAError(f"module {name!r}: RoutedEmbedding wraps an nn.Embedding; got {type(base_layer).__name__}")
        if base_layer.max_norm is not None:
            raise MoLoRAError(f"module {name!r}: nn.Embedding with max_norm={base_layer.max_norm} renormalises the rows "
                              "it looks up in place (PEFT: the LoRA factors too); molora routes embeddings without max_norm")
        if base_layer.scale_grad_by_freq:
            raise MoLoRAError(f"module {name!r}: nn.Embedding with scale_grad_by_freq=True is not supported "
                              "(the experts' gradients would not be scaled by it)")

    @staticmethod
    def router_dim(base_layer: nn.Module) -> int:
        """The router scores the token's base embedding: ``embedding_dim``."""
        return base_layer.embedding_dim

    def peft_factors(self, A: Tensor, B: Tensor) -> dict[str, Tensor]:
        return {"lora_embedding_A": A, "lora_embedding_B": B}

    # the wrapped layer's face (model code reads these on its embeddings)
    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def _shrink(self, x: Tensor, result: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        ids = x.reshape(-1)
        if A.dim() == 2:  # a shared A [r, V]: one [T, r] gather
            h = A.index_select(1, ids).T
        else:  # [E, r, V] -> the columns of every expert at once: [T, E r]
            h = A.index_select(2, ids).permute(2, 0, 1).reshape(ids.shape[0], -1)
        pad = self.base_layer.padding_idx
        if pad is not None and h.requires_grad:  # F.embedding's padding_idx: no gradient into that row
            h = torch.where((ids == pad).unsqueeze(1), h.detach(), h)
        return h, result

    def _add_delta(self, result: Tensor, delta: Tensor) -> Tensor:
        scale = _embed_scale(self.base_layer)
        if scale is not None:
            delta = delta * scale.to(device=delta.device, dtype=delta.dtype)
        return result + delta.view(result.shape)


def _embed_scale(base: nn.Module) -> Tensor | None:
    """The base embedding's scalar ``embed_scale`` (scaled embeddings apply it in their forward),
    else ``None``; as PEFT, a non-scalar one is not applied."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(float(scale))
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return scale.reshape(())
    return None
