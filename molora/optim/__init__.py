"""Optimizers made for LoRA factors.

- :class:`~molora.optim.loft.LoFT`: LoFT (Tastan et al., 2025, arXiv 2505.21289): AdamW whose
  first and second moments live in the low-rank subspace of each expert, with alternating
  ``A``/``B`` updates; in the full-rank limit it is AdamW on the expert's weight ``s B A``.
"""

from __future__ import annotations

from .loft import LoFT

__all__ = ["LoFT"]
