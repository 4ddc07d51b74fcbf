"""Mixed banks: experts of several kinds behind one router in one layer.

Every kind reduces to the routed op's contract ``delta = sum_e g_e s_e B_e A_e x`` after its own
materialisation (:meth:`~molora.bank.BaseExpertBank._stack`), so a bank of mixed kinds is the
concatenation of the kinds' stacks along the expert axis. :class:`MixedBank` keeps one sub-bank
(a *part*) per kind, holding that kind's experts in the order they were added, and a map from
each expert of the layer to its part and its index there:

    A = cat_k pad(A^(k)) [perm],   B = cat_k pad(B^(k)) [perm]

``pad`` zero-pads a part's rank axis to the widest part (exact: padded channels add 0; a shared
factor, HydraLoRA's or QR-LoRA's, is expanded to one copy per expert of its part) and ``perm``
puts the experts back in the layer's order. The kernel, the routers, the losses and the stacked
cache see one bank; materialisation is one batched op per kind (no Python loop over experts).

Kinds that rescale the base output (DoRA: ``sum_e g_e (c_e - 1) * W0 x``) do it over their own
experts' gates; the other kinds' experts contribute ``c_e - 1 = 0`` there, which is what they are
(``y_e = W0 x + s_e B_e A_e x``). So one-hot routing to any expert equals that expert alone, of
whatever kind: PEFT's output with that adapter active. Merging and export sum the parts' own
:meth:`~molora.bank.BaseExpertBank.delta_weight` over the mixture weights of their experts (a DoRA
part adds its ``(a - 1) W0``), so every kind keeps its exact static form.

Model-level tools of one kind (``ard_penalty``/``prune_ard``, ``ortho_penalty``,
:class:`~molora.optim.RiemannianSGD`, :class:`~molora.optim.LoFT`) find that kind's part
(:meth:`~molora.bank.BaseExpertBank.part_of`). A mixed bank holds no shared-``A`` (HydraLoRA) part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molora.bank import BaseExpertBank
from molora.kernels.reference import dense_gates
from molora.kinds.dora import _Fixed


class MixedBank(BaseExpertBank):
    """E experts of several kinds for one base layer (kind ``"mixed"``): expert ``e`` is expert
    ``local(e)`` of the part of kind ``kinds[e]``; ``delta_e(x) = s_e B_e A_e x`` as that kind
    materialises it.

    Args:
        d_in, d_out: the base layer's features.
        base_weight: the base weight ``[d_out, d_in]``, for parts built from it (QR-LoRA's ``Q``,
            DoRA's magnitude init); a routed layer attaches its own (:meth:`attach_base`).
        init: default initialisation of new experts' ``A`` (see :func:`~molora.bank.init_lora_A`).
        dtype, device: of the parameters.
    """

    kind = "mixed"

    def __init__(self, d_in: int, d_out: int, *, base_weight: Tensor | None = None, init: str = "kaiming",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(d_in, d_out, dtype=dtype, device=device)
        self.parts = nn.ModuleDict()
        self.kinds: list[str] = []
        self.local: list[int] = []
        self.init = init
        # a function, not a tensor attribute: the base weight is the layer's (an nn.Parameter
        # assigned here would become a parameter of the bank)
        self._base_fn: Callable[[], Tensor] | None = _Fixed(base_weight) if base_weight is not None else None
        self._perm: tuple | None = None

    # ------------------------------------------------------------------ parts
    def members(self, kind: str) -> list[int]:
        """The experts (indices in this bank) of kind ``kind``, in their part's order."""
        return [e for e, k in enumerate(self.kinds) if k == kind]

    def part_of(self, cls: type) -> tuple[BaseExpertBank, list[int]] | None:
        for kind, part in self.parts.items():
            if isinstance(part, cls):
                return part, self.members(kind)
        return None

    def _base(self) -> Tensor | None:
        return self._base_fn() if self._base_fn is not None else None

    def _new_part(self, kind: str, rank: int) -> BaseExpertBank:
        from molora.kinds import bank_class

        spec = {"kind": kind, "d_in": self.d_in, "d_out": self.d_out, "shared_a": False,
                "shared_rank": rank if kind == "qr_lora" else None, "init": self.init, "ranks": [], "alphas": [],
                "rslora": []}
        part = bank_class(kind)._from_spec(spec, base_weight=self._base(), **self._factory)
        if self._base_fn is not None:
            part.attach_base(self._base_fn)
        return part

    def attach_base(self, base_weight: Callable[[], Tensor]) -> None:
        """Hand ``base_weight`` to every part (and to parts made later). Only a DoRA part reads it,
        and it keeps its previous base when it refuses this one."""
        for part in self.parts.values():
            part.attach_base(base_weight)
        self._base_fn = base_weight

    def add_expert(self, rank: int | None, alpha: float, *, kind: str = "lora", use_rslora: bool = False,
                   init: str | None = None, trainable: bool = True, **factors: Tensor) -> int:
        """Append one expert of kind ``kind`` (its part's ``add_expert`` with ``factors``, e.g.
        ``A=``, ``B=``, ``magnitude=``, ``dR=``) and return its index; ``init=None`` takes the
        kind's default. Checked and made by the part before anything is booked here."""
        from molora.kinds import EXPERT_KINDS

        if kind not in EXPERT_KINDS:
            raise ValueError(f"MixedBank: kind must be one of {list(EXPERT_KINDS)}; got {kind!r}")
        new = kind not in self.parts
        part = self._new_part(kind, self._check_rank(rank) if rank is not None else 1) if new else self.parts[kind]
        if rank is None:
            rank = part.fixed_rank
        kwargs = {"init": init} if init is not None else {}
        local = part.add_expert(rank, alpha, use_rslora=use_rslora, trainable=trainable, **kwargs, **factors)
        if new:
            self.parts[kind] = part
        self.kinds.append(kind)
        self.local.append(local)
        self._perm = None
        return self._register(part.ranks[local], alpha, use_rslora)

    def sync_parts(self) -> None:
        """Take ranks, alphas and scalings from the parts again (after a part changed them in
        place, as :func:`~molora.kinds.ard_lora.prune_ard` does)."""
        self.ranks = [self.parts[k].ranks[i] for k, i in zip(self.kinds, self.local)]
        self.alphas = [self.parts[k].alphas[i] for k, i in zip(self.kinds, self.local)]
        self.rslora = [self.parts[k].rslora[i] for k, i in zip(self.kinds, self.local)]
        self._refresh_scaling()
        self._stacked_cache = None

    # ------------------------------------------------------------------ the bank's contract
    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return self.parts[self.kinds[expert]].expert_parameters(self.local[expert])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts.values() for p in part.shared_parameters()]

    def _sources(self) -> list[Tensor]:
        return [t for part in self.parts.values() for t in part._sources()]

    def _layout(self, device: torch.device) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The permutation from the parts' concatenation to this bank's order (``None``: identity)
        and each part's experts as an index tensor, made once per layout and device."""
        cached = self._perm
        if cached is not None and cached[0] == device:
            return cached[1], cached[2]
        offsets, start = {}, 0
        for kind, part in self.parts.items():
            offsets[kind] = start
            start += part.num_experts
        order = [offsets[k] + i for k, i in zip(self.kinds, self.local)]
        perm = None if order == list(range(len(order))) else torch.tensor(order, device=device)
        cols = {kind: torch.tensor(self.members(kind), device=device) for kind in self.parts}
        self._perm = (device, perm, cols)  # one assignment: a thread sees a whole layout
        return perm, cols

    def _stack(self) -> tuple[Tensor, Tensor]:
        stacks = [(part, part._stack()) for part in self.parts.values()]
        width = max(B.shape[2] for _, (_, B) in stacks)
        As, Bs = [], []
        for part, (A, B) in stacks:
            if A.dim() == 2:  # a part's shared A: one copy per expert of the part
                A = A.unsqueeze(0).expand(part.num_experts, -1, -1)
            pad = width - B.shape[2]
            As.append(F.pad(A, (0, 0, 0, pad)) if pad else A)
            Bs.append(F.pad(B, (0, pad)) if pad else B)
        dtype = torch.promote_types(As[0].dtype, Bs[0].dtype)
        A = torch.cat([a.to(dtype) for a in As])
        B = torch.cat([b.to(dtype) for b in Bs])
        order, _ = self._layout(A.device)
        if order is not None:
            A, B = A.index_select(0, order), B.index_select(0, order)
        return A, B

    def expert_factors(self, expert: int) -> tuple[Tensor, Tensor]:
        return self.parts[self.kinds[expert]].expert_factors(self.local[expert])

    def _unpadded(self, stack: tuple[Tensor, Tensor], expert: int) -> tuple[Tensor, Tensor]:
        return self.expert_factors(expert)

    def output_scale(self, gates: Tensor, indices: Tensor | None) -> Tensor | None:
        """The parts' base-output factors over their own experts' gates, summed (``None`` when
        no part rescales the base output)."""
        scaling = [(k, p) for k, p in self.parts.items() if p.rescales_base]
        if not scaling:
            return None
        dense = dense_gates(gates, indices, self.num_experts)
        _, cols = self._layout(dense.device)
        total = None
        for kind, part in scaling:
            s = part.output_scale(dense.index_select(1, cols[kind]), None)
            total = s if total is None else total + s
        return total

    @property
    def rescales_base(self) -> bool:
        return any(p.rescales_base for p in self.parts.values())

    def _split(self, weights: Sequence[float] | Tensor) -> dict[str, Tensor]:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (self.num_experts,):
            raise ValueError(f"MixedBank: expected {self.num_experts} weights; got shape {tuple(w.shape)}")
        return {kind: w[self.members(kind)] for kind in self.parts}

    def static_scale(self, weights: Sequence[float] | Tensor) -> Tensor | None:
        """``a = 1 + sum_e w_e (c_e - 1)`` over the parts that rescale the base output (``None``: none does)."""
        parts = {k: w for k, w in self._split(weights).items() if self.parts[k].rescales_base}
        if not parts:
            return None
        return 1 + sum(self.parts[k].static_scale(w) - 1 for k, w in parts.items())

    def delta_weight(self, weights: Sequence[float] | Tensor) -> Tensor:
        """``sum_k delta_k(w_k)``: each part's own static form over its experts' weights (float32)."""
        delta = torch.zeros(self.d_out, self.d_in, dtype=torch.float32, device=self.device)
        for kind, w in self._split(weights).items():
            if bool((w != 0).any()):
                delta += self.parts[kind].delta_weight(w.float()).to(delta.device)
        return delta

    # ------------------------------------------------------------------ spec
    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "init": self.init, "kinds": list(self.kinds),
                "parts": {kind: part.spec() for kind, part in self.parts.items()}}

    @classmethod
    def _from_spec(cls, spec: dict[str, Any], *, dtype: torch.dtype | None, device: Any,
                   base_weight: Tensor | None) -> MixedBank:
        """From a saved spec (its ``parts``, one spec per kind) or a fresh layout (``kinds``, one per
        expert, with the bank's ranks, alphas and rslora): ValueError for an inconsistent one."""
        from molora.kinds import EXPERT_KINDS, bank_class

        if spec.get("shared_a"):
            raise ValueError("MixedBank: a mixed bank has no shared A (shared_a must be false)")
        kinds, n = spec.get("kinds"), len(spec["ranks"])
        if not isinstance(kinds, list) or len(kinds) != n or not all(isinstance(k, str) and k in EXPERT_KINDS for k in kinds):
            raise ValueError(f"MixedBank: 'kinds' must list one kind of {list(EXPERT_KINDS)} "
                             f"for each of the {n} experts; got {kinds!r}")
        init = spec.get("init", "kaiming")
        bank = cls(spec["d_in"], spec["d_out"], base_weight=base_weight, init=init, dtype=dtype, device=device)
        parts = spec.get("parts")
        trainable = spec.get("trainable", [True] * n)
        order = list(dict.fromkeys(kinds))
        if parts is None:  # a fresh layout: each kind's experts from the bank's lists
            parts = {}
            for kind in order:
                ids = [e for e in range(n) if kinds[e] == kind]
                parts[kind] = {"kind": kind, "d_in": spec["d_in"], "d_out": spec["d_out"], "shared_a": False,
                               "shared_rank": spec["ranks"][ids[0]] if kind == "qr_lora" else None, "init": init,
                               **{key: [spec[key][e] for e in ids] for key in ("ranks", "alphas", "rslora")},
                               "trainable": [trainable[e] for e in ids]}
        if not isinstance(parts, dict) or list(parts) != order:
            raise ValueError(f"MixedBank: 'parts' must hold one spec per kind, in the order the kinds first appear "
                             f"({order}); got {list(parts) if isinstance(parts, dict) else parts!r}")
        for kind in order:
            part_spec = parts[kind]
            ids = [e for e in range(n) if kinds[e] == kind]
            if not isinstance(part_spec, dict) or part_spec.get("kind", kind) != kind or part_spec.get("shared_a") or \
                    [int(r) for r in part_spec.get("ranks", [])] != [int(spec["ranks"][e]) for e in ids]:
                raise ValueError(f"MixedBank: part {kind!r} must be a {kind!r} spec without shared_a whose ranks are "
                                 f"its experts' {[spec['ranks'][e] for e in ids]}")
            part = bank_class(kind)._from_spec({**part_spec, "d_in": spec["d_in"], "d_out": spec["d_out"]},
                                               dtype=dtype, device=device, base_weight=base_weight)
            bank.parts[kind] = part
        counts: dict[str, int] = {}
        for e, kind in enumerate(kinds):
            bank.kinds.append(kind)
            bank.local.append(counts.get(kind, 0))
            counts[kind] = bank.local[-1] + 1
        bank.sync_parts()
        if [float(a) for a in spec["alphas"]] != bank.alphas or [bool(s) for s in spec["rslora"]] != bank.rslora:
            raise ValueError("MixedBank: the parts' alphas or rslora differ from the bank's")
        return bank

    def extra_repr(self) -> str:
        counts = {k: len(self.members(k)) for k in self.parts}
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.num_experts}, mixed={counts}"
