"""Expert kinds: the LoRA methods a bank's experts can be.

A kind is a small parametrisation that yields the ``(A_e, B_e, s_e)`` the routed kernel
consumes (``delta = sum_e g_e s_e B_e A_e x``), differentiably, so every kind shares the
kernels, routers, losses, persistence and export. Each kind is one bank class (one module here)
that defines its parameters and its ``_stack`` (the materialisation, batched over experts):

- ``"lora"``: plain LoRA (Hu et al., 2021) or HydraLoRA's shared ``A`` (:class:`molora.bank.ExpertBank`).
- ``"qr_lora"``: QR-LoRA (Li et al., 2025): frozen shared ``Q`` from the base weight, trainable
  upper-triangular ``dR_e`` (:class:`molora.kinds.qr_lora.QRLoRABank`).
- ``"moslora"``: MoSLoRA (Wu et al., 2024): ``B_e M_e A_e`` with a trainable mixer
  (:class:`molora.kinds.moslora.MoSLoRABank`).
- ``"ard_lora"``: ARD-LoRA (Shinwari & Usama, 2025): ``B_e diag(alpha_e) A_e`` with learnable
  non-negative per-rank gates, an l1 + total-variation regulariser and pruning of dead channels
  (:class:`molora.kinds.ard_lora.ARDLoRABank`, :func:`~molora.kinds.ard_lora.ard_penalty`,
  :func:`~molora.kinds.ard_lora.prune_ard`).
- ``"dora"``: DoRA (Liu et al., 2024): ``m_e / ||W0 + s_e B_e A_e||_c * (W0 + s_e B_e A_e)``, routed as
  ``B'_e = diag(c_e) B_e`` plus a gate-weighted rescaling of the base output
  (:class:`molora.kinds.dora.DoRABank`).
- ``"ortho_lora"``: T-LoRA's Ortho-LoRA (Soboleva et al., 2025): ``P diag(lambda) Q - P0 diag(lambda0) Q0``
  from singular triples of a random matrix, with a frozen copy of the start and an orthogonality
  regulariser; with the ``"tlora"`` router over rank-1 experts it is T-LoRA
  (:class:`molora.kinds.ortho_lora.OrthoLoRABank`, :func:`~molora.kinds.ortho_lora.ortho_penalty`).
- ``"riemann_lora"``: RiemannLoRA (Bogachev et al., 2025): a point ``U_e S_e V_e^T`` of the
  fixed-rank manifold (orthonormal ``U, V``), trained by :class:`molora.optim.RiemannianSGD`
  (:class:`molora.kinds.riemann_lora.RiemannLoRABank`, :func:`~molora.kinds.riemann_lora.riemann_loi_`).

- ``"mixed"``: experts of several of the kinds above in one bank behind one router: one part (a bank)
  per kind, their stacks concatenated (:class:`molora.kinds.mixed.MixedBank`;
  ``MoLoRAConfig(expert_kind=[...])`` gives each expert its kind).
"""

from __future__ import annotations

from molora.bank import BaseExpertBank, ExpertBank
from molora.errors import MoLoRAError

from .ard_lora import ARDLoRABank, ard_penalty, effective_rank, project_ard, prune_ard
from .dora import DoRABank
from .mixed import MixedBank
from .moslora import MoSLoRABank
from .ortho_lora import OrthoLoRABank, ortho_init, ortho_penalty
from .qr_lora import QRLoRABank, qr_basis
from .riemann_lora import RiemannLoRABank, loi_point, riemann_loi_

BANK_CLASSES: dict[str, type[BaseExpertBank]] = {"lora": ExpertBank, "qr_lora": QRLoRABank, "moslora": MoSLoRABank,
                                                 "ard_lora": ARDLoRABank, "dora": DoRABank,
                                                 "ortho_lora": OrthoLoRABank, "riemann_lora": RiemannLoRABank,
                                                 "mixed": MixedBank}
#: the kinds an expert can be (``"mixed"`` is a bank of several of them, not an expert's kind)
EXPERT_KINDS = tuple(k for k in BANK_CLASSES if k != "mixed")


def bank_class(kind: str) -> type[BaseExpertBank]:
    """The bank class of an expert kind; MoLoRAError naming the allowed kinds otherwise."""
    cls = BANK_CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MoLoRAError(f"expert kind must be one of {list(BANK_CLASSES)}; got {kind!r}")
    return cls


__all__ = ["ARDLoRABank", "BANK_CLASSES", "DoRABank", "EXPERT_KINDS", "MixedBank", "MoSLoRABank", "OrthoLoRABank", "QRLoRABank",
           "RiemannLoRABank", "ard_penalty", "bank_class", "effective_rank", "loi_point", "ortho_init",
           "ortho_penalty", "project_ard", "prune_ard", "qr_basis", "riemann_loi_"]
