"""Reading Hugging Face PEFT LoRA adapters — the one loader for adapter files.

A PEFT LoRA adapter folder holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ...)
and ``adapter_model.safetensors`` (or the legacy ``adapter_model.bin``) with tensors
``base_model.model.<module>.lora_A.weight [r, d_in]`` and ``...lora_B.weight [d_out, r]``.
The LoRA factors are stored the same way for ``Conv1D`` (``fan_in_fan_out``) modules; only the
base weight is transposed there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from molora.bank import lora_scaling
from molora.config import pattern_matches
from molora.errors import AdapterError

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_FLAGS = {"use_dora": "DoRA", "lora_bias": "LoRA bias"}


@dataclasses.dataclass
class LoraFactors:
    """One module's LoRA factors: ``delta W = scaling * B @ A``."""

    A: Tensor
    B: Tensor
    alpha: float
    use_rslora: bool

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)


@dataclasses.dataclass
class PeftLoraAdapter:
    """A PEFT LoRA adapter read from disk: its config and its factors per module path."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraFactors]


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of
    the module path as a regular expression (``(.*\\.)?(key)$``)."""
    for key, value in (patterns or {}).items():
        if pattern_matches(key, module):
            return value
    return default


def _read_tensors(folder: Path, name: str) -> dict[str, Tensor]:
    st, binary = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            return load_file(str(st))
        if binary.is_file():
            # Legacy pickle files are read without executing code (tensors only).
            return torch.load(binary, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read the weights in {folder}: {exc}") from None
    raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def load_peft_adapter(path: str | os.PathLike, name: str | None = None) -> PeftLoraAdapter:
    """Read a PEFT LoRA adapter folder; AdapterError for anything molora cannot use exactly."""
    folder = Path(path)
    name = name or folder.name
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {name!r}: {cfg_path} not found (expected a PEFT adapter folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not valid JSON: {exc}") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r} is a {peft_type or 'non-PEFT'} adapter; molora composes LoRA adapters only")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"adapter {name!r} uses {what} ({flag}=true), which molora does not support")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"adapter {name!r} also saves full modules {config['modules_to_save']}; molora composes the LoRA factors "
            "only and would silently drop them"
        )
    tensors = _read_tensors(folder, name)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"adapter {name!r}: unsupported tensor {key!r} (only lora_A/lora_B of linear layers are supported)")
        factors.setdefault(m["module"], {})[m["ab"]] = value
    modules: dict[str, LoraFactors] = {}
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: module {module!r} has lora_{''.join(ab)} but not both factors")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"adapter {name!r}: module {module!r} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, not [r, d_in] and [d_out, r]")
        rank = pattern_value(config.get("rank_pattern"), module, r_default)
        if A.shape[0] != rank:
            raise AdapterError(f"adapter {name!r}: module {module!r} has rank {A.shape[0]} but its config says r={rank}")
        for ab_name, t in (("lora_A", A), ("lora_B", B)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"adapter {name!r}: {ab_name} of module {module!r} contains NaN or inf")
        alpha = float(pattern_value(config.get("alpha_pattern"), module, alpha_default))
        modules[module] = LoraFactors(A=A, B=B, alpha=alpha, use_rslora=bool(config.get("use_rslora", False)))
    if not modules:
        raise AdapterError(f"adapter {name!r} in {folder} holds no LoRA weights")
    return PeftLoraAdapter(name=name, path=folder, config=config, modules=modules)
