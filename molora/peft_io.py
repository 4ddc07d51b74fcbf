"""Reading Hugging Face PEFT LoRA adapters — the one loader for adapter files.

A PEFT LoRA adapter folder holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ...)
and ``adapter_model.safetensors`` with tensors
``base_model.model.<module>.lora_A.weight [r, d_in]`` and ``...lora_B.weight [d_out, r]`` (DoRA,
``use_dora``: also ``...lora_magnitude_vector [d_out]``).
The LoRA factors are stored the same way for ``Conv1D`` (``fan_in_fan_out``) modules; only the
base weight is transposed there. An ``nn.Embedding`` LoRA is ``...lora_embedding_A [r, V]`` and
``...lora_embedding_B [d, r]`` (PEFT may save the base embedding ``...base_layer.weight`` with
it); an ``nn.Conv2d`` LoRA is ``lora_A.weight [r, c_in, k_h, k_w]`` and ``lora_B.weight
[c_out, r, 1, 1]``, read flattened to ``[r, c_in k_h k_w]`` and ``[c_out, r]``
(:attr:`LoraFactors.layer` says which). A ``target_parameters`` adapter is the exception: PEFT's
``ParamWrapper`` adds ``s B A`` to the parameter as it is stored, so on a ``Conv1D`` weight
``[d_in, d_out]`` its factors are swapped and transposed (:func:`module_factors`).

Modules saved whole with the adapter (``modules_to_save``, saved as ``<module>.<param>``) are read
into :attr:`PeftLoraAdapter.saved_modules`; :func:`molora.compose` runs them as per-expert copies
(:mod:`molora.routed_copies`). Trained embedding rows (``trainable_token_indices``, saved as
``<embedding>.token_adapter.trainable_tokens_delta``) are read into
:attr:`PeftLoraAdapter.token_rows` and run as each expert's rows (:mod:`molora.routed_tokens`).

Only safetensors are read: a legacy ``adapter_model.bin`` is a pickle, which can run code when
it is loaded, so a folder that only has one gets an AdapterError saying how to convert it.
Every field molora reads from ``adapter_config.json`` and every tensor is checked (types,
NaN/inf, shapes), with an AdapterError naming the file and the field or tensor.

The config is then read by PEFT itself (``PeftConfig.from_pretrained``), so every field PEFT knows
is seen: each :class:`peft.LoraConfig` field is either one molora composes exactly, one that does
not change the forward (training or initialisation only, metadata), or a LoRA variant molora does
not implement (aLoRA, LoRA bias, QALoRA, ...), which is an AdapterError naming the
field and its value when it differs from PEFT's default. A field this table does not list (a newer
PEFT) is refused the same way when it is not the default, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from molora.bank import lora_scaling
from molora.checks import finite_number, finite_tensor, positive_int
from molora.config import pattern_matches
from molora.errors import AdapterError

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# An Embedding LoRA's factors (PEFT: ``<module>.lora_embedding_A [r, V]``/``_B [d, r]``).
_EMBEDDING = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
# The base weight PEFT saves next to an Embedding LoRA (``save_embedding_layers``, e.g. LLaMA's embed_tokens)
_BASE_WEIGHT = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
# DoRA's magnitude: ``<module>.lora_magnitude_vector`` as PEFT saves it (``.weight`` in older files)
_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?$")
_BOOL_FLAGS = ("use_rslora", "use_dora", "lora_bias", "use_qalora")
# Conv LoRA factors by number of dims (PEFT stores lora_A [r, c_in, *kernel] for ConvNd).
_CONV = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}

# peft.LoraConfig fields molora composes exactly: the factors' scaling, and which modules have
# factors (read from the tensors themselves, so the targeting rules are already applied).
_COMPOSED = frozenset({
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "target_parameters",
    "fan_in_fan_out",  # transposes the base weight only; the factors are stored the same way
    "use_dora",  # DoRA: the magnitude vectors load as experts of a "dora" bank (molora.kinds.dora)
    "modules_to_save",  # whole modules saved with the adapter: per-expert copies (molora.routed_copies)
    "trainable_token_indices",  # trained embedding rows: per-expert rows (molora.routed_tokens)
})
# Fields that do not change an eval forward: metadata, runtime, training-only (dropout, VeLoRA's
# backward) and initialisation-only (the saved factors are what the initialisation produced).
_NO_FORWARD_EFFECT = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "lora_dropout", "velora_config", "init_lora_weights", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core", "ensure_weight_tying",
    "qalora_group_size",  # only read when use_qalora (refused below)
})
# init_lora_weights that move the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ): only their
# converted form (init_lora_weights=True, a delta on the original base) composes.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoRA variants molora does not implement: composing them as plain LoRA would be silently wrong.
_REFUSED = {
    "alora_invocation_tokens": "aLoRA (the adapter acts only from its invocation tokens on; plain LoRA would "
                               "change every token before them)",
    "lora_bias": "a bias on lora_B",
    "bias": "trained base-layer biases saved with the adapter",
    "use_qalora": "QALoRA (input pooling before lora_A)",
    "layer_replication": "replicated base layers",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampling on the factors)",
    "kasa_config": "KaSA (a truncated base weight and learned singular values)",
    "arrow_config": "Arrow routing",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
}


@dataclasses.dataclass
class LoraFactors:
    """One module's LoRA factors: ``delta W = scaling * B @ A``; for a DoRA adapter also its
    magnitude ``m [d_out]`` (:mod:`molora.kinds.dora`), else ``None``. An Embedding LoRA has
    ``A [r, V]``, ``B [d, r]``; a Conv2d LoRA ``A`` flattened ``[r, c_in k_h k_w]``, ``B [c_out, r]``."""

    A: Tensor
    B: Tensor
    alpha: float
    use_rslora: bool
    magnitude: Tensor | None = None
    layer: str = "linear"  # "linear" (nn.Linear, Conv1D), "embedding" or "conv2d" (A flattened)
    kernel_size: tuple[int, int] | None = None  # a conv2d LoRA's lora_A kernel

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
    peft_config: Any = None  # the peft.LoraConfig PEFT reads from the folder
    # base weights PEFT saved with the adapter (an Embedding LoRA's base_layer), by module path:
    # composing checks they are the base model's own
    base_weights: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    # whole modules saved with the adapter (PEFT's modules_to_save), by module path: their state
    # dict (``{param: tensor}``), composed as the expert's own copy (molora.routed_copies)
    saved_modules: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    # trained embedding rows (PEFT's trainable_token_indices), by embedding path: the token ids
    # and their values ``[n, d]``, composed as the expert's rows (molora.routed_tokens)
    token_rows: dict[str, tuple[list[int], Tensor]] = dataclasses.field(default_factory=dict)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of
    the module path as a regular expression (``(.*\\.)?(key)$``)."""
    for key, value in (patterns or {}).items():
        if pattern_matches(key, module):
            return value
    return default


