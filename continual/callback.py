"""Drive a continual-learning manager from a Hugging Face ``Trainer``.

One ``Trainer.train()`` per task::

    manager.begin_task("dbpedia")                  # before the Trainer builds its optimizer
    trainer = Trainer(model=manager.model.base_model, args=args, train_dataset=ds,
                      callbacks=[ContinualCallback(manager)])
    trainer.train()                                 # the callback ends the task when training ends

A ``TrainerCallback`` cannot change the loss the Trainer differentiates, so the callback adds the
manager's penalty through its gradient: right before each optimizer step it runs
``penalty().backward()``, which adds ``d penalty / d theta`` to the accumulated task gradients,
i.e. the step follows ``d (L_task + penalty) / d theta``. The penalty is applied once per optimizer
step (with gradient accumulation the task loss is averaged over the micro-batches, the penalty is
not repeated), and after the Trainer's gradient clipping (``max_grad_norm``), which therefore
clips the task gradient only.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .manager import ContinualError, ContinualManager

__all__ = ["ContinualCallback"]


class ContinualCallback(TrainerCallback):
    """Adds ``manager.penalty()`` to every optimizer step and calls ``end_task()`` at train end.

    Args:
        manager: the continual-learning manager; ``begin_task`` must be called before
            ``trainer.train()`` (the Trainer collects the trainable parameters when it starts).
        end_task_on_train_end: call ``manager.end_task()`` when training ends (default True).
    """

    def __init__(self, manager: ContinualManager, *, end_task_on_train_end: bool = True) -> None:
        if not isinstance(manager, ContinualManager):
            raise ContinualError(f"ContinualCallback needs a ContinualManager; got {type(manager).__name__}")
        self.manager = manager
        self.end_task_on_train_end = end_task_on_train_end

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if self.manager.current is None:
            raise ContinualError("ContinualCallback: call manager.begin_task(name) before trainer.train() "
                                 f"(finished tasks: {self.manager.tasks})")
        if optimizer is not None:
            # The new task's parameters must be in the optimizer the Trainer built.
            in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [p for p in self.manager.trainable_parameters() if id(p) not in in_opt]
            if missing:
                raise ContinualError(f"ContinualCallback: {len(missing)} trainable parameters of task "
                                     f"{self.manager.current!r} are not in the Trainer's optimizer; create the "
                                     "Trainer after manager.begin_task(name)")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pen = self.manager.penalty()
        if pen.requires_grad:
            pen.backward()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.end_task_on_train_end and self.manager.current is not None:
            self.manager.end_task()
