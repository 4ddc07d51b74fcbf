"""Optimizers made for LoRA factors.

- :class:`~molora.optim.loft.LoFT`: LoFT (Tastan et al., 2025, arXiv 2505.21289): AdamW whose
  first and second moments live in the low-rank subspace of each expert, with alternating
  ``A``/``B`` updates; in the full-rank limit it is AdamW on the expert's weight ``s B A``.
- :class:`~molora.optim.riemannian.RiemannianSGD`: Riemannian SGD / Riemannion on fixed-rank
  points (RiemannLoRA, Bogachev et al., 2025), for ``riemann_lora`` experts.
"""

from __future__ import annotations

from .loft import LoFT
from .riemannian import (RiemannianSGD, orthogonalize_tangent, project_lowrank, project_tangent, retract,
                         tangent_from_products, tangent_matrix)

__all__ = ["LoFT", "RiemannianSGD", "orthogonalize_tangent", "project_lowrank", "project_tangent", "retract",
           "tangent_from_products", "tangent_matrix"]
