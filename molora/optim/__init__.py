"""Optimisers that are not plain torch ones: Riemannian SGD/Riemannion on fixed-rank points
(:mod:`molora.optim.riemannian`, for ``riemann_lora`` experts)."""

from .riemannian import (RiemannianSGD, orthogonalize_tangent, project_lowrank, project_tangent, retract,
                         tangent_from_products, tangent_matrix)

__all__ = ["RiemannianSGD", "orthogonalize_tangent", "project_lowrank", "project_tangent", "retract",
           "tangent_from_products", "tangent_matrix"]
