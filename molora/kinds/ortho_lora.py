"""Ortho-LoRA experts, the weight parametrisation of T-LoRA (Soboleva et al., 2025, "T-LoRA: Single
Image Diffusion Model Customization Without Overfitting", arXiv 2507.05964; official code
ControlGenAI/T-LoRA, its ``OrthogonalLoRALinearLayer``).

An expert of rank r is

    delta W_e = P_e diag(lambda_e) Q_e - P0_e diag(lambda0_e) Q0_e,

``P [d_out, r]``, ``lambda [r]``, ``Q [r, d_in]`` trainable, started from singular triples of a
random Gaussian matrix (orthonormal columns of ``P`` and rows of ``Q``), and ``P0, lambda0, Q0`` a
frozen copy of that start, so the delta is zero at init whatever the (non-zero) start is: exactly
in the factors and in merging (:meth:`OrthoLoRABank.delta_weight`), to an FMA's rounding of one
product in the routed kernel (the two terms are two channels of one GEMM there).

**T-LoRA = this kind + the timestep rank mask.** The mask ``r(t) = floor(((T - t) / T)^a (r_max -
r_min)) + r_min`` keeps rank channels ``j < r(t)`` of *both* terms (the official forward multiplies
``Q x * lambda`` and ``Q0 x * lambda0`` by the same mask). In molora the mask is the ``"tlora"``
router over ``r_max`` rank-1 experts (:class:`molora.routers.timestep.TLoRARouter`): expert ``j`` *is*
channel ``j``, its gate ``g_j(t) = [j < r(t)]`` multiplies its whole delta, trained and frozen term
alike, so a masked channel contributes exactly 0 and gets exactly zero gradient::

    MoLoRAConfig(target_modules=[...], expert_kind="ortho_lora", num_experts=r_max, rank=1, alpha=1.0,
                 router="tlora", router_kwargs={"num_timesteps": T, "min_rank": r_min})

(``alpha = rank`` gives scaling 1, as the official layer, which has none.) For a channel mask
inside an expert (the kernels' ``rank_mask [E, r]``), :meth:`OrthoLoRABank.kernel_rank_mask`
repeats it over both terms.

**Init**, as the official code (``sig_type="last"``, its default and the README's): draw
``M ~ N(0, 1/R^2)`` (std ``1/R``, R the layer's rank), take its SVD and the R *last* singular
triples (``"principal"``: the first R; ``"middle"``: the R around the middle, start
``ceil((k - R) / 2)`` of ``k = min(d_in, d_out)``), ordered by decreasing singular value, so the
mask keeps the larger of them first. The official code takes *rows* of ``U`` as ``Q`` and *columns*
of ``V^T`` as ``P`` of an ``[d_in, d_out]`` matrix (not its singular vectors); for a Gaussian
matrix ``U``, ``S``, ``V`` are independent and ``U``, ``V`` Haar-distributed, so rows and columns
have the same law and this module takes the genuine singular triples of ``M [d_out, d_in]``
(``P = U[:, sl]``, ``lambda = S[sl]``, ``Q = V^T[sl]``): the same distribution, and
``P diag(lambda) Q`` is a truncated SVD of ``M``. A bank built from a spec (every model via
:func:`~molora.get_molora_model`) splits **one** draw over its experts, ``R = sum_e r_e``, expert
``e`` taking the next ``r_e`` channels: with the ``"tlora"`` router's rank-1 experts the layer is
exactly one rank-``r_max`` Ortho-LoRA of the paper, and in a mixture the experts start mutually
orthogonal. An expert added later on its own (:meth:`OrthoLoRABank.add_expert`, continual growth)
is its own draw at its rank. ``R <= min(d_in, d_out)`` is required (the official layer refuses
``rank > min(in, out)`` too).

**Regulariser** (:func:`ortho_penalty`): the official ``regularization()``,
``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``; its trainer does not add it to the loss, so here it is
opt-in. ``scope="layer"`` (default) takes ``P = [P_1 ... P_E]`` and ``Q = [Q_1; ...; Q_E]`` of
the whole layer (with rank-1 experts: the paper's rank-``r_max`` layer, cross terms included);
``scope="expert"`` sums the term of each expert alone. Both are 0 at the joint init (up to float
rounding).

**To the kernel** an expert is a rank-``2r`` LoRA: ``A_e = [diag(lambda_e) Q_e; diag(lambda0_e)
Q0_e]`` ``[2r, d_in]`` and ``B_e = [P_e, -P0_e]`` ``[d_out, 2r]`` (one batched stack over the
experts; the trained channels in rows ``[0, r_max)``, the frozen ones in ``[r_max, 2 r_max)``), so
routing and export are those of every kind. Merging folds a static mixture ``sum_e w_e s_e
delta W_e`` exactly, the mask at one timestep included (``w = [j < r(t)]``); a merged layer does
not route, so that rank then holds at every timestep (the schedule itself is not one weight). A
PEFT export is a plain LoRA of rank ``2r`` per expert. The scaling ``s_e`` is ``alpha / r`` of
the nominal rank ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molora.bank import BaseExpertBank, _check_shape, _stack_padded
from molora.errors import MoLoRAError

SINGULAR = ("last", "principal", "middle")


def ortho_init(d_out: int, d_in: int, ranks: Sequence[int], *, singular: str = "last",
               generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """T-LoRA's init of a layer of total rank ``R = sum(ranks)`` (the module docstring): SVD of
    ``M ~ N(0, 1/R^2)`` ``[d_out, d_in]``, the R ``singular`` triples split consecutively into
    ``(P [d_out, r_e], lambda [r_e], Q [r_e, d_in])`` per expert. float64; ValueError for a bad
    ``singular`` or ``R`` outside ``[1, min(d_out, d_in)]``."""
    if singular not in SINGULAR:
        raise ValueError(f"ortho_init: singular must be one of {list(SINGULAR)}; got {singular!r}")
    R, k = int(sum(ranks)), min(d_out, d_in)
    if not 1 <= R <= k:
        raise ValueError(f"ortho_init: the layer's total rank sum(ranks) = {R} must be in [1, min(d_out, d_in) = {k}] "
                         f"(ranks {list(ranks)}, weight [{d_out}, {d_in}])")
    M = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) / R
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    start = {"last": k - R, "principal": 0, "middle": math.ceil((k - R) / 2)}[singular]
    out, at = [], start
    for r in ranks:
        out.append((U[:, at:at + r].clone(), S[at:at + r].clone(), Vh[at:at + r].clone()))
        at += r
    return out


class _Frozen(nn.Module):
    """A list of buffers (the frozen copies): saved and moved with the bank, never parameters,
    so no optimizer, ``set_trainable`` or ``requires_grad_`` reaches them."""

    def append(self, t: Tensor) -> None:
        self.register_buffer(str(len(self._buffers)), t)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._buffers.values())

    def __getitem__(self, i: int) -> Tensor:
        return self._buffers[str(i)]


class OrthoLoRABank(BaseExpertBank):
    """E Ortho-LoRA experts: ``delta_e(x) = s_e (P_e diag(lambda_e) Q_e - P0_e diag(lambda0_e) Q0_e) x``
    (kind ``"ortho_lora"``; T-LoRA with the ``"tlora"`` router, see the module docstring).

    Args:
        d_in, d_out: the base layer's features.
        singular: which singular triples new experts start from: ``"last"`` (default, as the
            official code), ``"principal"`` or ``"middle"``.
        dtype, device: of the factors.

    Trainable per expert: ``P[e]``, ``lam[e]``, ``Q[e]``; the frozen copies ``P0``, ``lam0``,
    ``Q0`` are buffers. Experts of different ranks are zero-padded (both terms): exact.
    """

    kind = "ortho_lora"

    def __init__(self, d_in: int, d_out: int, *, singular: str = "last", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        if singular not in SINGULAR:
            raise ValueError(f"OrthoLoRABank: singular must be one of {list(SINGULAR)}; got {singular!r}")
        super().__init__(d_in, d_out, dtype=dtype, device=device)
        self.singular = singular
        self.P, self.lam, self.Q = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.P0, self.lam0, self.Q0 = _Frozen(), _Frozen(), _Frozen()
        self.A_shared = None  # not a shared-A bank (code asking for HydraLoRA's A finds none)

    def add_expert(self, rank: int, alpha: float, *, use_rslora: bool = False, init: str = "kaiming",
                   P: Tensor | None = None, lam: Tensor | None = None, Q: Tensor | None = None,
                   P0: Tensor | None = None, lam0: Tensor | None = None, Q0: Tensor | None = None,
                   trainable: bool = True) -> int:
        """Append one expert and return its index. Without factors it starts from its own draw
        (:func:`ortho_init` at ``rank``); ``P, lam, Q`` are given together (copied), and the frozen
        ``P0, lam0, Q0`` default to copies of them (a zero delta). ``init`` is accepted for the
        common interface and not used."""
        r = self._check_rank(rank)
        trained, frozen = (P, lam, Q), (P0, lam0, Q0)
        if any(t is not None for t in trained) and any(t is None for t in trained):
            raise ValueError("OrthoLoRABank: P, lam and Q are given together or not at all")
        if any(t is not None for t in frozen) and any(t is None for t in frozen):
            raise ValueError("OrthoLoRABank: P0, lam0 and Q0 are given together or not at all")
        shapes = ((self.d_out, r), (r,), (r, self.d_in))
        if P is None:
            if P0 is not None:
                raise ValueError("OrthoLoRABank: frozen copies P0, lam0, Q0 need the trained P, lam, Q")
            P, lam, Q = ortho_init(self.d_out, self.d_in, [r], singular=self.singular)[0]
        for name, t, shape in zip(("P", "lam", "Q", "P0", "lam0", "Q0"), trained + frozen, shapes + shapes):
            if t is not None:
                _check_shape(name, t, shape, type(self).__name__)
        dtype, device = self._factory["dtype"] or torch.get_default_dtype(), self._factory["device"]
        params = [nn.Parameter(t.detach().to(dtype=dtype, device=device).clone(), requires_grad=trainable)
                  for t in (P, lam, Q)]
        copies = [t.detach().to(dtype=dtype, device=device).clone() if t is not None else p.detach().clone()
                  for t, p in zip(frozen, params)]
        # every check passed: append all six (nothing half-added)
        for plist, p in zip((self.P, self.lam, self.Q), params):
            plist.append(p)
        for blist, t in zip((self.P0, self.lam0, self.Q0), copies):
            blist.append(t)
        return self._register(r, alpha, use_rslora)

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.P[expert], self.lam[expert], self.Q[expert]]

    def _sources(self) -> list[Tensor]:
        return [*self.P._parameters.values(), *self.lam._parameters.values(), *self.Q._parameters.values(),
                *self.P0, *self.lam0, *self.Q0]

    def _stack(self) -> tuple[Tensor, Tensor]:
        r = self.max_rank

        def lam_q(lams, qs) -> Tensor:  # diag(lambda_e) Q_e stacked [E, r_max, d_in]
            lam = _stack_padded([v.unsqueeze(1) for v in lams], r, rows=True)
            return lam * _stack_padded(list(qs), r, rows=True)

        A = torch.cat([lam_q(self.lam, self.Q), lam_q(self.lam0, self.Q0)], dim=1)
        B = torch.cat([_stack_padded(list(self.P), r, rows=False), -_stack_padded(list(self.P0), r, rows=False)], dim=2)
        return A, B

    def _unpadded(self, stack: tuple[Tensor, Tensor], expert: int) -> tuple[Tensor, Tensor]:
        """The rank-``2 r_e`` factors of one expert: its trained channels then its frozen ones."""
        A, B = stack
        r, half = self.ranks[expert], A.shape[1] // 2
        rows = torch.cat([torch.arange(r), half + torch.arange(r)]).to(A.device)
        return A[expert].index_select(0, rows), B[expert].index_select(1, rows)

    def delta_weight(self, weights: Sequence[float] | Tensor) -> Tensor:
        """``sum_e w_e s_e (P_e diag(lambda_e) Q_e - P0_e diag(lambda0_e) Q0_e)`` ``[d_out, d_in]``
        float32 (merging). Each term is one GEMM of the same shapes, subtracted after: an expert
        still at its start adds exactly 0 (the rank-2r product of :meth:`stacked` leaves an FMA's
        rounding)."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (self.num_experts,):
            raise ValueError(f"{type(self).__name__}: expected {self.num_experts} weights; got shape {tuple(w.shape)}")
        if not self.num_experts:
            return torch.zeros(self.d_out, self.d_in, dtype=torch.float32, device=self.device)
        A, B = (t.float() for t in self.stacked())
        coef = (w.to(A.device) * self.scaling.to(A.device)).view(-1, 1, 1)
        r = self.max_rank

        def term(half: slice) -> Tensor:  # sum_e coef_e B_e[:, half] A_e[half] as one GEMM over (e, channel)
            Bh, Ah = B[:, :, half] * coef, A[:, half]
            return Bh.permute(1, 0, 2).reshape(self.d_out, -1) @ Ah.reshape(-1, self.d_in)

        return term(slice(0, r)) + term(slice(r, 2 * r))

    def kernel_rank_mask(self, mask: Tensor) -> Tensor:
        """A channel mask ``[E, r_max]`` (1 keeps channel j of an expert) as the kernels'
        ``rank_mask [E, 2 r_max]`` of :meth:`stacked`: the same channels of both terms."""
        if tuple(mask.shape) != (self.num_experts, self.max_rank):
            raise ValueError(f"OrthoLoRABank: mask must be [E={self.num_experts}, r_max={self.max_rank}]; "
                             f"got {list(mask.shape)}")
        return torch.cat([mask, mask], dim=1)

    def factors(self, expert: int, *, frozen: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, lambda, Q)`` of one expert, or its frozen copy ``(P0, lambda0, Q0)``."""
        if frozen:
            return self.P0[expert], self.lam0[expert], self.Q0[expert]
        return self.P[expert], self.lam[expert], self.Q[expert]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "singular": self.singular}

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None, device: Any,
                   base_weight: Tensor | None) -> OrthoLoRABank:
        """Fresh experts from **one** draw split over them (:func:`ortho_init` with all the ranks)."""
        bank = cls(spec["d_in"], spec["d_out"], singular=spec.get("singular", "last"), dtype=dtype, device=device)
        ranks = [int(r) for r in spec["ranks"]]
        if not ranks:
            return bank
        draws = ortho_init(bank.d_out, bank.d_in, ranks, singular=bank.singular)
        trainable = spec.get("trainable", [True] * len(ranks))
        for r, a, s, t, (P, lam, Q) in zip(ranks, spec["alphas"], spec["rslora"], trainable, draws):
            bank.add_expert(r, float(a), use_rslora=bool(s), P=P, lam=lam, Q=Q, trainable=bool(t))
        return bank

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.num_experts}, ranks={self.ranks}, " \
               f"ortho_lora({self.singular})"


# ---------------------------------------------------------------------------------------------- model level
def _ortho_layers(model: nn.Module, where: str) -> dict[str, OrthoLoRABank]:
    from molora.layer import RoutedLoRALinear
    from molora.model import MoLoRAModel

    routed = model.routed_layers() if isinstance(model, MoLoRAModel) else \
        {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)}
    # the layer's bank, or a mixed bank's Ortho-LoRA part
    found = {n: m.bank.part_of(OrthoLoRABank) if m.bank is not None else None for n, m in routed.items()}
    layers = {n: f[0] for n, f in found.items() if f is not None and f[0].num_experts}
    if not layers:
        raise MoLoRAError(f"{where}: the model has no 'ortho_lora' experts (MoLoRAConfig(expert_kind='ortho_lora'))")
    return layers


def _gram_error(M: Tensor) -> Tensor:
    """``||M^T M - I||_F^2`` of ``M [n, k]`` (in float32, float64 for float64 factors)."""
    M = M if M.dtype == torch.float64 else M.float()
    G = M.T @ M
    return (G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).square().sum()


def ortho_penalty(model: nn.Module, *, scope: str = "layer") -> Tensor:
    """T-LoRA's orthogonality regulariser summed over the model's Ortho-LoRA layers:
    ``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` (the official ``regularization()``), with ``P, Q``
    the whole layer's concatenated factors (``scope="layer"``) or each expert's own
    (``scope="expert"``, summed). Differentiable in the trained ``P``, ``Q``; add it (times a
    coefficient) to the task loss. A float32 scalar on the experts' device.

    Raises MoLoRAError for an unknown scope or a model without Ortho-LoRA experts."""
    if scope not in ("layer", "expert"):
        raise MoLoRAError(f"ortho_penalty: scope must be 'layer' or 'expert'; got {scope!r}")
    layers = _ortho_layers(model, "ortho_penalty")
    total = torch.zeros((), dtype=torch.float32, device=next(iter(layers.values())).device)
    for bank in layers.values():
        if scope == "layer":
            groups = [(list(bank.P), list(bank.Q))]
        else:
            groups = [([p], [q]) for p, q in zip(bank.P, bank.Q)]
        for Ps, Qs in groups:
            total = total + (_gram_error(torch.cat(Ps, dim=1)) + _gram_error(torch.cat(Qs, dim=0).T)).float()
    return total
