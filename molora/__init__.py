"""molora: mixtures of LoRA experts.

Banks of LoRA adapters behind pluggable routers, fast grouped kernels, and continual learning.

    >>> import molora
    >>> config = molora.MoLoRAConfig(target_modules=["query", "value"], num_experts=4, router="topk", top_k=2)
    >>> model = molora.get_molora_model(base_model, config)          # doctest: +SKIP
    >>> routed = molora.compose(base_model, {"a": "adapters/a", "b": "adapters/b"}, router="task")  # doctest: +SKIP
"""

from molora.adapter_pool import AdapterPool
from molora.bank import ExpertBank
from molora.compose import compose
from molora.config import MoLoRAConfig
from molora.context import RoutingSignals, routing
from molora.errors import AdapterError, CheckpointError, MoLoRAError, RoutingError
from molora.layer import RoutedLoRALinear
from molora.model import MoLoRAModel, get_molora_model
from molora.peft_io import load_peft_adapter
from molora.routed_conv import RoutedConv2d
from molora.routed_embedding import RoutedEmbedding
from molora.train_router import train_router

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AdapterPool",
    "CheckpointError",
    "ExpertBank",
    "MoLoRAConfig",
    "MoLoRAError",
    "MoLoRAModel",
    "RoutedConv2d",
    "RoutedEmbedding",
    "RoutedLoRALinear",
    "RoutingError",
    "RoutingSignals",
    "compose",
    "get_molora_model",
    "load_peft_adapter",
    "routing",
    "train_router",
]
