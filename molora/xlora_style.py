"""An X-LoRA-style learned classifier over pretrained adapters, in one forward pass.

X-LoRA (Buehler & Buehler, 2024; ``peft.XLoraModel``) mixes frozen adapters with token-level,
per-layer scalings predicted by a small classifier. It runs the model twice per step: first with
the adapters off to get the last hidden state the classifier reads, then again with the
predicted scalings (PEFT issue #1472 measures ~6x the latency of a plain LoRA).

Here the classifier reads the *input of the first routed layer* instead: for a transformer that
is the embedding output (the first attention projection's input), available at the start of the
one and only forward. It predicts the scalings of every routed layer at once,

    h_t         = input of the first routed layer at token t            [tokens, d]
    z_t         = W_2 act(W_1 h_t)  (or W h_t when hidden = 0)          [tokens, L * E]
    g_{t,l,.}   = softmax(z_{t,l,.} / tau)  over the experts layer l holds

and every later layer reads its row ``l`` of the same prediction from the forward scope's
cache (:mod:`molora.context`), so the classifier runs once per forward and the adapters are
applied in that same pass: no second forward with the adapters off. The price is that the
classifier sees shallower features than X-LoRA's last hidden state.

``W_2`` starts at zero, so an untrained classifier mixes the adapters uniformly. Train it with
:func:`molora.train_router` (``router="existing"``): only the classifier's parameters train.
Checkpoints: ``save_pretrained`` records the classifier once (field ``xlora_style``: sizes,
``hidden``, ``temperature``, dtype; its tensors under the layers' router keys) and
``from_pretrained`` rebuilds the per-layer routers around one shared classifier, so a
checkpoint loads back to the same model (outputs bit-equal). Layouts that
:func:`attach_xlora_style` does not build (several classifiers, a classifier subclass) are
refused by ``save_pretrained`` before anything is written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from molora.context import RoutingSignals, current_scope
from molora.errors import MoLoRAError, RoutingError
from molora.model import MoLoRAModel
from molora.routers import Router, RoutingDecision

__all__ = ["XLoRAStyleClassifier", "XLoRAStyleRouter", "attach_xlora_style"]


class XLoRAStyleClassifier(nn.Module):
    """Token-level logits for all routed layers at once: ``[tokens, d] -> [tokens, L, E]``."""

    def __init__(self, d_in: int, num_layers: int, num_experts: int, *, hidden: int = 64, temperature: float = 1.0) -> None:
        super().__init__()
        if hidden < 0 or num_layers < 1 or num_experts < 1:
            raise ValueError(f"XLoRAStyleClassifier: bad sizes hidden={hidden}, num_layers={num_layers}, num_experts={num_experts}")
        if not temperature > 0:
            raise ValueError(f"XLoRAStyleClassifier: temperature must be > 0; got {temperature!r}")
        self.d_in, self.num_layers, self.num_experts = d_in, num_layers, num_experts
        self.hidden = int(hidden)
        self.temperature = float(temperature)
        out = nn.Linear(hidden or d_in, num_layers * num_experts)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), out) if hidden else out

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[-1] != self.d_in:
            raise RoutingError(f"XLoRAStyleClassifier: input must be [tokens, {self.d_in}]; got shape {tuple(h.shape)}")
        z = self.net(h.reshape(-1, self.d_in).to(next(self.parameters()).dtype))
        return z.view(-1, self.num_layers, self.num_experts) / self.temperature


class XLoRAStyleRouter(Router):
    """Layer ``layer_index``'s view of a shared :class:`XLoRAStyleClassifier` (token-level gates)."""

    name = "xlora_style"

    def __init__(self, num_experts: int, d_in: int, classifier: XLoRAStyleClassifier | None = None,
                 layer_index: int = 0, expert_ids: list[int] | None = None) -> None:
        super().__init__(num_experts, d_in)
        if classifier is None:
            raise ValueError("router 'xlora_style' is built by molora.xlora_style.attach_xlora_style (it needs the shared classifier)")
        self.classifier = classifier
        self.layer_index = int(layer_index)
        self.expert_ids = list(range(num_experts)) if expert_ids is None else list(expert_ids)
        self.register_buffer("_ids", torch.tensor(self.expert_ids, dtype=torch.long), persistent=False)

    def get_config(self) -> dict[str, Any]:
        return {"layer_index": self.layer_index, "expert_ids": self.expert_ids}

    def forward(self, x: Tensor, signals: RoutingSignals) -> RoutingDecision:
        scope = current_scope()
        if scope is None:
            raise RoutingError("router 'xlora_style' decides once per forward: call the MoLoRAModel (it opens the forward scope)")
        logits = scope.cached(self.classifier, lambda: self.classifier(x))
        tokens = x.numel() // x.shape[-1]
        if logits.shape[0] != tokens:
            raise RoutingError(f"router 'xlora_style': the classifier scored {logits.shape[0]} tokens but layer "
                               f"{self.layer_index} sees {tokens}")
        z = logits[:, self.layer_index, :].index_select(1, self._ids)
        return RoutingDecision(gates=torch.softmax(z, dim=-1), logits=z)


def attach_xlora_style(model: MoLoRAModel, *, hidden: int = 64, temperature: float = 1.0) -> XLoRAStyleClassifier:
    """Route ``model`` by one X-LoRA-style classifier (module docstring); returns the classifier.

    The classifier's input width is that of the first routed layer in module order (the first
    one a forward reaches in a transformer). Replaces any existing routers.
    """
    layers = model.routed_layers()
    if not layers:
        raise MoLoRAError("attach_xlora_style: the model has no routed layers")
    first = next(iter(layers.values()))
    device = first.bank.device
    classifier = XLoRAStyleClassifier(first.router_width, len(layers), model.num_experts, hidden=hidden,
                                      temperature=temperature).to(device)
    index = {path: i for i, path in enumerate(layers)}
    model.set_layer_routers(
        lambda path, layer: XLoRAStyleRouter(layer.bank.num_experts, layer.router_width, classifier, index[path],
                                             list(layer.expert_ids)).to(device),
        XLoRAStyleRouter.name, {"hidden": hidden, "temperature": temperature})
    return classifier
