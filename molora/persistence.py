"""Saving and loading molora checkpoints: safetensors + JSON, atomic, verified, no pickle.

A checkpoint is a folder with

* ``molora_model.safetensors``: the experts' and routers' tensors, keyed ``<module>.<param>``;
* ``molora_config.json``: the config, the layout of every routed layer, and the SHA-256 and size
  of the weights file.

Each file is written to a temporary file in the same folder, flushed to disk and renamed over
the old one, weights first. A crash mid-save leaves either the old checkpoint or a weights file
whose checksum the (old) config rejects — never a checkpoint that loads half-written.
Loading reads no code: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from molora.config import MoLoRAConfig
from molora.errors import CheckpointError, MoLoRAError
from molora.layer import RoutedLoRALinear, layer_from_spec
from molora.routers import build_router

if TYPE_CHECKING:
    from molora.model import MoLoRAModel

CONFIG_NAME = "molora_config.json"
WEIGHTS_NAME = "molora_model.safetensors"
FORMAT = "molora"
VERSION = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    with _suppress():  # persist the rename itself (POSIX); not possible on every platform
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


def read_json(folder: Path, name: str, what: str, error: type[MoLoRAError] = CheckpointError) -> tuple[Path, Any]:
    """``(path, parsed JSON)`` of ``folder / name``; ``error`` naming ``what`` (e.g. "molora
    checkpoint") if the file is missing, truncated or corrupt."""
    path = folder / name
    if not path.is_file():
        raise error(f"no {what} at {folder}: {name} is missing")
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON (truncated or corrupt): {exc}") from None


def check_finite(tensors: dict[str, Tensor], where: str, error: type[MoLoRAError] = CheckpointError) -> None:
    """Raise ``error`` naming the first tensor with NaN or inf."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise error(f"{where}: tensor {key!r} contains NaN or inf")


def save_checkpoint(model: MoLoRAModel, directory: str | os.PathLike) -> None:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.adapter_state_dict().items()}
    blob = st_save(state, metadata={"format": FORMAT})
    shared = model.shared_router
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "expert_names": model.expert_names,
        "shared_router": None if shared is None else {"name": shared.name, "d_in": shared.d_in, "config": shared.get_config()},
        "layers": model.layer_specs(),
        "base_model": {
            "class": type(model.base_model).__name__,
            "name_or_path": getattr(getattr(model.base_model, "config", None), "_name_or_path", None),
        },
        "weights": {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)},
    }
    atomic_write(folder / WEIGHTS_NAME, blob)
    atomic_write(folder / CONFIG_NAME, json.dumps(meta, indent=2).encode())


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a checkpoint folder: its JSON and its tensors (CheckpointError if anything is off)."""
    folder = Path(directory)
    cfg_path, meta = read_json(folder, CONFIG_NAME, "molora checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a molora checkpoint config")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{cfg_path} has format version {meta['version']}; this molora reads up to {VERSION}")
    w_path = folder / meta["weights"]["file"]
    if not w_path.is_file():
        raise CheckpointError(f"{w_path} is missing")
    blob = w_path.read_bytes()
    expected = meta["weights"]
    if len(blob) != expected["bytes"] or hashlib.sha256(blob).hexdigest() != expected["sha256"]:
        raise CheckpointError(
            f"{w_path} is truncated or corrupt: {len(blob)} bytes, expected {expected['bytes']} "
            "with the checksum recorded in the config"
        )
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{w_path} cannot be read: {exc}") from None
    check_finite(tensors, str(w_path))
    return meta, tensors


def load_checkpoint(base_model: nn.Module, directory: str | os.PathLike) -> MoLoRAModel:
    """Rebuild the saved routed layers on ``base_model`` and load their tensors.

    Everything is built and checked before the base model is touched, so on any error the base
    model is left as it was.
    """
    from molora.model import MoLoRAModel

    meta, tensors = read_checkpoint(directory)
    config = MoLoRAConfig.from_dict(meta["config"])
    names = meta["expert_names"]
    layers: dict[str, RoutedLoRALinear] = {}
    for name, spec in meta["layers"].items():
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"the base model ({type(base_model).__name__}) has no module {name!r}: "
                f"the checkpoint was made for {meta['base_model']}"
            ) from None
        if isinstance(module, RoutedLoRALinear):
            raise CheckpointError(f"module {name!r} is already a routed LoRA layer: load into a plain base model")
        try:
            layers[name] = layer_from_spec(module, spec, name=name, num_global_experts=len(names), dtype=config.torch_dtype)
        except MoLoRAError as exc:
            raise CheckpointError(f"{exc} (checkpoint made for {meta['base_model']})") from None
    shared = None
    if meta["shared_router"] is not None:
        sr = meta["shared_router"]
        shared = build_router(sr["name"], num_experts=len(names), d_in=sr["d_in"], **sr["config"])
        device = next(iter(layers.values())).bank.B[0].device if layers else None
        shared = shared.to(device=device, dtype=config.torch_dtype)
    load_adapter_tensors(adapter_modules(layers, shared), tensors)
    return MoLoRAModel(base_model, config, layers, expert_names=names, shared_router=shared)


def adapter_modules(layers: Mapping[str, RoutedLoRALinear], shared_router: nn.Module | None) -> dict[str, nn.Module]:
    """Where a checkpoint's tensors live: each routed layer under its module path, and the
    model's shared router (if any) under ``shared_router``."""
    modules: dict[str, nn.Module] = dict(layers)
    if shared_router is not None:
        modules["shared_router"] = shared_router
    return modules


def adapter_tensors(modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """molora's tensors of ``modules`` (experts and routers, never the frozen base layers),
    keyed ``<prefix>.<state-dict key>``; detached views of the live tensors."""
    return {
        f"{prefix}.{key}": value
        for prefix, module in modules.items()
        for key, value in module.state_dict().items()
        if not key.startswith("base_layer.")
    }


def load_adapter_tensors(modules: Mapping[str, nn.Module], tensors: dict[str, Tensor]) -> None:
    """Copy ``tensors`` into the modules' parameters and buffers, after checking every key and shape."""
    targets = adapter_tensors(modules)
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match the layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, target in targets.items():
        if target.shape != tensors[key].shape:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(tensors[key].shape)}; the layout needs {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
