"""Expert banks: the LoRA experts of one base layer.

For a base weight ``W [d_out, d_in]`` a bank holds E experts ``A_e [r_e, d_in]``,
``B_e [d_out, r_e]`` with scaling ``s_e = alpha_e / r_e`` (LoRA, Hu et al., 2021) or
``alpha_e / sqrt(r_e)`` (rsLoRA, Kalajdzievski, 2023). The HydraLoRA variant (Tian et al.,
2024) shares one ``A [r, d_in]`` between all experts and keeps E heads ``B_e``.

Each expert is its own parameter, so experts can be frozen one by one (an optimizer built over
``requires_grad`` parameters never touches a frozen expert, not even through weight decay) and
the bank can grow (continual learning) without invalidating optimizer references to the
experts that were already there. Experts of different ranks are zero-padded to the largest rank
when stacked for the kernel; the padding is a constant, so it never trains.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INITS = ("kaiming", "gaussian", "orthogonal")


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def init_lora_A(A: Tensor, init: str) -> None:
    """Initialise a down-projection in place: ``kaiming`` (uniform, a=sqrt(5), as nn.Linear and
    PEFT), ``gaussian`` (N(0, 1/r), PEFT's "gaussian") or ``orthogonal`` (orthonormal rows)."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        elif init == "orthogonal":
            nn.init.orthogonal_(A)
        else:
            raise ValueError(f"init must be one of {INITS}; got {init!r}")


class ExpertBank(nn.Module):
    """E LoRA experts for one base layer: ``delta_e(x) = s_e * B_e A_e x``.

    Args:
        d_in, d_out: the base layer's input and output features.
        shared_a: HydraLoRA layout: one ``A`` of rank ``shared_rank`` for all experts.
        shared_rank: rank of the shared ``A`` (required with ``shared_a``).
        init: initialisation of the shared ``A`` (see :func:`init_lora_A`).
        dtype, device: of the parameters.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        shared_a: bool = False,
        shared_rank: int | None = None,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.shared_a = bool(shared_a)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.ranks: list[int] = []
        self.alphas: list[float] = []
        self.rslora: list[bool] = []
        self._factory = {"dtype": dtype, "device": device}
        if self.shared_a:
            if not shared_rank or shared_rank < 1:
                raise ValueError(f"ExpertBank: shared_a needs shared_rank >= 1; got {shared_rank!r}")
            self.A_shared = nn.Parameter(torch.empty(shared_rank, d_in, **self._factory))
            init_lora_A(self.A_shared, init)
        else:
            self.A_shared = None
        self.register_buffer("scaling", torch.empty(0, dtype=torch.float32, device=device), persistent=False)
        self._stacked_cache: tuple | None = None

    @property
    def num_experts(self) -> int:
        return len(self.B)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    def add_expert(
        self,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        init: str = "kaiming",
        A: Tensor | None = None,
        B: Tensor | None = None,
        trainable: bool = True,
    ) -> int:
        """Append one expert and return its index.

        ``A``/``B`` give its weights (copied); otherwise ``A`` is initialised by ``init`` and
        ``B`` is zero, so a new expert starts as the identity delta (LoRA's convention).
        """
        if self.shared_a:
            rank = self.A_shared.shape[0]
            if A is not None:
                raise ValueError("ExpertBank: a shared-A bank takes per-expert B only")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"ExpertBank: rank must be a positive int; got {rank!r}")
        dtype, device = self._factory["dtype"], self._factory["device"]
        if not self.shared_a:
            if A is None:
                a = torch.empty(rank, self.d_in, dtype=dtype, device=device)
                init_lora_A(a, init)
            else:
                _check_shape("A", A, (rank, self.d_in))
                a = A.detach().to(dtype=dtype or A.dtype, device=device or A.device).clone()
            self.A.append(nn.Parameter(a, requires_grad=trainable))
        if B is None:
            b = torch.zeros(self.d_out, rank, dtype=dtype, device=device)
        else:
            _check_shape("B", B, (self.d_out, rank))
            b = B.detach().to(dtype=dtype or B.dtype, device=device or B.device).clone()
        self.B.append(nn.Parameter(b, requires_grad=trainable))
        self.ranks.append(rank)
        self.alphas.append(float(alpha))
        self.rslora.append(bool(use_rslora))
        self._refresh_scaling()
        return self.num_experts - 1

    def _refresh_scaling(self) -> None:
        values = [lora_scaling(a, r, s) for a, r, s in zip(self.alphas, self.ranks, self.rslora)]
        self.scaling = torch.tensor(values, dtype=torch.float32, device=self.B[0].device)

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        """The parameters that belong to expert ``expert`` alone (the shared A is not among them)."""
        return [self.B[expert]] if self.shared_a else [self.A[expert], self.B[expert]]

    def set_trainable(self, trainable: bool, experts: Iterable[int] | None = None) -> None:
        """Freeze (``False``) or unfreeze experts; ``None`` means all of them and the shared A."""
        ids = range(self.num_experts) if experts is None else list(experts)
        for e in ids:
            for p in self.expert_parameters(e):
                p.requires_grad_(trainable)
        if experts is None and self.A_shared is not None:
            self.A_shared.requires_grad_(trainable)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """Experts stacked for the kernel: ``A [E, r_max, d_in]`` (or the shared ``[r, d_in]``)
        and ``B [E, d_out, r_max]``; lower-rank experts are zero-padded (exact: padded rank
        components contribute ``0``).

        Where the stack needs no autograd graph (no parameter requires grad, as for composed
        pretrained adapters or an adapter pool, or grad mode is off, as in evaluation) the bank
        keeps its stacked copy until a parameter is replaced or written in place (its version
        counter moves), so a forward does no per-expert work; the copy costs the bank's size
        once more in memory. Under grad mode with trainable experts the stack is made per call,
        in the graph."""
        if torch.compiler.is_compiling():
            return self._stack()
        # the ParameterLists' own dicts: their __iter__ costs ~2 us a parameter, the bank's
        # whole forward budget at E = 1024
        sources = [self.A_shared] if self.shared_a else list(self.A._parameters.values())
        sources += self.B._parameters.values()
        if torch.is_grad_enabled() and any(map(_requires_grad, sources)):
            return self._stack()
        # data_ptr and dtype: Module.to() swaps a parameter's .data without moving its version
        key = (torch.is_inference_mode_enabled(), tuple(map(id, sources)), tuple(map(_version, sources)),
               tuple(map(Tensor.data_ptr, sources)), tuple(map(_dtype, sources)))
        cached = self._stacked_cache
        # the key's ids are of live parameters: the cache holds them, so none is reused meanwhile
        if cached is not None and cached[0] == key:
            return cached[2]
        value = self._stack()
        # one tuple assignment: a thread reading the cache sees a whole (key, value) pair
        self._stacked_cache = (key, sources, value)
        return value

    def _stack(self) -> tuple[Tensor, Tensor]:
        r = self.max_rank
        if self.shared_a:
            A = self.A_shared
        elif all(k == r for k in self.ranks):
            A = torch.stack(list(self.A))
        else:
            A = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a in self.A])
        if all(k == r for k in self.ranks):
            B = torch.stack(list(self.B))
        else:
            B = torch.stack([F.pad(b, (0, r - b.shape[1])) for b in self.B])
        return A, B

    def delta_weight(self, weights: Sequence[float] | Tensor) -> Tensor:
        """``sum_e w_e s_e B_e A_e`` as a ``[d_out, d_in]`` float32 matrix (for merging/export)."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (self.num_experts,):
            raise ValueError(f"ExpertBank: expected {self.num_experts} weights; got shape {tuple(w.shape)}")
        delta = torch.zeros(self.d_out, self.d_in, dtype=torch.float32, device=self.B[0].device)
        for e in range(self.num_experts):
            if w[e] != 0:
                A = self.A_shared if self.shared_a else self.A[e]
                delta += (float(w[e]) * float(self.scaling[e])) * (self.B[e].float() @ A.float())
        return delta

    def spec(self) -> dict[str, Any]:
        """JSON description from which :meth:`from_spec` rebuilds an empty bank of this layout."""
        return {
            "d_in": self.d_in,
            "d_out": self.d_out,
            "shared_a": self.shared_a,
            "shared_rank": None if self.A_shared is None else int(self.A_shared.shape[0]),
            "ranks": list(self.ranks),
            "alphas": list(self.alphas),
            "rslora": list(self.rslora),
            "trainable": [bool(b.requires_grad) for b in self.B],
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None = None, device: Any = None) -> ExpertBank:
        """A bank of fresh experts (``A`` by ``spec["init"]``, default kaiming; ``B = 0``) of that layout."""
        init = spec.get("init", "kaiming")
        bank = cls(spec["d_in"], spec["d_out"], shared_a=spec["shared_a"], shared_rank=spec["shared_rank"], init=init,
                   dtype=dtype, device=device)
        trainable = spec.get("trainable", [True] * len(spec["ranks"]))
        for r, a, s, t in zip(spec["ranks"], spec["alphas"], spec["rslora"], trainable):
            bank.add_expert(int(r), float(a), use_rslora=bool(s), init=init, trainable=bool(t))
        return bank

    def extra_repr(self) -> str:
        kind = f"shared_a(r={self.A_shared.shape[0]})" if self.shared_a else f"ranks={self.ranks}"
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.num_experts}, {kind}"


_requires_grad = operator.attrgetter("requires_grad")
_version = operator.attrgetter("_version")
_dtype = operator.attrgetter("dtype")


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"ExpertBank: {name} must have shape {list(shape)}; got {list(t.shape)}")
