"""Riemannian optimisation on the manifold of fixed-rank matrices, for RiemannLoRA experts
(Bogachev et al., 2025, arXiv 2507.12142; geometry as in Absil, Mahony & Sepulchre 2008,
Vandereycken 2013, Absil & Oseledets 2015).

A point is ``X = U S V^T`` (``U [m, r]``, ``V [n, r]`` orthonormal columns, ``S [r, r]``). Its
tangent space holds ``xi = dA V^T + U dB^T`` with ``U^T dA = 0`` (the paper's eq. 5, rank <= 2 r),
and the orthogonal projection of an ambient ``Z`` onto it is (eq. 6)

    P_T(Z) = U U^T Z + Z V V^T - U U^T Z V V^T,    dA = (I - U U^T) Z V,  dB = Z^T U.

The Riemannian gradient is ``P_T(G)`` for the Euclidean gradient ``G = dL/dX`` (eq. 7); it needs
only ``G V`` and ``G^T U``, which a RiemannLoRA bank's probes deliver from the ordinary backward.
The retraction is the truncated SVD ``R(X + xi) = SVD_r(X + xi)`` (eq. 8), formed without any
``[m, n]`` matrix: ``X + xi = [U | dA] [[S, I], [I, 0]] [V | dB]^T``, so with the reduced QRs
``[U | dA] = Q_1 R_1`` and ``[V | dB] = Q_2 R_2`` it is the rank-r SVD of the ``2r x 2r`` core
``R_1 [[S, I], [I, 0]] R_2^T``, lifted by ``Q_1``, ``Q_2``: ``O((m + n) r^2 + r^3)``. The new ``U``,
``V`` are orthonormal to round-off at every step, and ``X + xi`` is rank ``r`` whenever its
truncation is, whatever ``S`` was (also ``S = 0``). Momentum lives in a tangent space and is moved
to the next one by the projection transport ``T(M) = P_{T_new}(M)`` (eq. 9), computed from the
stored low-rank factors of ``M`` (the paper's ProjectLR, Algorithm 2).

:class:`RiemannianSGD` implements the paper's optimisers: Riemannian SGD with heavy-ball momentum
(eqs. 10-11: ``M_t = beta T(M_{t-1}) + G_t``, ``X_{t+1} = R(X_t - lr M_t)``), with ``dampening``
as torch's SGD (``dampening = momentum`` is Algorithm 6's ``beta M + (1 - beta) G``), its
"simulate Adam" option (Algorithm 6 lines 11-13: each of ``dA``, ``dB`` divided by a running
average of its Frobenius norm) and Riemannion (Algorithms 1, 2, 4: the direction replaced by
``P_T(Ortho_2r(M))``, its non-zero singular values set to 1, a Muon step on the manifold), and
weight decay as a tangent term ``wd * X`` (Algorithm 4 line 12). The momentum kept is the raw
``M_t``, before normalisation or orthogonalisation (as SGD, Adam and Muon keep theirs; the
paper's listings do not mark the distinction). Every quantity is built from the point as a
matrix, never from its factors, so a step does not depend on which orthonormal bases represent
``X``: the same ``X`` factored as ``(U Q_1, Q_1^T S Q_2, V Q_2)`` takes the same step.

All of it is computed in float32 (float64 for float64 factors) and written back in the factors'
dtype. No official code of the paper was found in the stored public corpus: this follows its
text and the references above; what the paper leaves open (which momentum is kept, weight decay
``wd * X``) is said where it is decided.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molora.errors import MoLoRAError

Products = tuple[Tensor, Tensor]  # (G V, G^T U)


# ---------------------------------------------------------------------------------------------- geometry
def tangent_from_products(U: Tensor, GV: Tensor, GtU: Tensor) -> tuple[Tensor, Tensor]:
    """The Riemannian gradient ``P_T(G) = dA V^T + U dB^T`` from ``G V`` and ``G^T U``:
    ``dA = G V - U (U^T G V)`` (so ``U^T dA = 0``), ``dB = G^T U``."""
    return GV - U @ (U.mT @ GV), GtU


def project_tangent(U: Tensor, V: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``P_T(G)`` of a dense ``G [m, n]`` at the point with bases ``U``, ``V`` (as ``(dA, dB)``)."""
    return tangent_from_products(U, G @ V, G.mT @ U)


