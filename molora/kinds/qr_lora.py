"""QR-LoRA experts (Li et al., 2025, "QR-LoRA: Efficient and Disentangled Fine-tuning via QR
Decomposition for Customized Generation", arXiv 2507.04599; official code luna-ai-lab/QR-LoRA).

The rule, as the official ``DeltaRTriuLoraLayer`` (``init_method="triu_deltaR"``, the scripts'
``--use_zero_init``) applies it: take the rank-r truncated SVD of the base weight,
``W_r = U_r S_r V_r^T`` ``[d_out, d_in]``; its reduced QR (no pivoting) gives ``Q [d_out, r]``
(orthonormal columns) and ``R [r, d_in]`` (upper triangular), both frozen. The trainable part is
``dR [r, d_in]``, zero at init and kept upper triangular (``triu``: entries ``j >= i``). The
official layer replaces the base weight by ``W_res = W0 - s Q R`` and adds ``s Q (R + triu(dR)) x``;
the sum is ``W0 x + s Q triu(dR) x``, which is what is computed here, leaving the base weight
untouched (so unmerge, base fingerprints and export as a plain LoRA work as for every kind).
``R`` therefore is not needed and not stored; only ``Q`` is.

All experts of a layer share ``Q`` (it depends on the base weight only): a shared-B bank, the
mirror of HydraLoRA's shared ``A``, with ``A_e = triu(dR_e)``, ``B_e = Q``. Merging a mixture is
``Q (sum_e w_e s_e triu(dR_e))``; as a PEFT LoRA it is ``lora_B = Q``, ``lora_A = triu(dR)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from molora.bank import BaseExpertBank, resident_base_weight


def qr_basis(weight: Tensor, rank: int) -> Tensor:
    """``Q [d_out, r]`` of QR-LoRA for a base weight ``[d_out, d_in]``: the first r columns of
    the reduced QR of the rank-r truncated SVD ``U_r S_r V_r^T``.

    Householder QR's first r columns depend only on the first r columns of the matrix, so this
    is the QR of ``(U_r S_r V_r^T)[:, :r] = U_r S_r (V_r^T)[:, :r]`` (``[d_out, r]``, cheap), equal
    to factorising the whole ``[d_out, d_in]`` matrix as the official code does. Computed in
    float32 (float64 for a float64 weight)."""
    d_out, d_in = weight.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"qr_basis: rank must be in [1, min(d_out, d_in) = {min(d_out, d_in)}]; got {rank!r}")
    W = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    cols = (U[:, :rank] * S[:rank]) @ Vh[:rank, :rank]
    Q, _ = torch.linalg.qr(cols, mode="reduced")
    return Q


class QRLoRABank(BaseExpertBank):
    """E QR-LoRA experts: ``delta_e(x) = s_e Q triu(dR_e) x`` with one frozen ``Q`` (kind ``"qr_lora"``).

    Args:
        d_in, d_out: the base layer's features.
        rank: ``r`` of ``Q`` (every expert has it).
        base_weight: the base weight ``[d_out, d_in]`` to take ``Q`` from (:func:`qr_basis`);
            ``None`` leaves a zero placeholder for a checkpoint's ``Q`` to fill.
        dtype, device: of ``Q`` and the ``dR``.

    ``Q`` is a buffer: saved with the bank, never trained. ``dR_e`` is stored as a full
    ``[r, d_in]`` parameter and materialised as ``triu(dR_e)``, so the effective factor cannot
    leave the upper triangle: the stored lower triangle gets zero gradient (and starts at zero).
    Trainable parameters counted per expert are therefore ``r * d_in`` stored, of which
    ``r * d_in - r (r - 1) / 2`` are free.
    """

    kind = "qr_lora"

    def __init__(self, d_in: int, d_out: int, *, rank: int, base_weight: Tensor | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(d_in, d_out, dtype=dtype, device=device)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(d_in, d_out):
            raise ValueError(f"QRLoRABank: rank must be an int in [1, min(d_in, d_out) = {min(d_in, d_out)}]; got {rank!r}")
        if base_weight is None:
            Q = torch.zeros(d_out, rank, dtype=dtype, device=device)
        else:
            resident_base_weight(self.kind, base_weight)
            if tuple(base_weight.shape) != (d_out, d_in) or not base_weight.dtype.is_floating_point:
                raise ValueError(f"QRLoRABank: the base weight must be a floating [d_out={d_out}, d_in={d_in}] matrix; "
                                 f"got {list(base_weight.shape)} {base_weight.dtype}")
            Q = qr_basis(base_weight, rank).to(dtype=dtype or base_weight.dtype, device=device or base_weight.device)
        self.register_buffer("Q", Q)
        self.dR = nn.ParameterList()
        self.A_shared = None  # not a shared-A bank (code asking for HydraLoRA's A finds none)

    @property
    def fixed_rank(self) -> int:
        return int(self.Q.shape[1])

    def add_expert(self, rank: int | None = None, alpha: float = 1.0, *, use_rslora: bool = False,
                   init: str = "kaiming", dR: Tensor | None = None, trainable: bool = True) -> int:
        """Append one expert (``dR = 0``: no delta yet, the official ``--use_zero_init``) and return
        its index. ``rank`` must be the bank's (``None`` takes it); ``init`` is accepted for the
        common interface and not used (``dR`` starts at zero). A given ``dR`` is copied and must
        be upper triangular."""
        rank = self._check_rank(self.fixed_rank if rank is None else rank)
        if dR is None:
            p = nn.Parameter(torch.zeros(rank, self.d_in, dtype=self.Q.dtype, device=self.Q.device), requires_grad=trainable)
        else:
            p = self._given("dR", dR, (rank, self.d_in), trainable)
            if not torch.equal(p.detach(), torch.triu(p.detach())):
                raise ValueError("QRLoRABank: dR must be upper triangular (entries below the diagonal are 0)")
        self.dR.append(p)
        return self._register(rank, alpha, use_rslora)

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.dR[expert]]

    def _sources(self) -> list[Tensor]:
        return [*self.dR, self.Q]

    def _stack(self) -> tuple[Tensor, Tensor]:
        # triu on the stacked [E, r, d_in] masks every expert at once; its backward zeroes the
        # lower triangle's gradient. B: the one Q for every expert (the kernels take [E, d_out, r]).
        A = torch.triu(torch.stack(list(self.dR)))
        B = self.Q.unsqueeze(0).expand(self.num_experts, -1, -1).contiguous()
        return A, B

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None, device: Any,
                   base_weight: Tensor | None) -> QRLoRABank:
        rank = spec.get("shared_rank")
        bank = cls(spec["d_in"], spec["d_out"], rank=rank if rank is not None else max(spec["ranks"], default=1),
                   base_weight=base_weight, dtype=dtype, device=device)
        trainable = spec.get("trainable", [True] * len(spec["ranks"]))
        for r, a, s, t in zip(spec["ranks"], spec["alphas"], spec["rslora"], trainable):
            bank.add_expert(int(r), float(a), use_rslora=bool(s), trainable=bool(t))
        return bank

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.num_experts}, qr_lora(r={self.fixed_rank})"