def targets_parameter(adapter: PeftLoraAdapter, module: str, param: str = "weight") -> bool:
    """Whether the adapter reached ``<module>.<param>`` through ``target_parameters`` (PEFT's match:
    the key equals an entry or ends with ``.<entry>``)."""
    key = f"{module}.{param}"
    return any(key == t or key.endswith(f".{t}") for t in (adapter.config.get("target_parameters") or ()))


def module_factors(adapter: PeftLoraAdapter, module: str, transposed: bool) -> LoraFactors:
    """The factors of ``module`` as a delta of its map, ``y += s B A x`` (``A [r, d_in]``, ``B [d_out, r]``).

    PEFT's ``target_parameters`` (``ParamWrapper``) adds ``s B A`` to the weight as stored; for a
    ``Conv1D`` (``transposed``: weight ``[d_in, d_out]``, ``y = x W``) the delta of the map is
    ``(s B A)^T = s A^T B^T``, so ``A' = B^T``, ``B' = A^T`` (same rank and scaling). Everything else
    is already in that form."""
    f = adapter.modules[module]
    if not (transposed and targets_parameter(adapter, module)):
        return f
    return dataclasses.replace(f, A=f.B.T.contiguous(), B=f.A.T.contiguous())


_BIN_HELP = (
    "molora reads adapter weights from safetensors only (a pickle file can run code when it is loaded). "
    "Convert it once, if you trust the file: load the adapter with PEFT and save it again with "
    "`peft_model.save_pretrained(folder, safe_serialization=True)`, or run "
    "python -c \"import torch, safetensors.torch as st; "
    "st.save_file({{k: v.contiguous() for k, v in torch.load('{bin}', map_location='cpu', weights_only=True).items()}}, "
    "'{st}')\""
)


