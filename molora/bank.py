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

Expert kinds (:mod:`molora.kinds`): every kind is a small parametrisation that yields the
``(A_e, B_e, s_e)`` the routed kernel consumes, differentiably. :class:`BaseExpertBank` holds
what all kinds share (ranks, scalings, freezing, the stacked cache, merging, the spec); a kind
defines its parameters and :meth:`BaseExpertBank._stack`, the one place that turns them into the
kernel's ``A`` and ``B``. Merging, export and persistence go through that place, so a new kind
gets them for free. :class:`ExpertBank` is the plain LoRA / HydraLoRA kind (``"lora"``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
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


def resident_base_weight(kind: str, base_weight: Tensor) -> Tensor:
    """``base_weight`` for a kind built from the base weight's values (QR-LoRA's ``Q``, DoRA's
    norms); ValueError while it is offloaded (accelerate keeps it on the meta device between calls)."""
    if base_weight.is_meta:
        raise ValueError(f"expert kind {kind!r} is built from the base weight, which is offloaded (on the meta device); "
                         "load the base without offloading these layers")
    return base_weight


class BaseExpertBank(nn.Module):
    """What every expert kind shares: E experts of ranks ``r_e`` with scalings ``s_e`` for one
    base layer ``[d_out, d_in]``; ``delta_e(x) = s_e * B_e A_e x`` where ``(A_e, B_e)`` are what
    the kind materialises from its parameters in :meth:`_stack`.

    A kind (subclass) sets :attr:`kind`, registers its parameters, appends experts through
    :meth:`_register`, and defines :meth:`_stack`, :meth:`_sources`, :meth:`expert_parameters`,
    :meth:`shared_parameters` and :meth:`_from_spec`.
    """

    kind = "base"

    def __init__(self, d_in: int, d_out: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.ranks: list[int] = []
        self.alphas: list[float] = []
        self.rslora: list[bool] = []
        self._factory = {"dtype": dtype, "device": device}
        self.register_buffer("scaling", torch.empty(0, dtype=torch.float32, device=device), persistent=False)
        self._stacked_cache: tuple | None = None
        self._conversions = 0  # see state_key

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    @property
    def fixed_rank(self) -> int | None:
        """The one rank every expert of this bank must have (a shared factor fixes it), else ``None``."""
        return None

    @property
    def device(self) -> torch.device:
        """Where the bank's factors live (the scaling buffer's device while it has none)."""
        sources = self._sources()
        return sources[0].device if sources else self.scaling.device

    def _register(self, rank: int, alpha: float, use_rslora: bool) -> int:
        """Book an expert whose factors the kind has just appended; returns its index."""
        self.ranks.append(rank)
        self.alphas.append(float(alpha))
        self.rslora.append(bool(use_rslora))
        self._refresh_scaling()
        return self.num_experts - 1

    def _check_rank(self, rank: Any) -> int:
        fixed = self.fixed_rank
        if fixed is not None and rank != fixed:
            raise ValueError(f"{type(self).__name__}: experts of this bank have rank {fixed} (a shared factor); got {rank!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{type(self).__name__}: rank must be a positive int; got {rank!r}")
        return rank

    def _given(self, name: str, t: Tensor, shape: tuple[int, ...], trainable: bool) -> nn.Parameter:
        """A copy of a given factor, shape-checked, in the bank's dtype and device."""
        _check_shape(name, t, shape, type(self).__name__)
        dtype, device = self._factory["dtype"], self._factory["device"]
        return nn.Parameter(t.detach().to(dtype=dtype or t.dtype, device=device or t.device).clone(),
                            requires_grad=trainable)

    def _empty(self, *shape: int) -> Tensor:
        return torch.empty(*shape, **self._factory)

    def _refresh_scaling(self) -> None:
        values = [lora_scaling(a, r, s) for a, r, s in zip(self.alphas, self.ranks, self.rslora)]
        self.scaling = torch.tensor(values, dtype=torch.float32, device=self.device)

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        """The parameters that belong to expert ``expert`` alone (shared factors are not among them)."""
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters shared by all experts (HydraLoRA's ``A``, a shared mixer)."""
        return []

    def set_trainable(self, trainable: bool, experts: Iterable[int] | None = None) -> None:
        """Freeze (``False``) or unfreeze experts; ``None`` means all of them and the shared factors."""
        ids = range(self.num_experts) if experts is None else list(experts)
        for e in ids:
            for p in self.expert_parameters(e):
                p.requires_grad_(trainable)
        if experts is None:
            for p in self.shared_parameters():
                p.requires_grad_(trainable)

    def attach_base(self, base_weight: Callable[[], Tensor]) -> None:
        """Called by the routed layer that owns the bank: ``base_weight()`` returns its frozen base
        weight ``W0 [d_out, d_in]``, live and unmerged (a view, never a copy). Kinds whose experts
        read ``W0`` at every call (DoRA's column norm) keep it; the others ignore it."""

    def output_scale(self, gates: Tensor, indices: Tensor | None) -> Tensor | None:
        """The kind's per-channel factor of the base output ``W0 x`` per decision row
        (``[rows, d_out]``: DoRA's ``sum_e g_e (c_e - 1)``), added as ``scale * W0 x`` by the
        routed layer; ``None`` (the default) for kinds that only add the routed delta."""
        return None

    #: whether the kind rescales the base output (:meth:`output_scale`, :meth:`static_scale`): DoRA
    rescales_base = False

    def static_scale(self, weights: Sequence[float] | Tensor) -> Tensor | None:
        """The per-channel factor ``a [d_out]`` (float64) of ``W0`` in a static mixture ``w``
        of a kind that rescales the base output (DoRA); ``None`` for the others (``a = 1``)."""
        return None

    def part_of(self, cls: type) -> tuple[BaseExpertBank, list[int]] | None:
        """The bank of kind class ``cls`` inside this one and the indices, here, of its experts:
        ``(self, all)`` for a bank of that class, a mixed bank's part of it, else ``None``."""
        return (self, list(range(self.num_experts))) if isinstance(self, cls) else None

    def _sources(self) -> list[Tensor]:
        """Every tensor :meth:`_stack` reads (the cache of :meth:`stacked` is keyed on them)."""
        raise NotImplementedError

    def _stack(self) -> tuple[Tensor, Tensor]:
        """The kind's materialisation: ``A [E, r_max, d_in]`` (or a shared ``[r, d_in]``) and
        ``B [E, d_out, r_max]``, differentiable in the kind's parameters, batched over experts."""
        raise NotImplementedError

    def state_key(self, sources: list[Tensor] | None = None) -> tuple:
        """A value that changes whenever the experts' weights may have: the identity and in-place
        version of every tensor :meth:`_stack` reads, and a count of the conversions applied to the
        bank (``Module.to()``/``.half()``/... swap a parameter's ``.data`` without moving its version;
        they all run through :meth:`_apply`). What is derived from the experts (the stack, Arrow's
        prototypes) is keyed on it. Assigning ``param.data = ...`` by hand is not seen: write in
        place (``param.copy_``) or assign a new parameter."""
        sources = self._sources() if sources is None else sources
        return self._conversions, tuple(map(id, sources)), tuple(map(_version, sources))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        self._conversions += 1  # before and after: a failed conversion also invalidates
        try:
            return super()._apply(fn, recurse)
        finally:
            self._conversions += 1

    def stacked(self) -> tuple[Tensor, Tensor]:
        """Experts stacked for the kernel: ``A [E, r_max, d_in]`` (or the shared ``[r, d_in]``)
        and ``B [E, d_out, r_max]``; lower-rank experts are zero-padded (exact: padded rank
        components contribute ``0``).

        Where the stack needs no autograd graph (no source tensor requires grad, as for
        composed pretrained adapters, an adapter pool or frozen experts of any kind, or grad mode
        is off, as in evaluation) the bank keeps its stacked copy until a source is replaced or
        written in place (its version counter moves), so a forward does no per-expert work; the
        copy costs the bank's size once more in memory. Under grad mode with trainable experts
        the stack is made per call, in the graph."""
        if torch.compiler.is_compiling():
            return self._stack()
        sources = self._sources()
        if torch.is_grad_enabled() and any(map(_requires_grad, sources)):
            return self._stack()
        key = (torch.is_inference_mode_enabled(), self.state_key(sources))
        cached = self._stacked_cache
        # the key's ids are of live tensors: the cache holds them, so none is reused meanwhile
        if cached is not None and cached[0] == key:
            return cached[2]
        value = self._stack()
        # one tuple assignment: a thread reading the cache sees a whole (key, value) pair
        self._stacked_cache = (key, sources, value)
        return value

    def expert_factors(self, expert: int) -> tuple[Tensor, Tensor]:
        """``(A_e [r_e, d_in], B_e [d_out, r_e])`` of one expert as the kernel sees them (from
        :meth:`stacked`, unpadded): what merging and export write."""
        return self._unpadded(self.stacked(), expert)

    def _unpadded(self, stack: tuple[Tensor, Tensor], expert: int) -> tuple[Tensor, Tensor]:
        A, B = stack
        r = self.ranks[expert]
        return (A if A.dim() == 2 else A[expert])[:r], B[expert][:, :r]

    def delta_weight(self, weights: Sequence[float] | Tensor) -> Tensor:
        """``sum_e w_e s_e B_e A_e`` as a ``[d_out, d_in]`` float32 matrix (for merging/export)."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (self.num_experts,):
            raise ValueError(f"{type(self).__name__}: expected {self.num_experts} weights; got shape {tuple(w.shape)}")
        delta = torch.zeros(self.d_out, self.d_in, dtype=torch.float32, device=self.device)
        stack = self.stacked() if self.num_experts else None
        for e in range(self.num_experts):
            if w[e] != 0:
                A, B = self._unpadded(stack, e)
                delta += (float(w[e]) * float(self.scaling[e])) * (B.float() @ A.float())
        return delta

    def spec(self) -> dict[str, Any]:
        """JSON description from which :meth:`from_spec` rebuilds an empty bank of this layout."""
        return {
            "kind": self.kind,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "shared_a": False,
            "shared_rank": self.fixed_rank,
            "ranks": list(self.ranks),
            "alphas": list(self.alphas),
            "rslora": list(self.rslora),
            "trainable": [all(p.requires_grad for p in self.expert_parameters(e)) for e in range(self.num_experts)],
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None = None, device: Any = None,
                  base_weight: Tensor | None = None) -> BaseExpertBank:
        """A bank of fresh experts of that layout, of the kind ``spec["kind"]`` (default ``"lora"``).

        ``base_weight`` (the base layer's ``[d_out, d_in]`` weight) is needed by kinds built from
        it (QR-LoRA); without it they hold placeholders that a checkpoint's tensors fill."""
        from molora.kinds import bank_class

        return bank_class(spec.get("kind", "lora"))._from_spec(spec, dtype=dtype, device=device, base_weight=base_weight)

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None, device: Any,
                   base_weight: Tensor | None) -> BaseExpertBank:
        raise NotImplementedError


class ExpertBank(BaseExpertBank):
    """E LoRA experts for one base layer: ``delta_e(x) = s_e * B_e A_e x`` (kind ``"lora"``).

    Args:
        d_in, d_out: the base layer's input and output features.
        shared_a: HydraLoRA layout: one ``A`` of rank ``shared_rank`` for all experts.
        shared_rank: rank of the shared ``A`` (required with ``shared_a``).
        init: initialisation of the shared ``A`` (see :func:`init_lora_A`).
        dtype, device: of the parameters.
    """

    kind = "lora"

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
        super().__init__(d_in, d_out, dtype=dtype, device=device)
        self.shared_a = bool(shared_a)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        if self.shared_a:
            if not shared_rank or shared_rank < 1:
                raise ValueError(f"{type(self).__name__}: shared_a needs shared_rank >= 1; got {shared_rank!r}")
            self.A_shared = nn.Parameter(self._empty(shared_rank, d_in))
            init_lora_A(self.A_shared, init)
        else:
            self.A_shared = None

    @property
    def fixed_rank(self) -> int | None:
        return int(self.A_shared.shape[0]) if self.shared_a else None

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
            rank = self.fixed_rank
            if A is not None:
                raise ValueError(f"{type(self).__name__}: a shared-A bank takes per-expert B only")
        rank = self._check_rank(rank)
        a = self._factors_a(rank, init, A, trainable)
        b = self._given("B", B, (self.d_out, rank), trainable) if B is not None else \
            nn.Parameter(torch.zeros(self.d_out, rank, **self._factory), requires_grad=trainable)
        if a is not None:
            self.A.append(a)
        self.B.append(b)
        return self._register(rank, alpha, use_rslora)

    def _factors_a(self, rank: int, init: str, A: Tensor | None, trainable: bool) -> nn.Parameter | None:
        """The new expert's own ``A`` (``None`` in a shared-A bank); checked before anything is appended."""
        if self.shared_a:
            return None
        if A is not None:
            return self._given("A", A, (rank, self.d_in), trainable)
        a = self._empty(rank, self.d_in)
        init_lora_A(a, init)
        return nn.Parameter(a, requires_grad=trainable)

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.B[expert]] if self.shared_a else [self.A[expert], self.B[expert]]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.A_shared] if self.A_shared is not None else []

    def _sources(self) -> list[Tensor]:
        # the ParameterLists' own dicts: their __iter__ costs ~2 us a parameter, the bank's
        # whole forward budget at E = 1024
        return [*([self.A_shared] if self.shared_a else self.A._parameters.values()), *self.B._parameters.values()]

    def _stack_a(self) -> Tensor:
        """The experts' ``A`` stacked ``[E, r_max, d_in]`` (zero-padded), or the shared ``A``."""
        if self.shared_a:
            return self.A_shared
        return _stack_padded(list(self.A), self.max_rank, rows=True)

    def _stack(self) -> tuple[Tensor, Tensor]:
        return self._stack_a(), _stack_padded(list(self.B), self.max_rank, rows=False)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "shared_a": self.shared_a}

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None, device: Any,
                   base_weight: Tensor | None) -> ExpertBank:
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


def _stack_padded(factors: list[Tensor], r: int, *, rows: bool) -> Tensor:
    """Stack per-expert factors, zero-padding the rank axis (rows of ``A``, columns of ``B``) to ``r``."""
    if all(f.shape[0 if rows else 1] == r for f in factors):
        return torch.stack(factors)
    if rows:
        return torch.stack([F.pad(f, (0, 0, 0, r - f.shape[0])) for f in factors])
    return torch.stack([F.pad(f, (0, r - f.shape[1])) for f in factors])


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...], where: str = "ExpertBank") -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {name} must have shape {list(shape)}; got {list(t.shape)}")
