"""Shared validators for every number, tensor and name that enters molora.

Each takes ``where`` (who is asking: ``"MoLoRAConfig"``, ``"adapter 'a' (path/adapter_config.json)"``,
``"export_peft"``, ...) and, where it checks one value, ``field`` (what the value is), so the
error says exactly what is wrong and where. They raise ``error`` (default
:class:`~molora.errors.MoLoRAError`, a ``ValueError``); callers pass a narrower class
(:class:`~molora.errors.AdapterError`, :class:`~molora.errors.RoutingError`, ...) where it fits.
Nothing is ever silently coerced: ``True`` is not the number 1, ``"8"`` is not the int 8, and a
NaN or an infinity is refused wherever a number is expected.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from molora.errors import MoLoRAError

__all__ = [
    "finite_number",
    "finite_tensor",
    "mixture_weights",
    "non_finite_entries",
    "positive_int",
    "unique_names",
]


def _as_python_number(value: Any) -> Any:
    """A one-element tensor or numpy scalar as its Python number; anything else unchanged."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dim() <= 1:
        return value.item()
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()  # numpy scalar / 0-d array
    return value


def finite_number(
    value: Any,
    where: str,
    field: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    error: type[MoLoRAError] = MoLoRAError,
) -> float:
    """``value`` as a finite ``float``; ``error`` naming ``field`` for NaN, inf, bools, strings,
    None or anything else that is not a real number, and for values outside ``[low, high]``
    (``low_open``/``high_open`` exclude the bound)."""
    v = _as_python_number(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise error(f"{where}: {field} must be a number; got {value!r} ({type(value).__name__})")
    v = float(v)
    if not math.isfinite(v):
        raise error(f"{where}: {field} must be a finite number; got {v!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise error(f"{where}: {field} must be {'>' if low_open else '>='} {low:g}; got {v!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise error(f"{where}: {field} must be {'<' if high_open else '<='} {high:g}; got {v!r}")
    return v


def positive_int(value: Any, where: str, field: str, *, low: int = 1, error: type[MoLoRAError] = MoLoRAError) -> int:
    """``value`` as an ``int >= low`` (bools, floats such as ``8.0`` and strings are refused)."""
    v = _as_python_number(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise error(f"{where}: {field} must be {what}; got {value!r} ({type(value).__name__})")
    return int(v)


def non_finite_entries(t: Tensor) -> int:
    """How many entries of ``t`` are NaN or +-inf (0 for integer and bool tensors)."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    return int((~torch.isfinite(t)).sum())


def finite_tensor(t: Any, where: str, field: str, *, error: type[MoLoRAError] = MoLoRAError) -> Tensor:
    """``t`` as a tensor; ``error`` naming ``field`` if it is not numeric or holds NaN/inf
    (the message counts the bad entries)."""
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise error(f"{where}: {field} must be a numeric tensor; got {type(t).__name__} ({exc})") from None
    if t.dtype == torch.bool:
        raise error(f"{where}: {field} must be a numeric tensor; got dtype {t.dtype}")
    bad = non_finite_entries(t)
    if bad:
        nan = int(torch.isnan(t).sum())
        raise error(
            f"{where}: {field} contains NaN or inf ({nan} NaN, {bad - nan} inf of {t.numel()} entries, shape {tuple(t.shape)})"
        )
    return t


def mixture_weights(
    weights: Mapping[str, Any] | Sequence[Any] | Tensor,
    names: Sequence[str],
    where: str,
    *,
    error: type[MoLoRAError] = MoLoRAError,
) -> list[float]:
    """One finite ``float`` per expert of ``names``, in that order.

    ``weights`` maps expert names to weights (a name left out weighs 0; a name that is not an
    expert is refused, listing the experts) or gives one weight per expert (a list, tuple,
    tensor or array of exactly ``len(names)`` numbers). NaN, inf, bools and non-numbers are
    refused, naming the expert.
    """
    names = list(names)
    if isinstance(weights, Mapping):
        bad_keys = [k for k in weights if not isinstance(k, str)]
        if bad_keys:
            raise error(f"{where}: weights must be keyed by expert name (str); got keys {bad_keys!r}")
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise error(f"{where}: unknown experts {sorted(unknown)}; experts are {names}")
        return [finite_number(weights[n], where, f"weight of expert {n!r}", error=error) if n in weights else 0.0
                for n in names]
    if isinstance(weights, (str, bytes)) or weights is None:
        raise error(f"{where}: weights must map expert names to numbers or list one number per expert; got {weights!r}")
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise error(f"{where}: weights must be a 1-D tensor of {len(names)} entries; got shape {tuple(weights.shape)}")
        values = weights.detach().cpu().tolist()
    elif isinstance(weights, Iterable):
        values = list(weights)
    else:
        raise error(f"{where}: weights must map expert names to numbers or list one number per expert; got {weights!r}")
    if len(values) != len(names):
        raise error(f"{where}: expected {len(names)} weights (one per expert {names}); got {len(values)}")
    return [finite_number(v, where, f"weight of expert {n!r}", error=error) for v, n in zip(values, names)]


def unique_names(names: Iterable[Any], where: str, *, what: str = "names", error: type[MoLoRAError] = MoLoRAError) -> list[str]:
    """``names`` as a list of non-empty, distinct strings; ``error`` listing the empty/non-string
    entries or the duplicates (with how often each occurs) otherwise."""
    if isinstance(names, (str, bytes)):
        raise error(f"{where}: {what} must be a list of strings, not one string {names!r}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise error(f"{where}: {what} must be non-empty strings; got {bad!r} in {names!r}")
    dups = {n: c for n, c in Counter(names).items() if c > 1}
    if dups:
        listed = ", ".join(f"{n!r} x{c}" for n, c in dups.items())
        raise error(f"{where}: {what} must be distinct; duplicated: {listed}")
    return names
