"""Hugging Face ``Trainer`` integration: balancing losses in the training loss, routing logs and
molora-only checkpoints.

:class:`MoLoRATrainer` is ``transformers.Trainer`` with three changes:

* **loss**: ``loss = task_loss + model.aux_loss()`` (added by the model's forward, which puts it in
  ``output.loss`` and ``output.aux_loss``; a plain Trainer gets that too) where ``aux_loss`` is the configured
  balancing losses of the forward that produced ``task_loss`` (Mixtral/GShard, Switch, z-loss,
  ... with the coefficients of :class:`~molora.MoLoRAConfig`; see
  :func:`molora.routers.losses.model_aux_loss`). Transformers' Mixtral adds its router loss to
  the LM loss the same way (``loss += router_aux_loss_coef * aux_loss``). Under gradient
  accumulation the aux term is averaged over the micro-batches, whichever way the Trainer
  normalises the task loss (per micro-batch, or by ``num_items_in_batch``). Under DDP each
  process adds the aux loss of its own tokens and DDP averages the gradients.
* **logs**: every ``logging_steps`` the mean ``aux_loss`` over the steps since the last log and a
  summary of the routing over the same steps (padding excluded; see :mod:`molora.stats`), a few
  keys whatever the model's size (``routing_log="summary"``, default): ``routing/mean_load_cv``
  and ``routing/max_load_cv``, the mean and the largest over routed layers of the load
  coefficient of variation ``CV_l = std_e(f_{l,e}) / mean_e(f_{l,e})`` of the token shares
  ``f_{l,e}``, and ``routing/min_expert_share = min_{l,e} E_l f_{l,e}`` (1: every expert of
  every layer gets its even share; 0: some expert gets no token). ``"layer"`` adds one load CV
  per layer (``routing/<layer>/load_cv``), ``"expert"`` every layer's share per expert
  (``routing/<layer>/<expert>``), ``"none"`` logs only ``aux_loss``.
* **checkpoints**: ``save_model`` and every ``save_strategy`` checkpoint write the molora
  checkpoint (``molora_config.json`` + ``molora_model.safetensors``: experts and routers, not
  the frozen base model); ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end``
  load it back into the running model.

:class:`MoLoRATrainerMixin` holds all of it, for combining with other Trainer subclasses
(``class MySFT(MoLoRATrainerMixin, SFTTrainer)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from molora.errors import CheckpointError
from molora.model import MoLoRAModel
from molora.persistence import CONFIG_NAME, adapter_modules, load_adapter_tensors, read_checkpoint
from molora.stats import RoutingTally

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - transformers is a dependency
    raise ImportError("molora.integrations needs transformers (pip install transformers)") from exc

ROUTING_LOGS = ("summary", "layer", "expert", "none")


def find_molora_model(model: nn.Module) -> MoLoRAModel:
    """The :class:`MoLoRAModel` inside ``model`` (itself, or wrapped by DDP/accelerate/compile)."""
    seen = model
    for _ in range(8):  # DDP(.module), compile(._orig_mod), ... nest a few levels at most
        if isinstance(seen, MoLoRAModel):
            return seen
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if seen is None:
            break
    raise ValueError(
        f"molora.integrations: the Trainer's model must be a MoLoRAModel (get_molora_model, compose, "
        f"MoLoRAModel.from_pretrained); got {type(model).__name__}"
    )


def load_molora_weights(model: MoLoRAModel, directory: str | os.PathLike) -> None:
    """Load a molora checkpoint's experts and routers into the running ``model`` in place.

    The checkpoint must have the model's layout (same layers, experts, ranks and routers), as
    the Trainer's own checkpoints do; parameters keep their identity, so optimizers stay valid.
    Raises :class:`~molora.CheckpointError` (nothing changed) on any mismatch.
    """
    meta, tensors = read_checkpoint(directory)
    if meta["expert_names"] != model.expert_names:
        raise CheckpointError(f"{directory}: experts {meta['expert_names']} differ from the model's {model.expert_names}")
    load_adapter_tensors(adapter_modules(model.routed_layers(), model.shared_router, model.saved_modules()), tensors)


class MoLoRATrainerMixin:
    """Mixin for ``transformers.Trainer`` subclasses; see the module docstring.

    Extra keyword argument: ``routing_log`` (``"summary"``, default, ``"layer"``, ``"expert"`` or ``"none"``).
    """

    def __init__(self, *args: Any, routing_log: str = "summary", **kwargs: Any) -> None:
        if routing_log not in ROUTING_LOGS:
            raise ValueError(f"MoLoRATrainer: routing_log must be one of {ROUTING_LOGS}; got {routing_log!r}")
        super().__init__(*args, **kwargs)
        self.molora_model = find_molora_model(self.model)
        self.routing_log = routing_log
        self._reset_routing_window()

    # ------------------------------------------------------------------ loss
    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer treats this micro-batch's loss as already normalised over the whole
        accumulated batch (then it does not divide by the accumulation steps); mirrors ``training_step``."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def _device_loss_scale(self, num_items_in_batch: Any) -> float:
        """The factor ``Trainer.compute_loss`` multiplies the model's loss by when it averages
        tokens across devices (1 otherwise); mirrors ``compute_loss``."""
        if not (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            return 1.0
        if self.args.n_gpu > 1:
            return float(self.args.n_gpu)
        tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return float(max(self.accelerator.num_processes // tp, 1))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        """``task_loss + model.aux_loss()``, the aux term per micro-batch (averaged under accumulation).

        The model adds the aux term to the loss it returns (:meth:`MoLoRAModel.forward`); this
        passes the weight that makes it count once per optimizer step. When the Trainer computes
        the task loss itself (label smoothing, ``compute_loss_func``) the term is added here."""
        weight = 1.0
        if model.training and self._loss_scaled_for_ga(num_items_in_batch):
            weight = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        # as Trainer.compute_loss decides whether the loss is the model's or its own
        trainer_loss = self.compute_loss_func is not None or (self.label_smoother is not None and "labels" in inputs)
        inputs = {**inputs, "aux_loss_weight": weight / self._device_loss_scale(num_items_in_batch)}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, Mapping) else None
        if aux is None or trainer_loss:  # the loss does not hold the model's aux term: add it here
            aux = (self.molora_model.aux_loss() if aux is None else aux).to(loss.device)
            loss = loss + weight * aux
        if model.training:
            self._accumulate_routing(aux)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _reset_routing_window(self) -> None:
        self._aux_sum = torch.zeros(())
        self._aux_count = 0
        self._tally = RoutingTally()

    def _accumulate_routing(self, aux: Tensor) -> None:
        self._aux_sum = self._aux_sum + aux.detach().float().cpu()
        self._aux_count += 1
        if self.routing_log != "none":
            self._tally.update(self.molora_model)

    def _gather_mean(self, value: Tensor) -> Tensor:
        """Mean over processes (every process calls ``log``); the value itself on one process."""
        if self.args.world_size > 1:
            value = self.accelerator.gather(value.to(self.args.device).reshape(1, -1)).mean(0)
        return value.cpu()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``aux_loss`` and expert utilisation to the training logs (those that carry ``loss``)."""
        if "loss" in logs and self._aux_count:
            logs["aux_loss"] = round(float(self._gather_mean(self._aux_sum / self._aux_count)), 6)
            stats = self._tally.result()["layers"]
            cvs, shares = [], []
            for name, s in stats.items():
                frac = self._gather_mean(torch.tensor(s["token_fraction"], dtype=torch.float64))
                cv = float(frac.std(unbiased=False) / frac.mean()) if frac.mean() > 0 else 0.0
                cvs.append(cv)
                if frac.sum() > 0:
                    shares.append(float(frac.min() / frac.sum()) * frac.numel())
                if self.routing_log == "layer":
                    logs[f"routing/{name}/load_cv"] = round(cv, 4)
                elif self.routing_log == "expert":
                    for expert, f in zip(s["experts"], frac.tolist()):
                        logs[f"routing/{name}/{expert}"] = round(f, 4)
            if cvs:
                logs["routing/mean_load_cv"] = round(sum(cvs) / len(cvs), 4)
                logs["routing/max_load_cv"] = round(max(cvs), 4)
            if shares:
                logs["routing/min_expert_share"] = round(min(shares), 4)
            self._reset_routing_window()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the molora checkpoint (not the base model), the tokenizer and the training args."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.molora_model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():
            raise ValueError(f"MoLoRATrainer: no molora checkpoint at {resume_from_checkpoint} ({CONFIG_NAME} is missing)")
        load_molora_weights(find_molora_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_molora_weights(self.molora_model, self.state.best_model_checkpoint)


class MoLoRATrainer(MoLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` for a :class:`~molora.MoLoRAModel`: adds ``model.aux_loss()`` to the
    loss, logs ``aux_loss`` and per-layer expert utilisation, and saves/resumes molora checkpoints.

    >>> trainer = MoLoRATrainer(model=molora_model, args=TrainingArguments(...), train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()                                                                            # doctest: +SKIP
    """
