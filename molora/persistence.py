"""Saving and loading molora checkpoints: safetensors + JSON, one atomic commit, verified, no pickle.

A checkpoint is a folder with

* ``molora_model-<sha256[:16]>.safetensors``: the experts' and routers' tensors, keyed
  ``<module>.<param>``, under a name derived from their content (version-1 checkpoints use the
  fixed name ``molora_model.safetensors``; both load);
* ``molora_config.json``: the config, the layout of every routed layer, a cheap fingerprint of
  the targeted base weights, and the name, SHA-256 and size of the weights file.

Commit protocol (:func:`save_checkpoint`):

1. the weights go to a temporary file in the folder, are fsynced and renamed to their content
   name; the folder is fsynced. Nothing refers to that file yet: the old checkpoint is intact.
2. the config naming that file goes to a temporary file, is fsynced and ``os.replace``-d over
   ``molora_config.json``; the folder is fsynced. **This rename is the commit**: before it a
   reader sees the whole old checkpoint, after it the whole new one.
3. only then are weights files no config names removed, and temporary files that killed
   writers left behind (only molora's own names, only ones older than
   :data:`STALE_TEMP_SECONDS`, so a live writer's file is never taken).

Writers to one folder serialise on an advisory ``flock`` of the folder (POSIX; elsewhere,
and on file systems without ``flock``, concurrent writers to one folder are not supported).
Readers take no lock: they read the config, then the file it names, and verify its size and
SHA-256; if a writer's clean-up removed that file in between they re-read the config and retry.

Malformed files (bad JSON, missing keys, wrong types, a newer format version) raise
:class:`~molora.errors.CheckpointError` naming the file and the field. Loading reads no code.

Every checkpoint loads back as the model that was saved (:func:`check_savable`, run before
anything is written or a folder is created): each router's class must be the one registered
under its name, its ``get_config()`` JSON that rebuilds it (same tensors; built on the meta
device, so saving draws no random numbers); the X-LoRA-style classifier is recorded once
(field ``xlora_style``), per-layer routers shared by several layers as ``tied_routers``, and a
merged layer's mixture as ``merged_weights`` (re-merged on load). Anything else is refused
with a CheckpointError saying what to do. Version 3 adds those three optional fields.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from molora.config import MoLoRAConfig
from molora.errors import CheckpointError, MoLoRAError
from molora.layer import RoutedLoRALinear, build_routed_layer, layer_device, layer_from_spec, resident_weight
from molora.routers import build_router

try:  # POSIX only: without it concurrent writers to one folder are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from molora.model import MoLoRAModel

CONFIG_NAME = "molora_config.json"
#: the fixed weights name of version-1 checkpoints (still loaded; removed by the next save)
WEIGHTS_NAME = "molora_model.safetensors"
WEIGHTS_PATTERN = re.compile(r"molora_model-[0-9a-f]{16}\.safetensors")
FORMAT = "molora"
#: 3: optional ``xlora_style`` classifier record, ``tied_routers``, per-layer ``merged_weights``
VERSION = 3
#: a temporary file older than this is a killed writer's, not a live one's
STALE_TEMP_SECONDS = 60.0
#: how often a reader re-reads the config when the weights it names vanished under it
READ_ATTEMPTS = 6
FINGERPRINT_METHOD = "strided-sample-sha256"
FINGERPRINT_SAMPLES = 4096
TEMP_PREFIXES = ("molora_model", "molora_config.json")

_HEX64 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


def _checkpoint_step(step: str) -> None:
    """Fault-injection point: called at each window of the commit protocol (``weights-temp``,
    ``weights-renamed``, ``config-temp``, ``config-renamed``, ``cleanup``, and ``state-temp`` /
    ``state-renamed`` for a continual manager's state). Does nothing; tests replace it to
    crash a save at that moment."""


# ---------------------------------------------------------------------- durable files
def fsync_dir(folder: Path) -> None:
    """Persist renames and removals in ``folder`` (POSIX; not possible on every platform)."""
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write(path: Path, data: bytes, *, step: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a part:
    temporary file in the same folder, fsync, ``os.replace``, fsync of the folder.

    ``step`` names the write for :func:`_checkpoint_step` (``<step>-temp`` once the temporary
    file is durable, ``<step>-renamed`` once it is in place)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if step:
            _checkpoint_step(f"{step}-temp")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    if step:
        _checkpoint_step(f"{step}-renamed")


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (one molora writer at a time; readers never
    lock). The folder itself is locked, so no lock file is left in the checkpoint."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform that cannot open folders
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without flock: unserialised, as documented
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_stale_temps(folder: Path, prefixes: tuple[str, ...] = TEMP_PREFIXES, *, older_than: float = STALE_TEMP_SECONDS) -> list[str]:
    """Remove temporary files of molora's own names (``.<prefix>*.tmp``) that are older than
    ``older_than`` seconds: a killed writer's leftovers. Younger ones may belong to a writer
    that is still running, so they stay for a later save. Returns the names removed."""
    now = time.time()
    removed = []
    for entry in _scandir(folder):
        name = entry.name
        if not (name.endswith(".tmp") and any(name.startswith(f".{p}") for p in prefixes)):
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(name)
    return removed


def remove_unreferenced_weights(folder: Path, keep: str) -> list[str]:
    """Remove the weights files in ``folder`` (content-named, and the version-1 fixed name)
    other than ``keep``: call only after the config naming ``keep`` is committed."""
    removed = []
    for entry in _scandir(folder):
        name = entry.name
        if name != keep and (name == WEIGHTS_NAME or WEIGHTS_PATTERN.fullmatch(name)):
            _checkpoint_step("cleanup")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(name)
    return removed


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []


def read_json(folder: Path, name: str, what: str, error: type[MoLoRAError] = CheckpointError) -> tuple[Path, Any]:
    """``(path, parsed JSON)`` of ``folder / name``; ``error`` naming ``what`` (e.g. "molora
    checkpoint") if the file is missing, truncated or corrupt."""
    path = Path(folder) / name
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise error(f"no {what} at {folder}: {name} is missing") from None
    try:
        return path, json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON (truncated or corrupt): {exc}") from None


def check_finite(tensors: dict[str, Tensor], where: str, error: type[MoLoRAError] = CheckpointError) -> None:
    """Raise ``error`` naming the first tensor with NaN or inf."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise error(f"{where}: tensor {key!r} contains NaN or inf")


# ---------------------------------------------------------------------- field checks
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(pred(x) for x in v)


def _or_none(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or pred(v)


INT = (_is_int, "an integer")
NUM = (_is_num, "a number")
STR = (lambda v: isinstance(v, str), "a string")
BOOL = (lambda v: isinstance(v, bool), "true or false")
DICT = (lambda v: isinstance(v, dict), "a JSON object")
HEX64 = (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None, "64 lowercase hex digits (a SHA-256)")
INTS = (_list_of(_is_int), "a list of integers")
NUMS = (_list_of(_is_num), "a list of numbers")
BOOLS = (_list_of(lambda v: isinstance(v, bool)), "a list of true/false")
STRS = (_list_of(lambda v: isinstance(v, str)), "a list of strings")
_MISSING = object()


def field(doc: Mapping[str, Any], key: str, kind: tuple[Callable[[Any], bool], str], where: str, prefix: str = "", *,
          optional: bool = False, nullable: bool = False, error: type[MoLoRAError] = CheckpointError) -> Any:
    """``doc[key]`` checked against ``kind`` (a predicate and its description); ``error`` naming
    the file (``where``) and the field's dotted path if it is missing or of another type."""
    value = doc.get(key, _MISSING)
    if value is _MISSING:
        if optional:
            return None
        raise error(f"{where}: required field {prefix + key!r} is missing")
    if (value is None and nullable) or kind[0](value):
        return value
    shown = json.dumps(value)[:60] if _jsonable(value) else repr(value)[:60]
    raise error(f"{where}: field {prefix + key!r} must be {kind[1]}{' or null' if nullable else ''}; got {shown}")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def require_object(doc: Any, where: str, what: str, error: type[MoLoRAError] = CheckpointError) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise error(f"{where}: {what} must be a JSON object; got {type(doc).__name__}")
    return doc


def check_version(doc: Mapping[str, Any], where: str, newest: int, prefix: str = "",
                  error: type[MoLoRAError] = CheckpointError) -> int:
    """The format version, refused if it is not a positive integer or newer than ``newest``."""
    version = field(doc, "version", INT, where, prefix, error=error)
    if version < 1:
        raise error(f"{where}: field {prefix + 'version'!r} must be >= 1; got {version}")
    if version > newest:
        raise error(f"{where}: field {prefix + 'version'!r} is {version}, a newer format than this molora reads "
                    f"(versions 1 to {newest}): upgrade molora")
    return version


def validate_meta(meta: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """Check a checkpoint config's structure and types (not yet its fit to a base model).

    ``where`` names the file in errors; ``prefix`` the config's position in it (a continual
    state embeds one under ``model.``)."""
    meta = require_object(meta, where, f"field {prefix.rstrip('.')!r}" if prefix else "the checkpoint config")
    fmt = field(meta, "format", STR, where, prefix)
    if fmt != FORMAT:
        raise CheckpointError(f"{where}: field {prefix + 'format'!r} is {fmt!r}: not a molora checkpoint config (expected {FORMAT!r})")
    check_version(meta, where, VERSION, prefix)
    field(meta, "config", DICT, where, prefix)
    names = field(meta, "expert_names", STRS, where, prefix)
    shared = field(meta, "shared_router", DICT, where, prefix, nullable=True)
    if shared is not None:
        p = f"{prefix}shared_router."
        field(shared, "name", STR, where, p)
        field(shared, "d_in", INT, where, p)
        field(shared, "config", DICT, where, p)
    layers = field(meta, "layers", DICT, where, prefix)
    for name, spec in layers.items():
        validate_layer_spec(spec, len(names), where, f"{prefix}layers.{name}.")
    field(meta, "base_model", DICT, where, prefix, optional=True)
    weights = field(meta, "weights", DICT, where, prefix)
    p = f"{prefix}weights."
    file = field(weights, "file", STR, where, p)
    if file in ("", ".", "..") or "/" in file or "\\" in file or file.startswith("."):
        raise CheckpointError(f"{where}: field {p + 'file'!r} must be a plain file name in the checkpoint folder; got {file!r}")
    field(weights, "sha256", HEX64, where, p)
    if field(weights, "bytes", INT, where, p) < 0:
        raise CheckpointError(f"{where}: field {p + 'bytes'!r} must be >= 0")
    fp = field(meta, "base_fingerprint", DICT, where, prefix, optional=True, nullable=True)
    if fp is not None:
        copied = meta.get("routed_copies")
        validate_fingerprint(fp, set(layers) | (set(copied) if isinstance(copied, dict) else set()), where,
                             f"{prefix}base_fingerprint.")
    validate_extras(meta, where, prefix)
    return meta


def validate_bank_spec(bank: dict, where: str, p: str) -> list[int]:
    """Check one bank's :meth:`~molora.bank.BaseExpertBank.spec` record (types, lengths; a mixed
    bank's ``kinds`` and each of its ``parts``); returns its ranks."""
    field(bank, "d_in", INT, where, p)
    field(bank, "d_out", INT, where, p)
    field(bank, "shared_a", BOOL, where, p)
    field(bank, "shared_rank", INT, where, p, nullable=True)
    ranks = field(bank, "ranks", INTS, where, p)
    lists = {"alphas": field(bank, "alphas", NUMS, where, p), "rslora": field(bank, "rslora", BOOLS, where, p),
             "trainable": field(bank, "trainable", BOOLS, where, p, optional=True),
             "kinds": field(bank, "kinds", STRS, where, p, optional=True)}
    field(bank, "init", STR, where, p, optional=True)
    field(bank, "kind", STR, where, p, optional=True)  # checked against the kinds when the bank is built
    for key, values in lists.items():
        if values is not None and len(values) != len(ranks):
            raise CheckpointError(f"{where}: field {p + key!r} has {len(values)} entries; {p + 'ranks'!r} has {len(ranks)}")
    parts = field(bank, "parts", DICT, where, p, optional=True)
    for kind, part in (parts or {}).items():
        validate_bank_spec(require_object(part, where, f"field {p + 'parts.' + kind!r}"), where, f"{p}parts.{kind}.")
    return ranks


def validate_layer_spec(spec: Any, num_experts: int, where: str, prefix: str) -> None:
    """Check one routed layer's :func:`~molora.layer.layer_spec` record (types, lengths)."""
    spec = require_object(spec, where, f"field {prefix.rstrip('.')!r}")
    bank = field(spec, "bank", DICT, where, prefix)
    ranks = validate_bank_spec(bank, where, f"{prefix}bank.")
    ids = field(spec, "expert_ids", INTS, where, prefix)
    if len(ids) != len(ranks) or any(not 0 <= i < num_experts for i in ids):
        raise CheckpointError(f"{where}: field {prefix + 'expert_ids'!r} must list one of the {num_experts} experts "
                              f"for each of the {len(ranks)} local experts; got {ids}")
    field(spec, "dropout", NUM, where, prefix)
    router = field(spec, "router", DICT, where, prefix, nullable=True)
    if router is not None:
        field(router, "name", STR, where, f"{prefix}router.")
        field(router, "config", DICT, where, f"{prefix}router.")
    merged = field(spec, "merged_weights", NUMS, where, prefix, optional=True, nullable=True)
    if merged is not None and len(merged) != len(ranks):
        raise CheckpointError(f"{where}: field {prefix + 'merged_weights'!r} has {len(merged)} entries; "
                              f"{p + 'ranks'!r} has {len(ranks)}")


def validate_extras(meta: dict[str, Any], where: str, prefix: str = "") -> None:
    """The version-3 fields: the X-LoRA-style classifier record and the tied per-layer routers."""
    layers = meta["layers"]
    xl = field(meta, "xlora_style", DICT, where, prefix, optional=True, nullable=True)
    if xl is not None:
        p = f"{prefix}xlora_style."
        for key in ("d_in", "num_layers", "num_experts", "hidden"):
            field(xl, key, INT, where, p)
        field(xl, "temperature", NUM, where, p)
        field(xl, "dtype", STR, where, p)
    users = [n for n, spec in layers.items() if (spec.get("router") or {}).get("name") == XLORA_STYLE]
    if users and xl is None:
        raise CheckpointError(f"{where}: field {prefix + 'layers.' + users[0] + '.router'!r} names router "
                              f"{XLORA_STYLE!r} but the checkpoint has no field {prefix + 'xlora_style'!r} (its classifier)")
    copies = field(meta, "routed_copies", DICT, where, prefix, optional=True, nullable=True)
    for path, rec in (copies or {}).items():
        p = f"{prefix}routed_copies.{path}."
        rec = require_object(rec, where, f"field {p.rstrip('.')!r}")
        ids = field(rec, "expert_ids", INTS, where, p)
        pinned = field(rec, "pinned", INT, where, p, nullable=True)
        flags = field(rec, "trainable", BOOLS, where, p, optional=True)
        if flags is not None and len(flags) != len(ids):
            raise CheckpointError(f"{where}: field {p + 'trainable'!r} has {len(flags)} entries for {len(ids)} experts")
        n = len(meta["expert_names"])
        if not ids or any(not 0 <= i < n for i in ids) or len(set(ids)) != len(ids) \
                or (pinned is not None and pinned != -1 and pinned not in ids):
            raise CheckpointError(f"{where}: field {p + 'expert_ids'!r} must list distinct experts of the {n} "
                                  f"(and 'pinned' one of them, -1 or null); got {ids}, pinned {pinned}")
        if path in layers:
            raise CheckpointError(f"{where}: field {p.rstrip('.')!r} names a routed LoRA layer")
        tokens = field(rec, "tokens", DICT, where, p, optional=True)
        if tokens is not None and set(tokens) != {str(i) for i in ids}:
            raise CheckpointError(f"{where}: field {p + 'tokens'!r} must list the token ids of each expert {ids}; "
                                  f"got entries {sorted(tokens)}")
        for e in tokens or {}:
            if not field(tokens, e, INTS, where, f"{p}tokens."):
                raise CheckpointError(f"{where}: field {p + 'tokens.' + e!r} lists no token id")
        tied_to = field(rec, "tied_to", STR, where, p, optional=True, nullable=True)
        if tied_to is not None and (tied_to not in copies or not (copies[tied_to] or {}).get("tokens")
                                    or tokens is not None):
            raise CheckpointError(f"{where}: field {p + 'tied_to'!r} must name the trained-token embedding of "
                                  f"'routed_copies'; got {tied_to!r}")
    tied = field(meta, "tied_routers", DICT, where, prefix, optional=True, nullable=True)
    for name, owner in (tied or {}).items():
        p = f"{prefix}tied_routers."
        field(tied, name, STR, where, p)
        if name not in layers or owner not in layers or owner == name or owner in tied:
            raise CheckpointError(f"{where}: field {p + name!r} must map a routed layer to another routed layer "
                                  f"whose router it shares (and which is tied to no other); got {owner!r}")
        if layers[name].get("router") is None or layers[name].get("router") != layers[owner].get("router"):
            raise CheckpointError(f"{where}: field {p + name!r}: layers {name!r} and {owner!r} share a router "
                                  f"but their field 'router' differs")


def validate_fingerprint(fp: dict[str, Any], layers: set[str], where: str, prefix: str) -> None:
    method = field(fp, "method", STR, where, prefix)
    if method != FINGERPRINT_METHOD:
        raise CheckpointError(f"{where}: field {prefix + 'method'!r} is {method!r}; this molora knows {FINGERPRINT_METHOD!r}")
    if field(fp, "samples", INT, where, prefix) < 1:
        raise CheckpointError(f"{where}: field {prefix + 'samples'!r} must be >= 1")
    modules = field(fp, "modules", DICT, where, prefix)
    for name, rec in modules.items():
        p = f"{prefix}modules.{name}."
        rec = require_object(rec, where, f"field {p.rstrip('.')!r}")
        field(rec, "shape", INTS, where, p)
        field(rec, "dtype", STR, where, p)
        field(rec, "sample_sha256", HEX64, where, p)
        field(rec, "merged_sample_sha256", HEX64, where, p, optional=True)
    unknown = sorted(set(modules) - layers)
    if unknown:
        raise CheckpointError(f"{where}: field {prefix + 'modules'!r} names modules that are not routed layers: {unknown[:5]}")


# ---------------------------------------------------------------------- base fingerprint
def sample_digest(weight: Tensor, samples: int) -> str:
    """SHA-256 of ``samples`` values of ``weight`` at fixed, evenly strided flat positions (the
    first and the last included), in the weight's own dtype. Reads ``samples`` values, not the
    tensor: cheap on a 7B model, and any dense change (another base, a folded-in LoRA delta)
    shows."""
    w = weight.detach()
    n = w.numel()
    k = min(n, samples)
    if k == 0:
        return hashlib.sha256(b"").hexdigest()
    flat = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
    # unravel instead of reshape(-1): a non-contiguous weight must not be copied whole
    coords = torch.unravel_index(flat, tuple(w.shape)) if w.dim() > 1 else (flat,)
    picked = w[tuple(c.to(w.device) for c in coords)].to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(picked.view(torch.uint8).numpy().tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unmerged_weight(layer: RoutedLoRALinear) -> Tensor:
    """The layer's base weight without a mixture merged into it."""
    get = getattr(layer, "unmerged_weight", None)
    return get() if callable(get) else resident_weight(layer.base_layer)


def base_fingerprint(layers: Mapping[str, RoutedLoRALinear], samples: int = FINGERPRINT_SAMPLES,
                     copies: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
    """Per routed layer: shape, dtype and :func:`sample_digest` of the *unmerged* base weight,
    and, for a layer saved merged, the digest of the merged weight too (so loading onto a base
    that still holds that merge can be told from loading onto another base). ``copies``: the
    routed per-expert module copies (:mod:`molora.routed_copies`), whose original module's
    weight is fingerprinted too (an expert without a copy runs it)."""
    modules = {}
    for name, c in (copies or {}).items():
        weight = getattr(c.base_layer, "weight", None)
        if isinstance(weight, Tensor):
            modules[name] = {"shape": list(weight.shape), "dtype": _dtype_name(weight.dtype),
                             "sample_sha256": sample_digest(resident_weight(c.base_layer), samples)}
    for name, layer in layers.items():
        weight = unmerged_weight(layer)
        rec = {"shape": list(weight.shape), "dtype": _dtype_name(weight.dtype), "sample_sha256": sample_digest(weight, samples)}
        if getattr(layer, "merged_weights", None) is not None:
            rec["merged_sample_sha256"] = sample_digest(layer.base_layer.weight, samples)
        modules[name] = rec
    return {"method": FINGERPRINT_METHOD, "samples": samples, "modules": modules}


def check_base_fingerprint(modules: Mapping[str, nn.Module], fingerprint: dict[str, Any] | None, where: str) -> None:
    """Refuse a base whose targeted weights are not the ones the checkpoint was saved on.

    The rule, per fingerprinted module: another shape -> another base; another dtype -> values
    not compared (a base loaded in another precision cannot match exactly; shape only); digest
    equal to the saved unmerged one -> fine; equal to the saved *merged* one -> this base still
    holds the checkpoint's merged mixture; otherwise another base. No fingerprint (version-1
    checkpoints, continual managers' models) -> no check."""
    if fingerprint is None:
        return
    samples, records = fingerprint["samples"], fingerprint["modules"]
    differs: list[str] = []
    merged: list[str] = []
    for name, module in modules.items():
        rec, weight = records.get(name), getattr(module, "weight", None)
        if rec is None or not isinstance(weight, Tensor):
            continue
        if list(weight.shape) != rec["shape"]:
            raise CheckpointError(
                f"{where}: the checkpoint was saved on another base model (module {name!r} differs: the checkpoint's "
                f"base weight is [{' x '.join(map(str, rec['shape']))}], this one is [{' x '.join(map(str, weight.shape))}])")
        if _dtype_name(weight.dtype) != rec["dtype"]:
            continue
        try:
            digest = sample_digest(resident_weight(module), samples)
        except MoLoRAError:
            raise CheckpointError(f"{where}: module {name!r}: its weight is on the meta device and no accelerate hook holds "
                                  "it (the base's weights were never loaded): load them first (from_pretrained, or "
                                  "to_empty() and load_state_dict()), or load the base with device_map=...") from None
        if digest == rec["sample_sha256"]:
            continue
        (merged if digest == rec.get("merged_sample_sha256") else differs).append(name)
    more = lambda names: f", and {len(names) - 1} more" if len(names) > 1 else ""  # noqa: E731
    if differs:
        raise CheckpointError(f"{where}: the checkpoint was saved on another base model (module {differs[0]!r} differs"
                              f"{more(differs)}): load it onto the base it was trained on")
    if merged:
        raise CheckpointError(f"{where}: this base already has the checkpoint's merged mixture folded in (module "
                              f"{merged[0]!r}{more(merged)}): load onto a fresh base")


# ---------------------------------------------------------------------- save
XLORA_STYLE = "xlora_style"


def _unsavable(what: str, why: str) -> CheckpointError:
    return CheckpointError(f"save_pretrained refused (nothing was written): {what} {why}")


def check_router_rebuilds(router: nn.Module, what: str, num_experts: int, d_in: int) -> None:
    """Raise :class:`CheckpointError` unless loading can rebuild ``router`` from its checkpoint
    spec: its class is the one registered under its ``name`` in :data:`molora.routers.ROUTERS`,
    ``get_config()`` is JSON, and ``build_router(name, **config)`` (from the JSON as a loader
    reads it) gives the same persistent tensors (keys, shapes, dtypes) and the same
    non-persistent buffers (state rebuilt from the config, e.g. a static router's weights; their
    values are compared when the constructor cannot run on the meta device, as the static
    router's cannot, else their shapes)."""
    from molora.routers import ROUTERS

    name = getattr(router, "name", None)
    cls = ROUTERS.get(name) if isinstance(name, str) else None
    if cls is None or type(router) is not cls:
        registered = f"the router registered as {name!r} is {cls.__name__}" if cls is not None else f"no router is registered as {name!r}"
        raise _unsavable(what, f"is routed by {type(router).__name__} and {registered}, so a checkpoint could not "
                               "rebuild it: register the class with molora.routers.register_router (its get_config() "
                               "returning its JSON constructor arguments), or install a registered router before saving")
    try:
        config = router.get_config()
        text = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _unsavable(what, f"has router {name!r} whose get_config() is not JSON ({exc}): a checkpoint could not "
                               "rebuild it; give the router JSON constructor arguments") from None
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise _unsavable(what, f"has router {name!r} whose get_config() is a {type(parsed).__name__}, not a dict of arguments")
    if router.num_experts != num_experts:
        raise _unsavable(what, f"has router {name!r} over {router.num_experts} experts where loading builds it over "
                               f"{num_experts}")
    try:
        # on meta: no memory, and parameter initialisation draws nothing from the global RNG
        # (a save in one thread must not change another thread's random numbers)
        with torch.device("meta"):
            rebuilt = build_router(name, num_experts=num_experts, d_in=d_in, **parsed)
    except Exception:  # noqa: BLE001 - e.g. a constructor that checks values (the static router's weights)
        try:
            rebuilt = build_router(name, num_experts=num_experts, d_in=d_in, **parsed)
        except Exception as exc:  # noqa: BLE001 - any failure means the checkpoint could not load
            raise _unsavable(what, f"has router {name!r} that cannot be rebuilt from its get_config() {text[:120]}: "
                                   f"{type(exc).__name__}: {exc}") from None
    want = {k: (tuple(v.shape), v.dtype.is_floating_point) for k, v in router.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype.is_floating_point) for k, v in rebuilt.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise _unsavable(what, f"has router {name!r} whose tensors a rebuilt one would not hold (differences {diff}): "
                               "its get_config() does not describe it")
    persistent = set(want)
    mine = {k: v for k, v in router.named_buffers() if k not in persistent}
    theirs = {k: v for k, v in rebuilt.named_buffers() if k not in persistent}


    def differs(k: str) -> bool:  # values are compared where the rebuild holds them (not on meta)
        a, b = mine.get(k), theirs.get(k)
        if a is None or b is None or a.shape != b.shape:
            return True
        return not b.is_meta and not torch.equal(a.detach().cpu().to(b.dtype), b)

    bad = sorted(k for k in mine.keys() | theirs.keys() if differs(k))
    if bad:
        raise _unsavable(what, f"has router {name!r} whose unsaved buffers {bad[:3]} differ from those its get_config() "
                               "rebuilds: a loaded model would route differently")


def xlora_record(model: MoLoRAModel, layers: Mapping[str, RoutedLoRALinear]) -> dict[str, Any] | None:
    """The checkpoint record of the model's X-LoRA-style classifier (``None`` without one);
    CheckpointError if the layers' X-LoRA-style routers are not the one-classifier layout
    :func:`molora.xlora_style.attach_xlora_style` builds."""
    from molora.xlora_style import XLoRAStyleClassifier, XLoRAStyleRouter

    users = {path: layer.router for path, layer in layers.items() if getattr(layer.router, "name", None) == XLORA_STYLE}
    if not users:
        return None
    classifiers = {id(r.classifier): r.classifier for r in users.values() if isinstance(r, XLoRAStyleRouter)}
    if any(type(r) is not XLoRAStyleRouter for r in users.values()) or len(classifiers) != 1:
        raise _unsavable("the model", f"has {XLORA_STYLE!r} routers that do not share one XLoRAStyleClassifier "
                                      f"({len(classifiers)} classifiers): re-attach with molora.xlora_style.attach_xlora_style")
    clf = next(iter(classifiers.values()))
    if type(clf) is not XLoRAStyleClassifier:
        raise _unsavable("the model", f"has a {type(clf).__name__} classifier, not an XLoRAStyleClassifier: save "
                                      "classifier.state_dict() yourself and re-attach it after loading")
    dtypes = {t.dtype for t in clf.state_dict().values()}
    for path, r in users.items():
        if not 0 <= r.layer_index < clf.num_layers or any(not 0 <= e < clf.num_experts for e in r.expert_ids):
            raise _unsavable(f"module {path!r}", f"has an {XLORA_STYLE!r} router reading row {r.layer_index}, experts "
                                                 f"{r.expert_ids} of a [{clf.num_layers} x {clf.num_experts}] classifier")
        if r.num_experts != layers[path].bank.num_experts:
            raise _unsavable(f"module {path!r}", f"has an {XLORA_STYLE!r} router over {r.num_experts} experts; the layer "
                                                 f"holds {layers[path].bank.num_experts}")
    if len(dtypes) != 1:
        raise _unsavable("the model", f"has an X-LoRA-style classifier of mixed dtypes {sorted(map(str, dtypes))}")
    return {"d_in": clf.d_in, "num_layers": clf.num_layers, "num_experts": clf.num_experts, "hidden": clf.hidden,
            "temperature": clf.temperature, "dtype": _dtype_name(dtypes.pop())}


def check_savable(model: MoLoRAModel) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Everything a checkpoint of ``model`` needs to load back as the same model, checked before
    anything is written: ``(X-LoRA-style record or None, tied routers)``; CheckpointError
    naming the module and what to do otherwise."""
    layers = model.routed_layers()
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for path, layer in layers.items():
        router = layer.router
        if router is None:
            continue
        if id(router) in seen:
            tied[path] = seen[id(router)]
            continue
        seen[id(router)] = path
        if getattr(router, "name", None) != XLORA_STYLE:
            check_router_rebuilds(router, f"module {path!r}", layer.bank.num_experts, layer.router_width)
    record = xlora_record(model, layers)
    if model.shared_router is not None:
        check_router_rebuilds(model.shared_router, "the model's shared router", model.num_experts, model.shared_router.d_in)
    return record, tied


def checkpoint_payload(model: MoLoRAModel, *, fingerprint: bool = True) -> tuple[dict[str, Any], bytes]:
    """``(config, weights bytes)`` of a checkpoint of ``model``; the config names the weights
    by their content (``molora_model-<sha256[:16]>.safetensors``) and records size and SHA-256.
    CheckpointError (before anything is computed or written) if the checkpoint could not load
    back as this model (:func:`check_savable`)."""
    xlora, tied = check_savable(model)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.adapter_state_dict().items()}
    blob = st_save(state, metadata={"format": FORMAT})
    digest = hashlib.sha256(blob).hexdigest()
    shared = model.shared_router
    layers = model.layer_specs()
    for name, layer in model.routed_layers().items():  # a merged layer is rebuilt merged
        w = getattr(layer, "merged_weights", None)
        if w is not None:
            layers[name] = {**layers[name], "merged_weights": [float(v) for v in w.tolist()]}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.molora_config.to_dict(),
        "expert_names": model.expert_names,
        "shared_router": None if shared is None else {"name": shared.name, "d_in": shared.d_in, "config": shared.get_config()},
        "layers": layers,
        "base_model": {
            "class": type(model.base_model).__name__,
            "name_or_path": getattr(getattr(model.base_model, "config", None), "_name_or_path", None),
        },
        "weights": {"file": f"molora_model-{digest[:16]}.safetensors", "sha256": digest, "bytes": len(blob)},
        "base_fingerprint": base_fingerprint(model.routed_layers(), copies=model.routed_copies()) if fingerprint else None,
        "xlora_style": xlora,
        "tied_routers": tied or None,
        "routed_copies": {path: c.spec() for path, c in model.routed_copies().items()} or None,
    }
    return meta, blob


def write_weights(folder: Path, meta: Mapping[str, Any], blob: bytes) -> None:
    """Step 1 of the protocol: the weights durable under the name ``meta`` gives them; not yet
    referenced by any committed config."""
    atomic_write(folder / meta["weights"]["file"], blob, step="weights")


def clean_up(folder: Path, keep: str) -> None:
    """Step 3, after the commit: remove the weights the committed config no longer names and
    killed writers' stale temporary files."""
    remove_unreferenced_weights(folder, keep)
    remove_stale_temps(folder)
    fsync_dir(folder)


def save_checkpoint(model: MoLoRAModel, directory: str | os.PathLike, *, fingerprint: bool = True) -> None:
    """Save ``model``'s adapters as one atomic commit (protocol in the module docstring): the
    content-named weights, then the config's rename (the commit), then the clean-up.

    ``fingerprint=False`` leaves out the base fingerprint (for callers that check the base
    themselves, as a continual manager does)."""
    folder = Path(directory)
    meta, blob = checkpoint_payload(model, fingerprint=fingerprint)  # refuses before anything exists on disk
    folder.mkdir(parents=True, exist_ok=True)
    with writer_lock(folder):
        write_weights(folder, meta, blob)
        atomic_write(folder / CONFIG_NAME, json.dumps(meta, indent=2).encode(), step="config")
        clean_up(folder, meta["weights"]["file"])


# ---------------------------------------------------------------------- load
class WeightsVanished(Exception):
    """The weights file a config names is gone: a writer's clean-up after a newer commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


def read_weights(folder: Path, meta: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """The tensors of the weights file ``meta`` names in ``folder``, verified against the size
    and SHA-256 recorded in ``where``; :class:`WeightsVanished` if the file is gone."""
    record = meta["weights"]
    path = Path(folder) / record["file"]
    try:
        with open(path, "rb") as f:  # once open, a concurrent removal cannot take the bytes away
            blob = f.read()
    except FileNotFoundError:
        raise WeightsVanished(path) from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    if len(blob) != record["bytes"] or hashlib.sha256(blob).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{path} is truncated or corrupt: {len(blob)} bytes, expected {record['bytes']} "
                              f"with the checksum recorded in {where}")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    check_finite(tensors, str(path))
    return tensors


C = TypeVar("C")


def read_consistent(read_commit: Callable[[], C], read_payload: Callable[[C], T], what: str) -> tuple[C, T]:
    """``(commit, payload)`` read as one whole checkpoint: if the weights the commit names vanish
    before they are read (a writer committed a newer checkpoint and removed them), read the
    commit again, up to :data:`READ_ATTEMPTS` times."""
    vanished: Path | None = None
    for attempt in range(READ_ATTEMPTS):
        commit = read_commit()
        try:
            return commit, read_payload(commit)
        except WeightsVanished as exc:
            vanished = exc.path
            time.sleep(0.005 * 2 ** attempt)
    raise CheckpointError(f"{vanished} is missing: {what} names it (re-read {READ_ATTEMPTS} times; it stayed missing)")


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a checkpoint folder: its config, then the weights it names
    (CheckpointError naming file and field if anything is off)."""
    folder = Path(directory)

    def commit() -> tuple[Path, dict[str, Any]]:
        path, meta = read_json(folder, CONFIG_NAME, "molora checkpoint")
        return path, validate_meta(meta, str(path))

    (_, meta), tensors = read_consistent(commit, lambda c: read_weights(folder, c[1], str(c[0])), str(folder / CONFIG_NAME))
    return meta, tensors


@contextlib.contextmanager
def _restored_on_error(modules: Mapping[str, nn.Module], written: Mapping[str, nn.Module]) -> Iterator[None]:
    """Undo what loading does to the base modules if it fails: ``requires_grad`` of ``modules``
    (the routed layers' bases), and the values of ``written`` (modules_to_save, loaded in place)."""
    flags = [(p, p.requires_grad) for m in modules.values() for p in m.parameters()]
    values = [(t, t.detach().clone()) for m in written.values() for t in m.state_dict(keep_vars=True).values()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for t, v in values:
                t.copy_(v)
        raise


def build_model(base_model: nn.Module, meta: dict[str, Any], tensors: dict[str, Tensor], where: str) -> MoLoRAModel:
    """Rebuild the routed layers a validated ``meta`` describes on ``base_model`` and load
    ``tensors``. The base fingerprint is checked and everything built before the base model is
    changed, so on any error it is left as it was."""
    from molora.model import MoLoRAModel, find_modules_to_save

    try:
        config = MoLoRAConfig.from_dict(meta["config"])
    except (MoLoRAError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: field 'config' is malformed: {exc}") from None
    names = meta["expert_names"]
    made_for = meta.get("base_model") or "an unrecorded base model"
    modules: dict[str, nn.Module] = {}
    for name in meta["layers"]:
        try:
            modules[name] = base_model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: the base model ({type(base_model).__name__}) has no module {name!r} "
                                  f"(field 'layers'): the checkpoint was made for {made_for}") from None
        if isinstance(modules[name], RoutedLoRALinear):
            raise CheckpointError(f"{where}: module {name!r} is already a routed LoRA layer: load into a plain base model")
    originals = {}  # the modules routed copies are made of: fingerprinted too (missing ones: _build_copies says so)
    for path in meta.get("routed_copies") or {}:
        try:
            originals[path] = base_model.get_submodule(path)
        except AttributeError:
            pass
    check_base_fingerprint({**modules, **originals}, meta.get("base_fingerprint"), where)
    try:
        saved = find_modules_to_save(base_model, config, list(meta["layers"]))
    except MoLoRAError as exc:
        raise CheckpointError(f"{where}: field 'config.modules_to_save': {exc} (checkpoint made for {made_for})") from None
    with _restored_on_error(modules, saved):
        # an X-LoRA-style router is rebuilt around the shared classifier once the layers exist
        layers = {name: _build_layer(base_model, modules[name], name, _without_xlora(spec), len(names), config, where,
                                     made_for) for name, spec in meta["layers"].items()}
        if meta.get("xlora_style") is not None:
            _attach_xlora(layers, meta, where)
        for name, owner in (meta.get("tied_routers") or {}).items():
            layers[name].router = layers[owner].router
        copies = _build_copies(base_model, meta, where, made_for)
        shared = None
        if meta["shared_router"] is not None:
            sr = meta["shared_router"]
            try:
                shared = build_router(sr["name"], num_experts=len(names), d_in=sr["d_in"], **sr["config"])
            except (MoLoRAError, TypeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{where}: field 'shared_router' cannot be built: {exc}") from None
            device = next(iter(layers.values())).bank.device if layers else None
            shared = shared.to(device=device, dtype=config.torch_dtype)
        try:
            load_adapter_tensors(adapter_modules({**layers, **copies}, shared, saved), tensors)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: the weights do not fit the layout of field 'layers': {exc}") from None
        merges = {}
        for name, spec in meta["layers"].items():  # computed and checked before the base changes
            if spec.get("merged_weights") is not None:
                try:
                    merges[name] = layers[name].merged_weight(spec["merged_weights"])
                except MoLoRAError as exc:
                    raise CheckpointError(f"{where}: field 'layers.{name}.merged_weights': {exc}") from None
        model = MoLoRAModel(base_model, config, {**layers, **copies}, expert_names=names, shared_router=shared)
        for name, (merged, w) in merges.items():
            layers[name].commit_merge(merged, w)
        for path, rec in (meta.get("routed_copies") or {}).items():
            copies[path].pinned = rec.get("pinned")
        return model


def _build_copies(base_model: nn.Module, meta: Mapping[str, Any], where: str, made_for: Any) -> dict[str, nn.Module]:
    """The per-expert module copies (PEFT's modules_to_save, :mod:`molora.routed_copies`) that
    ``meta["routed_copies"]`` records: fresh copies of the base modules, whose values the
    checkpoint's tensors then give; the base model is not changed."""
    from molora.routed_copies import RoutedCopies
    from molora.routed_tokens import TiedTokenRows, TokenRows

    built: dict[str, nn.Module] = {}
    for path, rec in (meta.get("routed_copies") or {}).items():
        try:
            module = base_model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{where}: the base model ({type(base_model).__name__}) has no module {path!r} "
                                  f"(field 'routed_copies'): the checkpoint was made for {made_for}") from None
        if isinstance(module, (RoutedLoRALinear, RoutedCopies)):
            raise CheckpointError(f"{where}: module {path!r} is already routed: load into a plain base model")
        try:
            if rec.get("tokens") is not None:  # trained tokens: placeholder rows the tensors then give
                copies = {i: TokenRows.placeholder(module, rec["tokens"][str(i)], name=path) for i in rec["expert_ids"]}
            elif rec.get("tied_to") is not None:  # built after its embedding (below)
                continue
            else:
                copies = {i: copy.deepcopy(module) for i in rec["expert_ids"]}
            trainable = rec.get("trainable") or [False] * len(copies)
            for c, flag in zip(copies.values(), trainable):
                c.requires_grad_(bool(flag))
            built[path] = build_routed_layer(module, name=path, bank=None, router=None, expert_ids=rec["expert_ids"],
                                             num_global_experts=len(meta["expert_names"]), copies=copies)
        except MoLoRAError as exc:
            raise CheckpointError(f"{where}: field 'routed_copies.{path}': {exc}") from None
    for path, rec in (meta.get("routed_copies") or {}).items():
        if rec.get("tied_to") is None:
            continue
        rows = built[rec["tied_to"]]
        try:
            if set(rec["expert_ids"]) != set(rows.expert_ids):
                raise MoLoRAError(f"experts {rec['expert_ids']} differ from the embedding's {rows.expert_ids}")
            module = base_model.get_submodule(path)
            tied = {i: TiedTokenRows(module, rows.copies[str(i)], name=path) for i in rec["expert_ids"]}
            built[path] = build_routed_layer(module, name=path, bank=None, router=None, expert_ids=rec["expert_ids"],
                                             num_global_experts=len(meta["expert_names"]), copies=tied)
            built[path].tied_to = rec["tied_to"]
        except (MoLoRAError, AttributeError) as exc:
            raise CheckpointError(f"{where}: field 'routed_copies.{path}': {exc}") from None
    return built


def _without_xlora(spec: dict) -> dict:
    router = spec.get("router")
    return {**spec, "router": None} if router is not None and router.get("name") == XLORA_STYLE else spec


def _attach_xlora(layers: Mapping[str, RoutedLoRALinear], meta: Mapping[str, Any], where: str) -> None:
    """Rebuild the X-LoRA-style routers of the layers whose spec names them, around one
    classifier built from ``meta["xlora_style"]`` (its tensors are loaded with the layers')."""
    from molora.xlora_style import XLoRAStyleClassifier, XLoRAStyleRouter

    rec = meta["xlora_style"]
    dtype = getattr(torch, rec["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{where}: field 'xlora_style.dtype' must name a floating torch dtype; got {rec['dtype']!r}")
    users = {n: spec["router"]["config"] for n, spec in meta["layers"].items() if _without_xlora(spec) is not spec}
    device = next(iter(layers.values())).bank.device if layers else None
    try:
        clf = XLoRAStyleClassifier(rec["d_in"], rec["num_layers"], rec["num_experts"], hidden=rec["hidden"],
                                   temperature=rec["temperature"]).to(device=device, dtype=dtype)
    except (MoLoRAError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: field 'xlora_style' cannot be built: {exc}") from None
    for name, cfg in users.items():
        layer = layers[name]
        index, ids = cfg.get("layer_index"), cfg.get("expert_ids")
        if not _is_int(index) or not 0 <= index < clf.num_layers or not INTS[0](ids) \
                or len(ids) != layer.bank.num_experts or any(not 0 <= e < clf.num_experts for e in ids):
            raise CheckpointError(f"{where}: field 'layers.{name}.router.config' must give a layer_index in "
                                  f"[0, {clf.num_layers}) and {layer.bank.num_experts} expert_ids in [0, {clf.num_experts}); "
                                  f"got {json.dumps(cfg)[:80]}")
        layer.router = XLoRAStyleRouter(layer.bank.num_experts, layer.router_width, clf, index, ids).to(device)


def _build_layer(base_model: nn.Module, module: nn.Module, name: str, spec: dict, num_experts: int, config: MoLoRAConfig,
                 where: str, made_for: Any) -> RoutedLoRALinear:
    try:
        return layer_from_spec(module, spec, name=name, num_global_experts=num_experts, dtype=config.torch_dtype,
                               device=layer_device(base_model, name))
    except MoLoRAError as exc:
        raise CheckpointError(f"{where}: field 'layers.{name}': {exc} (checkpoint made for {made_for})") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        # validate_layer_spec checked the layout's types; this catches what it cannot know (e.g. router options)
        raise CheckpointError(f"{where}: field 'layers.{name}' cannot be built: {type(exc).__name__}: {exc}") from None


def load_checkpoint(base_model: nn.Module, directory: str | os.PathLike) -> MoLoRAModel:
    """Rebuild the saved routed layers on ``base_model`` and load their tensors (see
    :func:`build_model`: nothing on the base changes on error)."""
    meta, tensors = read_checkpoint(directory)
    return build_model(base_model, meta, tensors, str(Path(directory) / CONFIG_NAME))


def adapter_modules(layers: Mapping[str, RoutedLoRALinear], shared_router: nn.Module | None,
                    saved: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """Where a checkpoint's tensors live: each routed layer under its module path, the model's
    shared router (if any) under ``shared_router``, and each module of
    :attr:`~molora.MoLoRAConfig.modules_to_save` (``saved``) under its module path."""
    modules: dict[str, nn.Module] = dict(layers)
    if shared_router is not None:
        modules["shared_router"] = shared_router
    modules.update(saved or {})
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
    first: dict[tuple, str] = {}
    for key, target in targets.items():
        if target.shape != tensors[key].shape:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(tensors[key].shape)}; the layout needs {tuple(target.shape)}")
        # one tensor under several keys (a router shared by layers, the X-LoRA-style classifier)
        # must be saved the same under each
        seen = first.setdefault((target.data_ptr(), target.shape, target.stride(), target.dtype), key)
        if seen != key and not torch.equal(tensors[seen], tensors[key]):
            raise CheckpointError(f"tensors {seen!r} and {key!r} are one shared tensor of the model but differ in the checkpoint")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