def project_lowrank(U: Tensor, V: Tensor, L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """``P_T(L R^T)`` for a low-rank ``Z = L R^T`` (the paper's ProjectLR): ``dA = (L - U U^T L)(R^T V)``,
    ``dB = R (L^T U)``; ``O((m + n) k r)`` for ``k`` columns of ``L``, ``R``."""
    return (L - U @ (U.mT @ L)) @ (R.mT @ V), R @ (L.mT @ U)


def tangent_matrix(U: Tensor, V: Tensor, dA: Tensor, dB: Tensor) -> Tensor:
    """The dense ``[m, n]`` tangent vector ``dA V^T + U dB^T`` (for checks; the optimiser never forms it)."""
    return dA @ V.mT + U @ dB.mT


def retract(U: Tensor, S: Tensor, V: Tensor, dA: Tensor, dB: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``SVD_r(U S V^T + dA V^T + U dB^T)`` as ``(U', sigma', V')`` (``sigma'`` the r largest singular
    values, descending): two reduced QRs of ``[m, 2r]``, ``[n, 2r]`` and one SVD of the ``2r x 2r``
    core (module docstring). Batched over leading dimensions."""
    r = U.shape[-1]
    Q1, R1 = torch.linalg.qr(torch.cat([U, dA], dim=-1), mode="reduced")
    Q2, R2 = torch.linalg.qr(torch.cat([V, dB], dim=-1), mode="reduced")
    eye = torch.eye(r, dtype=S.dtype, device=S.device).expand_as(S)
    M = torch.cat([torch.cat([S, eye], dim=-1), torch.cat([eye, torch.zeros_like(S)], dim=-1)], dim=-2)
    Uc, sigma, Vch = torch.linalg.svd(R1 @ M @ R2.mT)
    return Q1 @ Uc[..., :r], sigma[..., :r], Q2 @ Vch[..., :r, :].mT


def orthogonalize_tangent(U: Tensor, V: Tensor, dA: Tensor, dB: Tensor, *, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Riemannion's direction ``P_T(Ortho_2r(xi))`` for ``xi = dA V^T + U dB^T`` (the paper's OrthoLR,
    Algorithm 1, then ProjectLR): the compact SVD of ``xi`` from the QRs of ``[dA | U]``, ``[V | dB]``
    and a ``2r x 2r`` SVD, its singular values above ``rtol * sigma_max`` set to 1 (those below to
    0, so a rank-deficient ``xi`` gains no directions), projected back onto the tangent space."""
    Q1, R1 = torch.linalg.qr(torch.cat([dA, U], dim=-1), mode="reduced")
    Q2, R2 = torch.linalg.qr(torch.cat([V, dB], dim=-1), mode="reduced")
    Uc, sigma, Vch = torch.linalg.svd(R1 @ R2.mT)
    keep = (sigma > rtol * sigma.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(sigma.dtype).tiny)).to(sigma.dtype)
    L = Q1 @ (Uc * keep.unsqueeze(-2))
    return project_lowrank(U, V, L, Q2 @ Vch.mT)


# ---------------------------------------------------------------------------------------------- optimiser
class _Point:
    """One point the optimiser moves: a bank expert (its gradient from the probes) or a given triple."""

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, bank: Any = None, expert: int = -1) -> None:
        self.U, self.S, self.V, self.bank, self.expert = U, S, V, bank, expert


