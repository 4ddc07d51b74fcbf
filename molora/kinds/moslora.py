"""MoSLoRA experts (Wu et al., 2024, "Mixture-of-Subspaces in Low-Rank Adaptation", arXiv
2406.11909; code wutaiqiang/MoSLoRA).

``delta W_e = B_e M_e A_e`` with a trainable mixer ``M_e [r, r]`` between the LoRA factors; as
the official code (its ``lora_AB``), ``A`` and ``M`` start kaiming-uniform (``a = sqrt(5)``) and
``B`` at zero, so the delta starts at zero. With HydraLoRA's shared ``A`` one mixer is shared
too (``B_e M A``). The kernel sees ``A'_e = M_e A_e`` (one batched ``bmm`` over the experts)
and ``B_e``; merging and export use the same ``(A', B)``, so a PEFT export is a plain LoRA with
``lora_A = M A``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molora.bank import ExpertBank


def init_mixer(M: Tensor) -> None:
    """MoSLoRA's mixer init: kaiming-uniform with ``a = sqrt(5)`` (as ``nn.Linear(r, r)``), in place."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(M, a=math.sqrt(5))


class MoSLoRABank(ExpertBank):
    """E MoSLoRA experts: ``delta_e(x) = s_e B_e M_e A_e x`` (kind ``"moslora"``).

    Arguments as :class:`~molora.bank.ExpertBank`; with ``shared_a`` the mixer is shared as well.
    Experts of different ranks are zero-padded (``M_e`` on both sides), which stays exact.
    """

    kind = "moslora"

    def __init__(self, d_in: int, d_out: int, *, shared_a: bool = False, shared_rank: int | None = None,
                 init: str = "kaiming", dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(d_in, d_out, shared_a=shared_a, shared_rank=shared_rank, init=init, dtype=dtype, device=device)
        self.M = nn.ParameterList()
        if self.shared_a:
            self.M_shared = nn.Parameter(self._empty(shared_rank, shared_rank))
            init_mixer(self.M_shared)
        else:
            self.M_shared = None

    def add_expert(self, rank: int, alpha: float, *, use_rslora: bool = False, init: str = "kaiming",
                   A: Tensor | None = None, B: Tensor | None = None, M: Tensor | None = None,
                   trainable: bool = True) -> int:
        """Append one expert (``A`` by ``init``, ``M`` kaiming, ``B = 0`` unless given; copied) and
        return its index. A shared-A bank takes no per-expert ``M``."""
        m = None
        if self.shared_a:
            if M is not None:
                raise ValueError("MoSLoRABank: a shared-A bank shares its mixer; it takes per-expert B only")
        else:
            r = self._check_rank(rank)
            if M is not None:
                m = self._given("M", M, (r, r), trainable)
            else:
                m = nn.Parameter(self._empty(r, r), requires_grad=trainable)
                init_mixer(m)
        index = super().add_expert(rank, alpha, use_rslora=use_rslora, init=init, A=A, B=B, trainable=trainable)
        if m is not None:  # appended once the parent's checks passed: nothing half-added
            self.M.append(m)
        return index

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return super().expert_parameters(expert) + ([] if self.shared_a else [self.M[expert]])

    def shared_parameters(self) -> list[nn.Parameter]:
        return super().shared_parameters() + ([self.M_shared] if self.shared_a else [])

    def _sources(self) -> list[Tensor]:
        return super()._sources() + ([self.M_shared] if self.shared_a else list(self.M))

    def _stack(self) -> tuple[Tensor, Tensor]:
        A, B = super()._stack()
        if self.shared_a:
            return self.M_shared @ A, B
        r = self.max_rank
        M = torch.stack([m if m.shape[0] == r else F.pad(m, (0, r - m.shape[0], 0, r - m.shape[0])) for m in self.M])
        return torch.bmm(M, A), B

    def extra_repr(self) -> str:
        return super().extra_repr() + ", moslora"
