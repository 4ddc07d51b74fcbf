"""Continual learning: managers (O-LoRA, retrieval experts, SeqLoRA, IncLoRA), the Trainer callback
and metrics. The clbench benchmark harness is application code: :mod:`molora.apps.continual_bench`.
See README "Continual learning"."""

from .baselines import IncLoRAManager, SeqLoRAManager
from .manager import MANAGERS, ContinualError, ContinualManager, base_fingerprint, load_manager
from .olora import OLoRAManager, orthogonality_penalty
from .retrieval import RetrievalExpertsManager

__all__ = [
    "MANAGERS", "ContinualCallback", "ContinualError", "ContinualManager", "IncLoRAManager", "OLoRAManager",
    "RetrievalExpertsManager", "SeqLoRAManager", "base_fingerprint", "load_manager", "orthogonality_penalty",
]


def __getattr__(name: str):
    # The Trainer callback imports transformers' Trainer machinery: only when asked for.
    if name == "ContinualCallback":
        from .callback import ContinualCallback

        return ContinualCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