class RiemannianSGD(torch.optim.Optimizer):
    """Riemannian SGD / heavy-ball / Riemannion on fixed-rank points (module docstring).

    Args:
        points: a model (every ``riemann_lora`` expert with trainable probes), RiemannLoRA banks,
            or ``(U, S, V)`` triples of tensors (updated in place; ``U, V`` orthonormal columns).
        lr: the step size ``eta``.
        momentum: ``beta`` of the heavy-ball term (0: plain Riemannian SGD).
        dampening: the gradient enters as ``(1 - dampening) G`` (torch's SGD convention).
        weight_decay: ``wd``: the tangent direction gets ``+ wd * X`` (decays the point).
        normalize: Algorithm 6's "simulate Adam": ``dA / S_A``, ``dB / S_B`` with
            ``S <- norm_beta ||.||_F + (1 - norm_beta) S``.
        norm_beta: ``gamma`` of that running norm.
        orthogonalize: Riemannion (the direction becomes ``P_T(Ortho_2r(M))``).
        eps: floor of the running norms.

    ``step(grads=None)``: bank experts read ``(G V, G^T U)`` from their probes' gradients (an
    expert without gradient this step is skipped); triples need ``grads``, one entry per triple in
    order: a dense ``G [m, n]`` or a ``(G V, G^T U)`` pair. ``zero_grad()`` clears the probes'
    gradients. ``param_groups`` hold the probes (banks) or ``U, S, V`` (triples), so learning-rate
    schedulers work; ``state_dict()`` holds the momentum factors.
    """

    def __init__(self, points: nn.Module | Iterable[Any], lr: float, *, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, normalize: bool = False, norm_beta: float = 0.1,
                 orthogonalize: bool = False, eps: float = 1e-12) -> None:
        for name, value, low, high in (("lr", lr, 0.0, math.inf), ("momentum", momentum, 0.0, 1.0),
                                       ("dampening", dampening, 0.0, 1.0), ("weight_decay", weight_decay, 0.0, math.inf),
                                       ("norm_beta", norm_beta, 0.0, 1.0), ("eps", eps, 0.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise MoLoRAError(f"RiemannianSGD: {name} must be a finite number in [{low}, {high}]; got {value!r}")
        if normalize and norm_beta == 0:
            raise MoLoRAError("RiemannianSGD: normalize needs norm_beta > 0")
        self._points = _collect(points)
        if not self._points:
            raise MoLoRAError("RiemannianSGD: no trainable riemann_lora expert or (U, S, V) triple was given")
        params: list[Tensor] = []
        for p in self._points:
            params += p.bank.expert_parameters(p.expert) if p.bank is not None else [p.U, p.S, p.V]
        defaults = {"lr": float(lr), "momentum": float(momentum), "dampening": float(dampening),
                    "weight_decay": float(weight_decay), "normalize": bool(normalize), "norm_beta": float(norm_beta),
                    "orthogonalize": bool(orthogonalize), "eps": float(eps)}
        super().__init__(params, defaults)

    def _key(self, p: _Point) -> Tensor:
        return p.bank.Z_left[p.expert] if p.bank is not None else p.U

    @torch.no_grad()
    def step(self, closure: Any = None, grads: Sequence[Tensor | Products] | None = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        triples = [p for p in self._points if p.bank is None]
        if triples and (grads is None or len(grads) != len(triples)):
            raise MoLoRAError(f"RiemannianSGD.step: {len(triples)} (U, S, V) triples need grads= with one gradient each; "
                              f"got {None if grads is None else len(grads)}")
        given = iter(grads or ())
        for bank in {id(p.bank): p.bank for p in self._points if p.bank is not None}.values():
            bank.check_probes()
        group = self.param_groups[0]
        # a bank's experts of one rank step together: one batched QR / SVD per bank, not one per expert
        batches: dict[tuple, list[tuple[_Point, Products]]] = {}
        for i, p in enumerate(self._points):
            if p.bank is not None:
                products = p.bank.euclidean_products(p.expert)
                if products is None or not p.bank.Z_left[p.expert].requires_grad:
                    continue  # no tokens reached it (or frozen since): nothing to step on
                key = (id(p.bank), p.U.shape[-1])
            else:
                products, key = _products(next(given), p), ("triple", i)
            batches.setdefault(key, []).append((p, products))
        for batch in batches.values():
            self._step_batch([p for p, _ in batch], [g for _, g in batch], group)
        return loss

    def _step_batch(self, points: list[_Point], products: list[Products], group: dict[str, Any]) -> None:
        """One step of ``k`` points of equal shapes, as ``[k, ., .]`` batches."""
        first = points[0]
        dtype = torch.float64 if first.U.dtype == torch.float64 else torch.float32

        def stacked(ts: Iterable[Tensor]) -> Tensor:
            return torch.stack([t.detach().to(dtype) for t in ts])

        U, S, V = stacked(p.U for p in points), stacked(p.S for p in points), stacked(p.V for p in points)
        GV, GtU = stacked(g[0] for g in products), stacked(g[1] for g in products)
        if not (torch.isfinite(GV).all() and torch.isfinite(GtU).all()):
            raise MoLoRAError(f"RiemannianSGD: the gradient of {_name(first)} (or of an expert stepped with it) holds "
                              "NaN/inf; nothing was stepped for them")
        dA, dB = tangent_from_products(U, GV, GtU)
        states = [self.state[self._key(p)] for p in points]
        beta = group["momentum"]
        if beta:
            have = ["L" in st for st in states]
            if any(have):  # transport the last directions onto these tangent spaces
                L = torch.stack([st["L"].to(dtype) if h else torch.zeros_like(torch.cat([dA[0], U[0]], -1))
                                 for st, h in zip(states, have)])
                R = torch.stack([st["R"].to(dtype) if h else torch.zeros_like(torch.cat([V[0], dB[0]], -1))
                                 for st, h in zip(states, have)])
                mA, mB = project_lowrank(U, V, L, R)
                keep = 1 - group["dampening"]
                dA = beta * mA + torch.where(_col(have, dA), keep, 1.0) * dA
                dB = beta * mB + torch.where(_col(have, dB), keep, 1.0) * dB
            # kept as ambient factors M = [dA | U] [V | dB]^T, so the next point can project it
            L, R = torch.cat([dA, U], dim=-1), torch.cat([V, dB], dim=-1)
            for i, st in enumerate(states):
                st["L"], st["R"] = L[i].clone(), R[i].clone()
        if group["normalize"]:
            g, zero = group["norm_beta"], torch.zeros((), dtype=dtype, device=U.device)
            nA = g * dA.flatten(-2).norm(dim=-1) + (1 - g) * torch.stack([st.get("norm_A", zero) for st in states])
            nB = g * dB.flatten(-2).norm(dim=-1) + (1 - g) * torch.stack([st.get("norm_B", zero) for st in states])
            for i, st in enumerate(states):
                st["norm_A"], st["norm_B"] = nA[i].clone(), nB[i].clone()
            dA = dA / nA.clamp_min(group["eps"])[:, None, None]
            dB = dB / nB.clamp_min(group["eps"])[:, None, None]
        if group["orthogonalize"]:
            dA, dB = orthogonalize_tangent(U, V, dA, dB)
        if group["weight_decay"]:
            dB = dB + group["weight_decay"] * (V @ S.mT)  # X = U (V S^T)^T lies in its own tangent space
        lr = group["lr"]
        U2, sigma, V2 = retract(U, S, V, -lr * dA, -lr * dB)
        S2 = torch.diag_embed(sigma)
        for i, p in enumerate(points):
            if p.bank is not None:
                p.bank.set_point_(p.expert, U2[i], S2[i], V2[i])
            else:
                for dst, src in ((p.U, U2[i]), (p.S, S2[i]), (p.V, V2[i])):
                    dst.copy_(src)


def _col(flags: list[bool], like: Tensor) -> Tensor:
    """``flags`` as a ``[k, 1, 1]`` boolean tensor (per point of a batch)."""
    return torch.tensor(flags, device=like.device).view(-1, 1, 1)


def _name(p: _Point) -> str:
    return f"expert {p.expert} of a riemann_lora bank" if p.bank is not None else "a (U, S, V) triple"


def _products(g: Tensor | Products, p: _Point) -> Products:
    m, n = p.U.shape[-2], p.V.shape[-2]
    if isinstance(g, Tensor):
        if tuple(g.shape[-2:]) != (m, n):
            raise MoLoRAError(f"RiemannianSGD.step: a dense gradient must be [{m}, {n}]; got {list(g.shape)}")
        G = g.detach().to(p.U.dtype)
        return G @ p.V.detach(), G.mT @ p.U.detach()
    GV, GtU = g
    if tuple(GV.shape) != tuple(p.U.shape) or tuple(GtU.shape) != tuple(p.V.shape):
        raise MoLoRAError(f"RiemannianSGD.step: (G V, G^T U) must be {list(p.U.shape)} and {list(p.V.shape)}; "
                          f"got {list(GV.shape)} and {list(GtU.shape)}")
    return GV, GtU


def _collect(points: Any) -> list[_Point]:
    from molora.kinds.riemann_lora import RiemannLoRABank

    out: list[_Point] = []

    def add_bank(bank: RiemannLoRABank) -> None:
        out.extend(_Point(*bank.point(e), bank=bank, expert=e) for e in range(bank.num_experts)
                   if bank.Z_left[e].requires_grad)

    if isinstance(points, RiemannLoRABank):
        add_bank(points)
        return out
    if isinstance(points, nn.Module):
        for m in points.modules():
            if isinstance(m, RiemannLoRABank):
                add_bank(m)
        return out
    for item in points:
        if isinstance(item, RiemannLoRABank):
            add_bank(item)
        elif isinstance(item, (tuple, list)) and len(item) == 3 and all(isinstance(t, Tensor) for t in item):
            U, S, V = item
            r = U.shape[-1]
            if U.dim() != 2 or V.dim() != 2 or V.shape[-1] != r or tuple(S.shape) != (r, r):
                raise MoLoRAError(f"RiemannianSGD: a triple must be U [m, r], S [r, r], V [n, r]; got "
                                  f"{list(U.shape)}, {list(S.shape)}, {list(V.shape)}")
            out.append(_Point(U, S, V))
        else:
            raise MoLoRAError(f"RiemannianSGD: points must be a model, RiemannLoRA banks or (U, S, V) triples; "
                              f"got {type(item).__name__}")
    return out
