"""Cache the frozen bottom of a BERT-style encoder: adapters on the top layers only, every text's
lower-layer hidden states computed once and reused by every strategy, epoch and evaluation.

With LoRA on the top ``L - k`` layers only, the first ``k`` layers (and the embeddings) see no
adapter, so their output ``h_k(x)`` is the same for every strategy and every step. The cache runs
the frozen encoder once over all texts and keeps, per text, ``h_k(x)`` (real tokens only) and the
frozen sentence embedding ``normalize(mean_pool(h_L(x)))`` (the retrieval query). The top
model then runs layers ``k..L-1`` on ``h_k(x)`` and returns ``last_hidden_state`` as the full
encoder would (equal up to float rounding: padding is masked out of attention and pooling).

:attr:`FrozenPrefixCache.tokenizer` and :meth:`FrozenPrefixCache.top_model` stand in for the real
tokenizer and encoder in :mod:`molora.apps.textcls` (``train``, ``evaluate``): the stand-in tokenizer
maps each cached text to its cache row (carried in ``input_ids[:, 0]``) and its length.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrozenPrefixCache"]


class FrozenPrefixCache:
    """Frozen hidden states after the first ``frozen_layers`` layers, and frozen sentence embeddings.

    Args:
        encoder: a BERT-style ``transformers`` encoder (``.encoder.layer`` list); not modified.
        tokenizer: its tokenizer.
        texts: every string the encoder will see (duplicates are stored once).
        frozen_layers: ``k``, the number of bottom layers that carry no adapter (``0 <= k < L``).
        max_length: truncation length (tokens) of every text.
        batch_size: texts per frozen forward while filling the cache.
        progress: show a progress bar.
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any, texts: Sequence[str], *, frozen_layers: int,
                 max_length: int = 64, batch_size: int = 64, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        from molora.encoder import mean_pool

        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"FrozenPrefixCache: {type(encoder).__name__} has no .encoder.layer list (BERT-style encoder)")
        if not isinstance(frozen_layers, int) or not 0 <= frozen_layers < len(layers):
            raise ValueError(f"FrozenPrefixCache: frozen_layers must be an int in [0, {len(layers)}); got {frozen_layers!r}")
        unique = list(dict.fromkeys(texts))
        if not unique:
            raise ValueError("FrozenPrefixCache: no texts to cache")
        self.encoder, self.frozen_layers, self.max_length = encoder, frozen_layers, max_length
        self.index = {t: i for i, t in enumerate(unique)}
        d = encoder.config.hidden_size
        self.hidden = torch.zeros(len(unique), max_length, d)
        self.lengths = torch.zeros(len(unique), dtype=torch.long)
        self.embeddings = torch.zeros(len(unique), d)
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                for i in tqdm(range(0, len(unique), batch_size), desc=f"cache frozen layers 0-{frozen_layers - 1}",
                              disable=not progress, leave=False):
                    chunk = unique[i:i + batch_size]
                    enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                    out = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
                    mask = enc["attention_mask"]
                    S = mask.shape[1]
                    self.hidden[i:i + len(chunk), :S] = out.hidden_states[frozen_layers].float() * mask.unsqueeze(-1)
                    self.lengths[i:i + len(chunk)] = mask.sum(1)
                    self.embeddings[i:i + len(chunk)] = F.normalize(mean_pool(out.last_hidden_state.float(), mask), dim=-1)
        finally:
            encoder.train(was_training)
        self.tokenizer = _CacheTokenizer(self)

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, texts: Sequence[str]) -> Tensor:
        """Cache rows of ``texts`` (a ValueError names the first text that was not cached)."""
        try:
            return torch.tensor([self.index[t] for t in texts], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(f"FrozenPrefixCache: text not in the cache: {str(exc.args[0])[:80]!r}") from None

    def query_embeddings(self, texts: Sequence[str]) -> Tensor:
        """Frozen normalised sentence embeddings ``[len(texts), d]`` (all-MiniLM's own pipeline)."""
        return self.embeddings[self.rows(texts)]

    def top_model(self) -> nn.Module:
        """A fresh copy of the top layers ``k..L-1`` reading this cache (wrap it with molora)."""
        return _TopEncoder(self, copy.deepcopy(self.encoder.encoder.layer[self.frozen_layers:]), self.encoder.config)


class _CacheTokenizer:
    """Tokenizer stand-in: ``input_ids[:, 0]`` = cache row, ``attention_mask`` from the cached length."""

    def __init__(self, cache: FrozenPrefixCache) -> None:
        self.cache = cache

    def __call__(self, texts: Sequence[str], *, padding: bool = True, truncation: bool = True,
                 max_length: int | None = None, return_tensors: str = "pt") -> dict[str, Tensor]:
        if max_length is not None and max_length != self.cache.max_length:
            raise ValueError(f"FrozenPrefixCache: texts were cached at max_length={self.cache.max_length}; "
                             f"asked for {max_length}")
        rows = self.cache.rows(list(texts))
        lengths = self.cache.lengths[rows]
        S = int(lengths.max())
        mask = (torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = torch.zeros(len(rows), S, dtype=torch.long)
        ids[:, 0] = rows
        return {"input_ids": ids, "attention_mask": mask}


class _TopEncoder(nn.Module):
    """Layers ``k..L-1`` of the encoder applied to cached ``h_k``; returns ``last_hidden_state``."""

    def __init__(self, cache: FrozenPrefixCache, layers: nn.ModuleList, config: Any) -> None:
        super().__init__()
        self._cache = [cache]  # not a submodule: the cache holds no parameters
        self.layer = layers
        self.config = config
        self.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        from transformers.masking_utils import create_bidirectional_mask
        from transformers.modeling_outputs import BaseModelOutput

        cache = self._cache[0]
        S = attention_mask.shape[1]
        device = next(self.layer.parameters()).device
        h = cache.hidden[input_ids[:, 0].cpu(), :S].to(device)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask.to(h.device))
        for layer in self.layer:
            h = layer(h, mask)
        return BaseModelOutput(last_hidden_state=h)