def _read_tensors(folder: Path, where: str) -> dict[str, Tensor]:
    st, binary = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if not st.is_file():
        if binary.is_file():
            raise AdapterError(f"{where}: {binary} is a pickle file, which molora does not load. "
                               + _BIN_HELP.format(bin=binary, st=st))
        raise AdapterError(f"{where}: no adapter_model.safetensors in {folder}")
    from peft.utils import load_peft_weights

    try:  # the file exists, so PEFT reads it (never the pickle, never the hub)
        tensors = load_peft_weights(str(folder), device="cpu")
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise AdapterError(f"{where}: cannot read {st}: {exc}") from None
    for key, t in tensors.items():
        finite_tensor(t, f"{where}: {st}", f"tensor {key!r}", error=AdapterError)
    return tensors


def _check_config(config: Any, cfg_path: Path, where: str) -> dict[str, Any]:
    """The fields of ``adapter_config.json`` molora reads, checked: AdapterError naming the file
    and the field for a missing field, a wrong type or a non-finite number."""
    at = f"{where}: {cfg_path}"
    if not isinstance(config, dict):
        raise AdapterError(f"{at} must hold a JSON object; got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        what = f"a {peft_type} adapter" if isinstance(peft_type, str) and peft_type else f"not a PEFT adapter (peft_type={peft_type!r})"
        raise AdapterError(f"{at}: peft_type: {what}; molora composes LoRA adapters only (peft_type 'LORA')")
    for key in ("r", "target_modules"):
        if key not in config:
            raise AdapterError(f"{at}: missing field {key!r}")
    positive_int(config["r"], at, "r", error=AdapterError)
    finite_number(config.get("lora_alpha", 8), at, "lora_alpha", error=AdapterError)
    targets = config["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{at}: target_modules must be a list of module names or a regex string; got {targets!r}")
    for flag in _BOOL_FLAGS:
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            raise AdapterError(f"{at}: {flag} must be true or false; got {config[flag]!r}")
    for key, check in (("rank_pattern", positive_int), ("alpha_pattern", finite_number)):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterError(f"{at}: {key} must be an object {{module pattern: value}}; got {patterns!r}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterError(f"{at}: {key} pattern {pattern!r} is not a valid regex: {exc}") from None
            check(value, at, f"{key}[{pattern!r}]", error=AdapterError)
    mts = config.get("modules_to_save")
    if mts is not None and not isinstance(mts, list):
        raise AdapterError(f"{at}: modules_to_save must be a list or null; got {mts!r}")
    return config


def _peft_config(folder: Path, raw: dict[str, Any], cfg_path: Path, where: str) -> Any:
    """The folder's ``peft.LoraConfig`` as PEFT reads it, with every field that changes the
    forward and that molora does not implement refused (AdapterError naming the field and value)."""
    from peft import LoraConfig

    at = f"{where}: {cfg_path}"
    try:
        with warnings.catch_warnings():
            # PEFT warns and drops fields it does not know (a newer PEFT saved them); molora
            # decides about those below instead of ignoring them.
            warnings.simplefilter("ignore")
            config = LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # PEFT raises TypeError/ValueError/KeyError... for bad values
        raise AdapterError(f"{at}: PEFT cannot read it: {type(exc).__name__}: {exc}") from None
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        # PEFT re-applies such an initialisation when it loads the adapter (the base becomes the
        # residual W - BA); composed on the original base it would be off by the initial BA.
        raise AdapterError(f"{at}: init_lora_weights={init!r}: the initialisation changes the base weights, so the "
                           "factors are not a delta on the original base; convert the adapter first with PEFT's "
                           "save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    defaults = LoraConfig()
    for field in dataclasses.fields(config):
        if field.name in _COMPOSED or field.name in _NO_FORWARD_EFFECT:
            continue
        value, default = getattr(config, field.name), getattr(defaults, field.name)
        if value == default or (not value and not default):  # None, False, {} and [] all mean "off"
            continue
        what = _REFUSED.get(field.name, "a LoRA field molora does not know")
        raise AdapterError(f"{at}: {field.name}={raw.get(field.name, value)!r}: the adapter uses {what}, which molora "
                           "does not implement")
    known = {f.name for f in dataclasses.fields(config)}
    for key, value in raw.items():
        if key not in known and value not in (None, False, [], {}, ""):
            raise AdapterError(f"{at}: {key}={value!r}: a field this PEFT ({config.peft_version}) does not know "
                               f"(saved by PEFT {raw.get('peft_version')!r}?); molora cannot tell whether it changes "
                               "the forward")
    return config


def _saved_module(key: str, modules_to_save: list[str] | None) -> tuple[str, str] | None:
    """``(module path, state-dict key)`` of a tensor PEFT saved for ``modules_to_save`` (saved as
    ``base_model.model.<module>.<param>``; the module is the outermost prefix PEFT's rule matches:
    its path ends with an entry, as a plain string: PEFT's ``_set_trainable`` wraps ``input_layernorm``
    for the entry ``"norm"``), or ``None``."""
    if not modules_to_save:
        return None
    parts = key.removeprefix("base_model.model.").split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any(module.endswith(t) for t in modules_to_save):
            return module, ".".join(parts[i:])
    return None


_TOKENS = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_snapshot(repo_id: str, revision: str | None, subfolder: str | None, where: str) -> Path:
    """The local folder of a Hub adapter ``repo_id`` (at ``revision``), through huggingface_hub's
    cache: only the two adapter files are fetched, and nothing is fetched when ``HF_HUB_OFFLINE``."""
    from huggingface_hub import constants, snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=constants.HF_HUB_OFFLINE,
                                     allow_patterns=[f"{prefix}adapter_config.json", f"{prefix}adapter_model.safetensors"])
    except Exception as exc:  # not cached offline, unknown repo or revision, no network
        raise AdapterError(f"{where}: {repo_id!r} is neither a local folder nor a Hugging Face Hub adapter that can be "
                           f"read{' offline from the cache' if constants.HF_HUB_OFFLINE else ''} "
                           f"(revision={revision!r}): {type(exc).__name__}: {exc}") from None
    return Path(snapshot)


def load_peft_adapter(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
) -> PeftLoraAdapter:
    """Read a PEFT LoRA adapter folder, or a Hub repository id (``"user/repo"``, resolved through
    huggingface_hub's cache at ``revision``; offline when ``HF_HUB_OFFLINE``), the adapter being
    in its ``subfolder`` if given; AdapterError naming the file and the field for anything molora
    cannot use exactly (a malformed or non-LoRA config, a LoRA variant molora does not implement,
    a pickle-only folder, NaN/inf weights, shapes that disagree with the config)."""
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterError(f"an adapter must be a folder path; got {path!r}")
    for key, value in (("revision", revision), ("subfolder", subfolder)):
        if value is not None and (not isinstance(value, str) or not value):
            raise AdapterError(f"adapter {path!r}: {key} must be a non-empty string or None; got {value!r}")
    folder = Path(path)
    if name is None:
        name = folder.name if subfolder is None else Path(subfolder).name
    if not isinstance(name, str) or not name.strip():
        raise AdapterError(f"adapter in {folder}: the name must be a non-empty string; got {name!r}")
    where = f"adapter {name!r}"
    if not folder.is_dir() and isinstance(path, str) and _REPO_ID.match(path):
        folder = _hub_snapshot(path, revision, subfolder, where)
    elif revision is not None:
        raise AdapterError(f"{where}: revision={revision!r} is for Hub repository ids; {folder} is a local folder")
    if subfolder is not None:
        folder = folder / subfolder
    if not folder.is_dir():
        raise AdapterError(f"{where}: folder {folder} does not exist (expected a PEFT adapter folder)")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{where}: {cfg_path} not found (expected a PEFT adapter folder)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterError(f"{where}: {cfg_path} is not valid JSON: {exc}") from None
    config = _check_config(config, cfg_path, where)
    peft_config = _peft_config(folder, config, cfg_path, where)
    tensors = _read_tensors(folder, where)
    st = folder / "adapter_model.safetensors"
    factors: dict[str, dict[str, Tensor]] = {}
    use_dora = bool(config.get("use_dora", False))
    base_weights: dict[str, Tensor] = {}
    layers: dict[str, str] = {}  # module -> "embedding" / "conv2d" for the factors that say so
    saved_modules: dict[str, dict[str, Tensor]] = {}
    tokens: dict[str, Tensor] = {}
    for key, value in tensors.items():
        mag = _MAGNITUDE.match(key)
        if mag is not None:
            if not use_dora:
                raise AdapterError(f"{where}: {st}: tensor {key!r} is a DoRA magnitude but {cfg_path} has use_dora false")
            if "m" in factors.get(mag["module"], {}):
                raise AdapterError(f"{where}: {st}: module {mag['module']!r} has two lora_magnitude_vector tensors")
            factors.setdefault(mag["module"], {})["m"] = value
            continue
        base = _BASE_WEIGHT.match(key)
        if base is not None:
            base_weights[base["module"]] = value
            continue
        tok = _TOKENS.match(key)
        if tok is not None:
            tokens[tok["module"]] = value
            continue
        m = _EMBEDDING.match(key) or _KEY.match(key)
        saved = _saved_module(key, config.get("modules_to_save")) if m is None else None
        if saved is not None:
            saved_modules.setdefault(saved[0], {})[saved[1]] = value
            continue
        if m is None:
            raise AdapterError(f"{where}: {st}: unsupported tensor {key!r} (only lora_A/lora_B of linear and Conv2d "
                               "layers, lora_embedding_A/B of embeddings, and DoRA's lora_magnitude_vector, are supported)")
        module = m["module"]
        layer = "embedding" if m.re is _EMBEDDING else "conv2d" if value.dim() == 4 else "linear"
        if layer == "linear" and value.dim() in _CONV:
            raise AdapterError(f"{where}: {st}: module {module!r} is a {_CONV[value.dim()]} LoRA (tensor {key!r} "
                               f"is {list(value.shape)}); molora routes LoRA on nn.Linear, Conv1D, nn.Embedding and "
                               "nn.Conv2d modules only")
        if layers.setdefault(module, layer) != layer:
            raise AdapterError(f"{where}: {st}: module {module!r} has both {layers[module]} and {layer} LoRA tensors")
        if m["ab"] in factors.get(module, {}):
            raise AdapterError(f"{where}: {st}: module {module!r} has two lora_{m['ab']} tensors (multiple adapters in one file?)")
        factors.setdefault(module, {})[m["ab"]] = value
    stray = sorted(set(base_weights) - {mod for mod, kind in layers.items() if kind == "embedding"})
    if stray:
        raise AdapterError(f"{where}: {st}: module {stray[0]!r} has a saved base_layer.weight but no Embedding LoRA "
                           "(PEFT saves the base weight only with one); molora composes LoRA factors only")
    modules: dict[str, LoraFactors] = {}
    r_default, alpha_default = config["r"], config.get("lora_alpha", 8)
    for module, ab in factors.items():
        if not {"A", "B"} <= set(ab):
            present = ", ".join(f"lora_{k}" if k != "m" else "lora_magnitude_vector" for k in ab)
            raise AdapterError(f"{where}: {st}: module {module!r} has {present} but not both lora_A and lora_B")
        A, B, magnitude = ab["A"], ab["B"], ab.get("m")
        layer = layers.get(module, "linear")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterError(f"{where}: {st}: module {module!r} has lora_A {A.dtype} and lora_B {B.dtype}; expected floating tensors")
        kernel = None
        if layer == "conv2d":
            if A.dim() != 4 or B.dim() != 4 or tuple(B.shape[2:]) != (1, 1) or A.shape[0] != B.shape[1]:
                raise AdapterError(f"{where}: {st}: module {module!r} is a Conv2d LoRA with lora_A {list(A.shape)} and "
                                   f"lora_B {list(B.shape)}, not [r, c_in, k_h, k_w] and [c_out, r, 1, 1] (a conv with "
                                   "groups > 1 is not supported)")
            kernel = (int(A.shape[2]), int(A.shape[3]))
            A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
        if use_dora and layer != "linear":
            raise AdapterError(f"{where}: {st}: module {module!r} is a DoRA {layer} LoRA; molora composes DoRA on "
                               "nn.Linear and Conv1D modules only")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{where}: {st}: module {module!r} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, not [r, d_in] and [d_out, r]")
        rank = pattern_value(config.get("rank_pattern"), module, r_default)
        if A.shape[0] != rank:
            raise AdapterError(f"{where}: module {module!r} has rank {A.shape[0]} in {st} but {cfg_path} says r={rank}")
        if use_dora and (magnitude is None or not magnitude.is_floating_point()
                         or tuple(magnitude.shape) != (B.shape[0],)):
            got = "none" if magnitude is None else f"{magnitude.dtype} {list(magnitude.shape)}"
            raise AdapterError(f"{where}: {st}: module {module!r} is DoRA (use_dora) and needs a floating "
                               f"lora_magnitude_vector [{B.shape[0]}] (d_out of its lora_B); got {got}")
        alpha = float(pattern_value(config.get("alpha_pattern"), module, alpha_default))
        modules[module] = LoraFactors(A=A, B=B, alpha=alpha, use_rslora=bool(config.get("use_rslora", False)),
                                      magnitude=magnitude, layer=layer, kernel_size=kernel)
    if not modules:
        raise AdapterError(f"{where}: {st} holds no LoRA weights")
    token_rows = _token_rows(tokens, config.get("trainable_token_indices"), f"{where}: {st}", cfg_path)
    return PeftLoraAdapter(name=name, path=folder, config=config, modules=modules, peft_config=peft_config,
                           base_weights=base_weights, saved_modules=saved_modules, token_rows=token_rows)


def _token_rows(tensors: dict[str, Tensor], indices: Any, where: str, cfg_path: Path) -> dict[str, tuple[list[int], Tensor]]:
    """Each embedding's trained token ids and values from ``trainable_token_indices`` (a list: the
    one embedding PEFT wrapped, the input embedding; an object: ``{module name: ids}``, a name
    matching the end of the path) and the ``token_adapter.trainable_tokens_delta`` tensors;
    AdapterError for ids and tensors that do not pair up."""
    if not indices:
        if tensors:
            raise AdapterError(f"{where}: tensor {next(iter(tensors))!r}.token_adapter.trainable_tokens_delta is saved but "
                               f"{cfg_path} has no trainable_token_indices")
        return {}
    if isinstance(indices, list):
        if len(tensors) != 1:
            raise AdapterError(f"{where}: trainable_token_indices is a list (one embedding) but the file has trained "
                               f"tokens for {len(tensors)} modules {sorted(tensors)}")
        by_module = {next(iter(tensors)): indices}
    elif isinstance(indices, dict):
        by_module = {}
        for module in tensors:
            keys = [k for k in indices if module == k or module.endswith("." + k)]
            if len(keys) != 1:
                raise AdapterError(f"{where}: module {module!r} has trained tokens, matched by {len(keys)} entries of "
                                   f"trainable_token_indices {sorted(indices)} (expected one)")
            by_module[module] = indices[keys[0]]
        unused = sorted(set(indices) - {k for k in indices if any(m == k or m.endswith("." + k) for m in tensors)})
        if unused:
            raise AdapterError(f"{where}: trainable_token_indices names {unused} but the file has no trained tokens there")
    else:
        raise AdapterError(f"{cfg_path}: trainable_token_indices must be a list of token ids or an object "
                           f"{{module: ids}}; got {indices!r}")
    out = {}
    for module, ids in by_module.items():
        values = tensors[module]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in ids) or len(set(ids)) != len(ids):
            raise AdapterError(f"{cfg_path}: trainable_token_indices for {module!r} must be distinct token ids >= 0; "
                               f"got {ids!r}")
        if not values.is_floating_point() or values.dim() != 2 or values.shape[0] != len(ids):
            raise AdapterError(f"{where}: module {module!r}: trainable_tokens_delta is {values.dtype} "
                               f"{list(values.shape)}; expected floating [{len(ids)}, dim] for its {len(ids)} token ids")
        out[module] = (list(ids), values)
    return out
