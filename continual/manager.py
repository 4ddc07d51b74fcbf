"""The continual-learning manager API: tasks arrive one after another, earlier ones must survive.

A manager owns a :class:`~molora.MoLoRAModel` built on the user's base model and is driven from
the user's own training loop::

    manager.begin_task("dbpedia")              # adds/unfreezes what this task trains
    for batch in loader:
        loss = task_loss(manager.model, batch) + manager.penalty()
        loss.backward(); opt.step(); opt.zero_grad()
    manager.end_task()                          # freezes what must not drift
    with manager.routing(texts=inputs):         # inference without a task id
        out = manager.model(**batch)

(or by :class:`molora.continual.callback.ContinualCallback` inside a Hugging Face ``Trainer``).
Strategies subclass :class:`ContinualManager`: O-LoRA (:mod:`.olora`), retrieval experts
(:mod:`.retrieval`), SeqLoRA / IncLoRA (:mod:`.baselines`).

State saves and resumes between tasks (:meth:`ContinualManager.save`, :func:`load_manager`): one
JSON record of the strategy, its options, the finished tasks, a SHA-256 fingerprint of the base
model and the adapters' checkpoint config, committed in one atomic rename together with the
adapters' weights (a kill resumes the old state or the new, never a mix); resuming into a
different base model is refused before anything is touched. Every new expert is initialised under its own seed
(``seed``, task index), so a resumed run draws the same initial weights as an uninterrupted one.

Errors (reusing a task name, ``end_task`` without ``begin_task``, ...) raise
:class:`ContinualError` (a ``ValueError``) before any state changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, ContextManager

import torch
from torch import Tensor, nn

from molora.config import MoLoRAConfig
from molora.errors import CheckpointError, MoLoRAError
from molora.layer import RoutedLoRALinear
from molora.model import MoLoRAModel, get_molora_model

__all__ = ["ContinualError", "ContinualManager", "ContinualStateError", "base_fingerprint", "load_manager", "MANAGERS"]

STATE_NAME = "continual_state.json"
MODEL_DIR = "model"
FORMAT = "molora-continual"
VERSION = 2

#: strategy name -> manager class (filled by the strategy modules on import).
MANAGERS: dict[str, type["ContinualManager"]] = {}


class ContinualError(MoLoRAError):
    """Misuse of a continual-learning manager (task order, resume into another base model, ...)."""


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of a plain (unwrapped) model's parameters
    and buffers, in name order: equal only for the same base weights."""
    if any(isinstance(m, RoutedLoRALinear) for m in model.modules()):
        raise ContinualError("base_fingerprint needs the plain base model, not one with routed LoRA layers")
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ContinualManager:
    """Base class: task bookkeeping, penalty hook, routing hook, save/resume.

    Args:
        base_model: a plain transformers (or torch) model; it is wrapped in place at the first
            :meth:`begin_task` (as :func:`molora.get_molora_model` does).
        target_modules: modules to adapt (PEFT semantics, see :class:`molora.MoLoRAConfig`).
        rank, alpha, dropout, init, use_rslora: LoRA settings of every new expert.
        seed: seeds each new expert's initialisation (with the task index).
    """

    strategy: ClassVar[str] = ""

    def __init__(self, base_model: nn.Module, *, target_modules: list[str] | str, rank: int = 8, alpha: float = 32.0,
                 dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, seed: int = 0) -> None:
        if isinstance(base_model, MoLoRAModel):
            raise ContinualError(f"{type(self).__name__}: pass the plain base model; the manager wraps it itself")
        # Validates target_modules, rank, dropout, ... now rather than at the first task.
        MoLoRAConfig(target_modules=target_modules, num_experts=1, rank=rank, alpha=alpha, dropout=dropout, init=init,
                     use_rslora=use_rslora)
        self.base_model = base_model
        self.target_modules = target_modules
        self.rank, self.alpha, self.dropout, self.init, self.use_rslora = rank, float(alpha), float(dropout), init, use_rslora
        self.seed = int(seed)
        self.tasks: list[str] = []
        self.current: str | None = None
        self._model: MoLoRAModel | None = None
        self.fingerprint = base_fingerprint(base_model)

    # ------------------------------------------------------------------ public API
    @property
    def model(self) -> MoLoRAModel:
        """The routed model (exists from the first :meth:`begin_task` on)."""
        if self._model is None:
            raise ContinualError(f"{type(self).__name__}: no model yet; call begin_task(name) first")
        return self._model

    def begin_task(self, name: str, **kwargs: Any) -> MoLoRAModel:
        """Start training task ``name``; returns the model. Build the optimizer afterwards over
        :meth:`trainable_parameters` (new experts are new parameters)."""
        if not isinstance(name, str) or not name:
            raise ContinualError(f"{type(self).__name__}: task name must be a non-empty string; got {name!r}")
        if self.current is not None:
            raise ContinualError(f"{type(self).__name__}: task {self.current!r} is still running; call end_task() first")
        if name in self.tasks:
            raise ContinualError(f"{type(self).__name__}: task {name!r} was trained already (tasks: {self.tasks}); "
                                 "task names must be unique")
        self._check_begin(name, **kwargs)
        # Each task's new weights come from their own seed: a resumed run draws the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + len(self.tasks))
            self._begin(name, **kwargs)
        self.current = name
        return self.model

    def end_task(self) -> None:
        """Finish the running task: freeze what must not drift, update inference routing."""
        if self.current is None:
            raise ContinualError(f"{type(self).__name__}: end_task() without begin_task(); finished tasks: {self.tasks}")
        self._check_end(self.current)
        self._end(self.current)
        self.tasks.append(self.current)
        self.current = None

    def penalty(self) -> Tensor:
        """Regulariser to add to the task loss of every step (0 for strategies without one)."""
        return self._zero()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the running task trains."""
        return self.model.trainable_parameters()

    def routing(self, texts: Sequence[str] | None = None, embeddings: Tensor | None = None) -> ContextManager[Any]:
        """Context for inference forwards (no task id). Static strategies need nothing."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ hooks for strategies
    def _check_begin(self, name: str, **kwargs: Any) -> None:
        if kwargs:
            raise ContinualError(f"{type(self).__name__}.begin_task takes no options {sorted(kwargs)}")

    def _begin(self, name: str, **kwargs: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_end(self, name: str) -> None:
        pass

    def _end(self, name: str) -> None:
        pass

    def options(self) -> dict[str, Any]:
        """JSON-serialisable constructor options (saved with the state)."""
        return {"target_modules": self.target_modules, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "init": self.init, "use_rslora": self.use_rslora, "seed": self.seed}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _restore(self, extra: dict[str, Any]) -> None:
        """Re-apply what the checkpoint cannot hold (freezing, merges) after loading."""

    # ------------------------------------------------------------------ helpers
    def _config(self, first_expert: str, **overrides: Any) -> MoLoRAConfig:
        kw = dict(target_modules=self.target_modules, num_experts=1, rank=self.rank, alpha=self.alpha,
                  dropout=self.dropout, init=self.init, use_rslora=self.use_rslora, router="static",
                  expert_names=[first_expert])
        kw.update(overrides)
        return MoLoRAConfig(**kw)

    def _add_expert(self, name: str, **config_overrides: Any) -> int:
        """Create the model with expert ``name`` or add ``name`` to it; returns its index."""
        if self._model is None:
            self._model = get_molora_model(self.base_model, self._config(name, **config_overrides))
            return 0
        return self._model.add_expert(name)

    def _zero(self) -> Tensor:
        device = next(iter(self._model.routed_layers().values())).bank.device if self._model is not None else None
        return torch.zeros((), device=device)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Save the state between tasks as one atomic commit: a kill at any moment leaves the
        old state or the new one, never a mix.

        Protocol (see :mod:`molora.persistence`): the model's content-named weights go to
        ``model/``, then ``model/molora_config.json`` (so ``model/`` loads on its own with
        ``MoLoRAModel.from_pretrained``), then ``continual_state.json``, which holds the strategy,
        its options, the finished tasks, the base fingerprint *and* the model's whole config
        naming its weights file: **its rename is the commit**. Weights no longer named are removed
        only after it. The model's own base fingerprint is left out: O-LoRA folds finished tasks
        into the base weights, so they no longer match a fresh base; :func:`load_manager` checks
        the whole base (SHA-256 of every weight) before anything is loaded instead.
        """
        if self.current is not None:
            raise ContinualError(f"{type(self).__name__}: save between tasks; task {self.current!r} is running")
        from molora import persistence as ps

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        model_dir = folder / MODEL_DIR
        meta, blob = ps.checkpoint_payload(self._model, fingerprint=False) if self._model is not None else (None, b"")
        state = {"format": FORMAT, "version": VERSION, "strategy": self.strategy, "options": self.options(),
                 "tasks": list(self.tasks), "base_fingerprint": self.fingerprint, "extra": self._extra_state(),
                 "model": meta}
        state_bytes = json.dumps(state, indent=2).encode()
        with ps.writer_lock(folder):
            if meta is None:
                ps.atomic_write(folder / STATE_NAME, state_bytes, step="state")
            else:
                model_dir.mkdir(exist_ok=True)
                with ps.writer_lock(model_dir):
                    ps.write_weights(model_dir, meta, blob)
                    ps.atomic_write(model_dir / ps.CONFIG_NAME, json.dumps(meta, indent=2).encode(), step="config")
                    ps.atomic_write(folder / STATE_NAME, state_bytes, step="state")  # the commit
                    ps.clean_up(model_dir, meta["weights"]["file"])
            ps.remove_stale_temps(folder, (STATE_NAME,))


class ContinualStateError(ContinualError, CheckpointError):
    """A saved continual-learning state is missing, malformed or of a newer format (both a
    :class:`ContinualError` and a :class:`~molora.errors.CheckpointError`)."""


def read_state_file(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(path, state)`` of a saved manager, its structure and types checked
    (:class:`ContinualStateError` naming the file and the field otherwise)."""
    from molora.persistence import DICT, STR, STRS, check_version, field, read_json, require_object, validate_meta

    path, state = read_json(Path(directory), STATE_NAME, "continual-learning state", ContinualStateError)
    where, err = str(path), ContinualStateError
    state = require_object(state, where, "the continual-learning state", err)
    fmt = field(state, "format", STR, where, error=err)
    if fmt != FORMAT:
        raise err(f"{where}: field 'format' is {fmt!r}: not a molora continual-learning state (expected {FORMAT!r})")
    version = check_version(state, where, VERSION, error=err)
    strategy = field(state, "strategy", STR, where, error=err)
    if strategy not in MANAGERS:
        raise err(f"{where}: field 'strategy' is {strategy!r}, an unknown strategy; known: {sorted(MANAGERS)}")
    field(state, "options", DICT, where, error=err)
    tasks = field(state, "tasks", STRS, where, error=err)
    field(state, "base_fingerprint", STR, where, error=err)
    field(state, "extra", DICT, where, optional=True, error=err)
    if version >= 2:
        meta = field(state, "model", DICT, where, nullable=True, error=err)
        if meta is None and tasks:
            raise err(f"{where}: field 'model' is null but tasks {tasks} were trained")
        if meta is not None:
            try:
                validate_meta(meta, where, "model.")
            except CheckpointError as exc:
                raise err(str(exc)) from None
    return path, state


def read_state(directory: str | Path) -> dict[str, Any]:
    """The checked state of a saved manager (see :func:`read_state_file`)."""
    return read_state_file(directory)[1]


def load_manager(base_model: nn.Module, directory: str | Path, **runtime: Any) -> ContinualManager:
    """Resume a saved manager on ``base_model`` (which must be the same base it was trained on).

    ``runtime`` passes what cannot be saved (e.g. ``embed_fn`` of the retrieval manager). The
    state and the weights it names are read and verified as one whole (re-read if a concurrent
    save removed the weights in between), and the base model is checked (fingerprint) before it
    is wrapped, so on any error it is left untouched. Version-1 states (model config in
    ``model/`` only) still load.
    """
    from molora.persistence import read_consistent, read_weights

    flags = {name: p.requires_grad for name, p in base_model.named_parameters()}

    folder = Path(directory)

    def payload(commit: tuple[Path, dict[str, Any]]) -> dict[str, Tensor] | None:
        path, state = commit
        meta = state.get("model")
        if meta is None:
            return None
        try:
            return read_weights(folder / MODEL_DIR, meta, f"{path} field 'model'")
        except CheckpointError as exc:
            if isinstance(exc, ContinualStateError):
                raise
            raise ContinualStateError(str(exc)) from None

    (path, state), tensors = read_consistent(lambda: read_state_file(folder), payload, f"{folder / STATE_NAME} field 'model'")
    cls = MANAGERS[state["strategy"]]
    try:
        manager = cls(base_model, **state["options"], **runtime)
    except TypeError as exc:
        raise ContinualStateError(f"{path}: field 'options' does not fit the {state['strategy']!r} manager: {exc}") from None
    if manager.fingerprint != state["base_fingerprint"]:
        raise ContinualError(
            f"cannot resume {state['strategy']!r} from {directory}: the base model differs from the one it was "
            f"trained on (fingerprint {manager.fingerprint[:12]} != saved {state['base_fingerprint'][:12]})")
    if state.get("model") is not None:
        from molora.persistence import build_model

        manager._model = build_model(base_model, state["model"], tensors, f"{path} field 'model'")
    elif state["version"] == 1 and state["tasks"]:
        manager._model = MoLoRAModel.from_pretrained(base_model, str(folder / MODEL_DIR))
    manager.tasks = list(state["tasks"])
    try:
        manager._restore(state.get("extra") or {})
    except BaseException:
        if manager._model is not None:  # nothing half-applied: the base model goes back as it was
            manager._model.unmerge()
            manager._model.unload()
            for name, param in base_model.named_parameters():
                param.requires_grad_(flags.get(name, param.requires_grad))
        raise
    return manager
