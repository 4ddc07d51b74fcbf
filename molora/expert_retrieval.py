"""Pick the best single expert for a new task from a few shots: top-1 retrieval by key similarity.

Each expert ``e`` has a key, the mean of its normalised example embeddings
(:meth:`molora.routers.RetrievalRouter.fit_keys`, LoraRetriever). A new task's shots give
a query ``q = mean_i x_i / ||x_i||``; the chosen expert is

    e* = argmax_e cos(q, key_e)

and the model then routes every input to ``e*`` alone. The baseline that few-shot composition
(:func:`molora.train_router`, :func:`molora.lorahub.lorahub`) has to beat: no weights are learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from molora.checks import finite_tensor
from molora.errors import MoLoRAError
from molora.model import MoLoRAModel
from molora.routers import RetrievalRouter, StaticRouter

__all__ = ["retrieve_expert", "route_to_expert"]


def retrieve_expert(keys: RetrievalRouter | Tensor, shot_embeddings: Tensor) -> tuple[int, Tensor]:
    """``(e*, similarities [E])``: the expert whose key is closest (cosine) to the shots' mean
    normalised embedding. ``keys`` is a fitted :class:`RetrievalRouter` or a ``[E, dim]`` tensor."""
    K = keys.keys if isinstance(keys, RetrievalRouter) else keys
    if isinstance(keys, RetrievalRouter) and not bool(keys.fitted.all()):
        raise MoLoRAError("retrieve_expert: every expert of the retrieval router needs a key (fit_keys first)")
    K = finite_tensor(K, "retrieve_expert", "keys")
    emb = finite_tensor(shot_embeddings, "retrieve_expert", "shot_embeddings")
    if emb.dim() == 1:
        emb = emb.unsqueeze(0)
    if K.dim() != 2 or emb.dim() != 2 or emb.shape[1] != K.shape[1] or emb.shape[0] == 0:
        raise MoLoRAError(f"retrieve_expert: keys must be [E, dim] and shots [n >= 1, dim]; got {tuple(K.shape)} and {tuple(emb.shape)}")
    q = F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=0)
    sims = F.normalize(K.float(), dim=-1) @ q
    return int(sims.argmax()), sims


def route_to_expert(model: MoLoRAModel, expert: int | str) -> None:
    """Route every input of ``model`` to one expert (a one-hot static router)."""
    if isinstance(expert, str):
        if expert not in model.expert_names:
            raise MoLoRAError(f"route_to_expert: unknown expert {expert!r}; experts are {model.expert_names}")
        index = model.expert_names.index(expert)
    elif isinstance(expert, int) and not isinstance(expert, bool):
        index = expert
    else:
        raise MoLoRAError(f"route_to_expert: expert must be a name or an int index; got {expert!r}")
    if not 0 <= index < model.num_experts:
        raise MoLoRAError(f"route_to_expert: expert {expert!r} not in {model.expert_names}")
    first = next(iter(model.routed_layers().values()))
    one_hot = [0.0] * model.num_experts
    one_hot[index] = 1.0
    model.set_router(StaticRouter(model.num_experts, first.router_width, weights=one_hot).to(first.bank.device))
