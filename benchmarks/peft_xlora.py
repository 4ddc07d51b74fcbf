"""Loading PEFT LoRA adapter folders into PEFT's own X-LoRA (``peft.XLoraModel``), for the benchmarks.

PEFT's X-LoRA loader (``peft/tuners/xlora/model.py``, checked on peft 0.21.2) has two quirks
that make it fail, or silently apply no adapter, outside the causal LMs it was written for:

1. Key prefixes (peft issue #2132). ``_load_adapter_into_lora_model`` cuts every saved key down
   to ``model.<rest>`` and prepends ``model.``: it assumes the adapted model holds its
   transformer as the attribute ``.model`` (``LlamaForCausalLM.model``). A bare ``BertModel``
   saves ``base_model.model.encoder.layer.4...``, which becomes ``model.model.encoder.layer.4...``
   while the ``LoraModel`` has ``model.encoder.layer.4...``: "ValueError: Got unexpected keys!".
   Fix: hand X-LoRA a thin wrapper that holds such a model as ``.model``. The adapters'
   ``target_modules`` must then be a list of names (PEFT matches a list by suffix, which still
   holds under the wrapper; a regex string is full-matched against the wrapped path and fails).
2. Adapter names. The adapters are loaded under the names ``"0" .. "N-1"`` but activated under
   the keys of ``XLoraConfig.adapters``; with any other keys every X-LoRA layer skips every
   adapter (no LoRA at all) and the first forward raises ``KeyError`` in
   ``disable_adapter_layers``. Fix: key them ``"0" .. "N-1"``.

One more fact that matters when timing it: the "scaling pass" (the first of X-LoRA's two
forwards, which produces the hidden states its classifier reads) does not skip the LoRA
products. ``XLoraLinearLayer.forward`` ignores the LoRA layers' disabled flag and runs every
adapter with the dummy scalings (``scaling_pass_value``, 0 by default); so both passes do the
full adapter work. ``benchmarks/xlora_forward.py`` counts it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["ModelHolder", "load_peft_xlora"]


class ModelHolder(nn.Module):
    """Holds ``model`` as ``.model`` (the layout X-LoRA's key remapping assumes); forwards calls to it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def load_peft_xlora(base: nn.Module, adapters: Mapping[str, str | os.PathLike], *, task_type: str,
                    **xlora_kwargs: Any) -> nn.Module:
    """PEFT X-LoRA over the adapter folders ``adapters`` (in order), on a deep copy of ``base``.

    Works around the two loader quirks of the module docstring; ``xlora_kwargs`` go to
    ``peft.XLoraConfig`` (``hidden_size`` defaults to ``base.config.hidden_size``). Returns the
    ``PeftModel`` in eval mode; call it as you would ``base``.
    """
    from peft import XLoraConfig, get_peft_model

    if not adapters:
        raise ValueError("load_peft_xlora: needs at least one adapter folder")
    model = copy.deepcopy(base)
    model.config.use_cache = False  # X-LoRA refuses a model that caches keys and values
    if not isinstance(getattr(model, "model", None), nn.Module):
        for name, folder in adapters.items():
            targets = json.loads((Path(folder) / "adapter_config.json").read_text()).get("target_modules")
            if isinstance(targets, str):
                raise ValueError(f"load_peft_xlora: adapter {name!r} targets the regex {targets!r}; under the wrapper "
                                 f"X-LoRA needs for a {type(base).__name__} it would match nothing (use a list of names)")
        model = ModelHolder(model)
    xlora_kwargs.setdefault("hidden_size", base.config.hidden_size)
    cfg = XLoraConfig(task_type=task_type, adapters={str(i): str(p) for i, p in enumerate(adapters.values())},
                      **xlora_kwargs)
    return get_peft_model(model, cfg).eval()
