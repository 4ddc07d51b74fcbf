"""Composing pretrained PEFT LoRA adapters into one routed model."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from molora.bank import ExpertBank
from molora.checks import unique_names
from molora.config import MoLoRAConfig
from molora.errors import AdapterError, MoLoRAError
from molora.genknowsub import subtract_general_knowledge
from molora.kinds import DoRABank
from molora.routed_tokens import TiedTokenRows, TokenRows, is_plain_embedding
from molora.layer import RoutedLoRALinear, base_features, build_routed_layer, layer_device, resident_weight, routed_layer_class
from molora.model import MoLoRAModel, build_shared_router, router_kwargs
from molora.routers import router_class
from molora.peft_io import PeftLoraAdapter, load_peft_adapter, module_factors


def compose(
    base_model: nn.Module,
    adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    router: str = "soft",
    *,
    top_k: int | None = None,
    trainable_experts: bool = False,
    dropout: float = 0.0,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    adapter_dtype: str = "float32",
    general_adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
    **router_kwargs_: Any,
) -> MoLoRAModel:
    """Load N PEFT LoRA adapters as the experts of a routed model.

    Expert ``i`` of every layer is adapter ``i`` (in the order given). A module that only some
    adapters target gets experts from those only; ranks, alphas and rsLoRA may differ between
    adapters and between modules (``rank_pattern``/``alpha_pattern``). With ``router="task"``,
    task id ``i`` (or the adapter's name) routes an example to adapter ``i``, which reproduces
    PEFT with that adapter active. DoRA adapters (``use_dora``) load as experts of a ``"dora"``
    bank (:mod:`molora.kinds.dora`); a plain LoRA adapter on a module that a DoRA adapter also
    targets joins that bank with the magnitude that makes it exactly its LoRA. Every adapter is
    read and checked against ``base_model`` before the model is changed.

    Args:
        base_model: the model the adapters were trained on.
        adapters: ``{name: folder}``, or folders (named after their last path component).
        router: router name (``soft``, ``topk``, ``task``, ...); ``router_kwargs_`` go to it.
        top_k: experts per token for the top-k routers (``"topk"``, ``"arrow"``, ...).
        trainable_experts: leave the experts trainable (default: frozen; only routers train).
        general_adapters: general-knowledge adapters (folders or ``{name: folder}``) whose mean
            factors are subtracted from every adapter's first (GenKnowSub, PEFT's ``use_gks``;
            :mod:`molora.genknowsub`); they are not experts themselves.
    """
    if "use_gks" in router_kwargs_:
        raise MoLoRAError("compose: there is no use_gks flag; GenKnowSub runs when general_adapters=[folders] "
                          "are given")
    adapters = named_adapters(adapters)
    loaded = [load_peft_adapter(path, name) for name, path in adapters.items()]
    if general_adapters is not None:
        general = named_adapters(general_adapters, "compose general_adapters")
        general_loaded = [load_peft_adapter(path, name) for name, path in general.items()]
        with_modules = [g.name for g in general_loaded if g.saved_modules or g.token_rows]
        if with_modules:  # only the LoRA factors are subtracted: their saved modules would be dropped silently
            raise AdapterError(f"compose: general adapters {with_modules} saved whole modules or trained tokens (PEFT's "
                               "modules_to_save, trainable_token_indices); GenKnowSub subtracts LoRA factors only")
        loaded = subtract_general_knowledge(loaded, general_loaded)
    names = [a.name for a in loaded]
    config = MoLoRAConfig(
        target_modules=sorted({m for a in loaded for m in a.modules}),
        num_experts=len(loaded),
        rank=max(f.rank for a in loaded for f in a.modules.values()),
        alpha=float(max(f.alpha for a in loaded for f in a.modules.values())),
        dropout=dropout,
        router=router,
        top_k=top_k,
        router_kwargs=dict(router_kwargs_),
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=z_loss_coef,
        expert_names=names,
        adapter_dtype=adapter_dtype,
    )
    modules = _check_against_base(base_model, loaded)
    saved = _check_saved_modules(base_model, loaded, modules)
    tokens = _check_token_rows(base_model, loaded, {**modules, **saved})
    per_example = {**{p: ("saved module", "whole (PEFT's modules_to_save)", "saved_modules") for p in saved},
                   **{p: ("trained tokens of", "(PEFT's trainable_token_indices)", "token_rows") for p in tokens}}
    if per_example and not router_class(router).shared:
        where, (what, peft, field) = next(iter(per_example.items()))
        raise AdapterError(f"compose: adapters {sorted(a.name for a in loaded if where in getattr(a, field))} {what} "
                           f"{where!r} {peft}; each adapter's version of it runs per example by a model-level router "
                           f"(router='task', 'static', 'mixture', ...), not router {router!r}, whose per-token gates "
                           "have no per-example version")
    first = next(iter(modules.values()))
    devices = {path: layer_device(base_model, path) for path in modules}  # a meta base without hooks: refused here
    shared = build_shared_router(config, names, routed_layer_class(first).router_dim(first), next(iter(devices.values())))
    kwargs = router_kwargs(config)
    layers: dict[str, RoutedLoRALinear] = {}
    for path, module in modules.items():
        d_in, d_out, transposed = base_features(module)
        present = [(i, adapter.modules[path]) for i, adapter in enumerate(loaded) if path in adapter.modules]
        if any(f.magnitude is not None for _, f in present):
            # a DoRA bank; a plain LoRA adapter there gets m = ||W0 + s B A||_c (c = 1: exactly its LoRA)
            try:
                bank = DoRABank(d_in, d_out, base_weight=module.weight.T if transposed else module.weight,
                                dtype=config.torch_dtype, device=devices[path])
            except ValueError as exc:  # e.g. an offloaded base weight, which DoRA's norms need
                raise MoLoRAError(f"module {path!r}: {exc}") from None
        else:
            bank = ExpertBank(d_in, d_out, dtype=config.torch_dtype, device=devices[path])
        expert_ids = []
        for i, f in present:
            extra = {"magnitude": f.magnitude} if isinstance(bank, DoRABank) else {}
            bank.add_expert(f.rank, f.alpha, use_rslora=f.use_rslora, A=f.A, B=f.B, trainable=trainable_experts, **extra)
            expert_ids.append(i)
        layer_router = None if shared is not None else {"name": router, "config": kwargs}
        layers[path] = build_routed_layer(module, name=path, bank=bank, router=layer_router, expert_ids=expert_ids,
                                          num_global_experts=len(loaded), dropout=dropout, dtype=config.torch_dtype,
                                          device=devices[path])
    for path, module in saved.items():
        # each adapter's own copy of the module (PEFT's ModulesToSaveWrapper), trainable like the experts
        copies = {}
        for i, adapter in enumerate(loaded):
            if path in adapter.saved_modules:
                c = copies[i] = copy.deepcopy(module)
                c.load_state_dict(adapter.saved_modules[path])  # cast to the module's dtype and device
                c.requires_grad_(trainable_experts)
        layers[path] = build_routed_layer(module, name=path, bank=None, router=None, expert_ids=sorted(copies),
                                          num_global_experts=len(loaded), copies=copies)
    for path, (module, head) in tokens.items():
        # each adapter's trained rows of the embedding (PEFT's trainable tokens), and of the output
        # layer tied to it
        rows = {i: TokenRows(module, *adapter.token_rows[path], name=path) for i, adapter in enumerate(loaded)
                if path in adapter.token_rows}
        for r in rows.values():
            r.requires_grad_(trainable_experts)
        layers[path] = build_routed_layer(module, name=path, bank=None, router=None, expert_ids=sorted(rows),
                                          num_global_experts=len(loaded), copies=rows)
        for head_path, head_module in head:
            tied = {i: TiedTokenRows(head_module, r, name=head_path) for i, r in rows.items()}
            layers[head_path] = build_routed_layer(head_module, name=head_path, bank=None, router=None,
                                                   expert_ids=sorted(tied), num_global_experts=len(loaded), copies=tied)
            layers[head_path].tied_to = path
    return MoLoRAModel(base_model, config, layers, expert_names=names, shared_router=shared)


def _check_token_rows(base_model: nn.Module, adapters: list[PeftLoraAdapter], taken: Mapping[str, nn.Module]
                      ) -> dict[str, tuple[nn.Module, list[tuple[str, nn.Module]]]]:
    """The embeddings the adapters trained rows of (PEFT's ``trainable_token_indices``), by path,
    each with the modules tied to it (``[(path, module)]``), checked against the
    base model (a plain ``nn.Embedding`` no LoRA or saved module of any adapter reaches, token ids
    inside its vocabulary, rows of its width); an AdapterError naming adapter and module otherwise."""
    found: dict[str, tuple[nn.Module, list[tuple[str, nn.Module]]]] = {}
    for adapter in adapters:
        for path, (ids, values) in adapter.token_rows.items():
            where = f"adapter {adapter.name!r}, module {path!r} (trainable_token_indices)"
            try:
                module = base_model.get_submodule(path)
            except AttributeError:
                raise AdapterError(f"{where}: {type(base_model).__name__} has no such module (was the adapter trained "
                                   "on a different base model?)") from None
            if not is_plain_embedding(module):
                raise AdapterError(f"{where}: trained tokens need a plain nn.Embedding; the base module is "
                                   f"{type(module).__name__}")
            clash = [p for p in taken if p == path or p.startswith(path + ".") or path.startswith(p + ".")]
            if clash:
                raise AdapterError(f"{where}: an adapter also adapts {clash[0]!r} there (LoRA or modules_to_save); "
                                   "molora routes trained tokens of an embedding no other adapter changes")
            V, d = module.weight.shape
            if values.shape[1] != d or max(ids) >= V:
                raise AdapterError(f"adapter {adapter.name!r} was made for a different base model: module {path!r} "
                                   f"is [{V} x {d}] but its trained tokens are {list(values.shape)} with ids up to "
                                   f"{max(ids)}")
            if path not in found:
                found[path] = (module, _tied_output(base_model, module, path, taken, where))
    return found


def _tied_output(base_model: nn.Module, embedding: nn.Module, path: str, taken: Mapping[str, nn.Module],
                 where: str) -> list[tuple[str, nn.Module]]:
    """The modules whose weight is ``embedding``'s (tied word embeddings: PEFT runs them with the
    trained rows too: an output layer's logits, another embedding's lookups), as ``(path, module)``."""
    tied = [(n, m) for n, m in base_model.named_modules() if m is not embedding
            and getattr(m, "weight", None) is embedding.weight]
    for head_path, head in tied:
        if not (type(head) is nn.Linear and head.bias is None or is_plain_embedding(head)):
            raise AdapterError(f"{where}: the embedding's weight is shared with {head_path!r} "
                               f"({type(head).__name__}); molora follows trained tokens into tied plain nn.Embedding "
                               "and bias-free nn.Linear modules only")
        if head_path in taken:
            raise AdapterError(f"{where}: the tied module {head_path!r} is also adapted (LoRA or modules_to_save)")
    return tied


def _check_saved_modules(base_model: nn.Module, adapters: list[PeftLoraAdapter],
                         lora: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The base modules the adapters saved whole (PEFT's ``modules_to_save``), by path, each
    saved copy checked against the base module (the same tensors, of the same shapes, finite:
    the loader checked that); an AdapterError naming adapter, module and tensor otherwise."""
    found: dict[str, nn.Module] = {}
    for adapter in adapters:
        for path, tensors in adapter.saved_modules.items():
            where = f"adapter {adapter.name!r}, module {path!r} (modules_to_save)"
            try:
                module = base_model.get_submodule(path)
            except AttributeError:
                raise AdapterError(f"{where}: {type(base_model).__name__} has no such module (was the adapter trained "
                                   "on a different base model?)") from None
            inner = [p for p in lora if p == path or p.startswith(path + ".") or path.startswith(p + ".")]
            if inner:
                raise AdapterError(f"{where}: the module holds, or sits inside, a LoRA-adapted module {inner[0]!r}; "
                                   "molora routes whole saved modules that no adapter's LoRA reaches")
            expected = {k: v for k, v in module.state_dict().items()}
            missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            if missing or unexpected:
                raise AdapterError(f"{where}: the saved module's tensors do not match the base module "
                                   f"{type(module).__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}")
            for key, t in tensors.items():
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise AdapterError(f"adapter {adapter.name!r} was made for a different base model: module {path!r} "
                                       f"(modules_to_save) has {key} {list(t.shape)} in the adapter but "
                                       f"{list(expected[key].shape)} in the base model (e.g. another number of labels)")
                if expected[key].is_floating_point() != t.is_floating_point():
                    raise AdapterError(f"{where}: tensor {key!r} is {t.dtype}; the base module's is {expected[key].dtype}")
            found[path] = module
    return found


def adapter_name(path: str | os.PathLike) -> str:
    """The default name of an adapter folder: its last path component (``"runs/sentiment/"`` ->
    ``"sentiment"``)."""
    return os.path.basename(os.path.normpath(os.fspath(path)))


def named_adapters(
    adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike], where: str = "compose"
) -> dict[str, str | os.PathLike]:
    """``{name: folder}`` of :func:`compose`'s ``adapters``, checked; nothing is renamed or dropped.

    A mapping keeps its names (non-empty strings); a sequence of folders names each after its
    last path component. Names must be distinct: two folders with the same last component
    (``a/lora`` and ``b/lora``), or one folder listed twice, are an AdapterError listing them
    (pass ``{name: folder}`` to name them). A single path (not a list) is refused too rather
    than read as a sequence of characters.
    """
    if isinstance(adapters, (str, bytes, os.PathLike)):
        raise AdapterError(f"{where}: adapters must be a list of folders or {{name: folder}}; got one path {adapters!r} "
                           "(wrap it in a list)")
    if isinstance(adapters, Mapping):
        names, paths = list(adapters), list(adapters.values())
    elif isinstance(adapters, Sequence) or hasattr(adapters, "__iter__"):
        paths = list(adapters)
        bad = [p for p in paths if not isinstance(p, (str, os.PathLike))]
        if bad:
            raise AdapterError(f"{where}: adapter folders must be paths; got {bad!r}")
        names = [adapter_name(p) for p in paths]
    else:
        raise AdapterError(f"{where}: adapters must be a list of folders or {{name: folder}}; got {adapters!r}")
    if not paths:
        raise MoLoRAError(f"{where} needs at least one adapter")
    bad = [p for p in paths if not isinstance(p, (str, os.PathLike)) or not os.fspath(p)]
    if bad:
        raise AdapterError(f"{where}: adapter folders must be non-empty paths; got {bad!r}")
    if not isinstance(adapters, Mapping):
        empty = [p for p, n in zip(paths, names) if not n or n in (".", "..", os.sep)]
        if empty:
            raise AdapterError(f"{where}: cannot name the adapter folder(s) {empty!r} after their last path component; "
                               "pass {name: folder}")
        seen: dict[str, list[str]] = {}
        for n, p in zip(names, paths):
            seen.setdefault(n, []).append(os.fspath(p))
        dups = {n: ps for n, ps in seen.items() if len(ps) > 1}
        if dups:
            listed = "; ".join(f"{n!r}: {ps}" for n, ps in dups.items())
            raise AdapterError(f"{where}: adapters are named after their folder, and these names repeat: {listed}; "
                               "pass {name: folder} with distinct names")
    unique_names(names, where, what="adapter names", error=AdapterError)
    return dict(zip(names, paths))


def _check_against_base(base_model: nn.Module, adapters: list[PeftLoraAdapter]) -> dict[str, nn.Module]:
    """Map every adapted module path to the base module, checking type and shapes."""
    modules: dict[str, nn.Module] = {}
    for adapter in adapters:
        for path, f in adapter.modules.items():
            try:
                module = base_model.get_submodule(path)
            except AttributeError:
                raise AdapterError(
                    f"adapter {adapter.name!r} targets module {path!r}, which {type(base_model).__name__} does not have "
                    "(was it trained on a different base model?)"
                ) from None
            try:
                d_in, d_out, transposed = base_features(module)
            except MoLoRAError as exc:
                raise AdapterError(f"adapter {adapter.name!r}, module {path!r}: {exc}") from None
            _check_layer_type(adapter, path, module, f)
            # this call's own copy of the adapter: the model is not touched yet
            f = adapter.modules[path] = module_factors(adapter, path, transposed)
            if f.A.shape[1] != d_in or f.B.shape[0] != d_out:
                raise AdapterError(
                    f"adapter {adapter.name!r} was made for a different base model: module {path!r} is "
                    f"[{d_out} x {d_in}] but the adapter has lora_A {list(f.A.shape)} and lora_B {list(f.B.shape)}"
                )
            modules[path] = module
    return modules


# which LoRA layout PEFT saves for each base layer type (peft_io.LoraFactors.layer)
_LAYOUTS = ((nn.Embedding, "embedding"), (nn.Conv2d, "conv2d"))


def _check_layer_type(adapter: PeftLoraAdapter, path: str, module: nn.Module, f: Any) -> None:
    """The adapter's factors of ``path`` are of the layout PEFT gives the base module's type (an
    Embedding LoRA on an ``nn.Embedding``, a Conv2d LoRA of its kernel size on an ``nn.Conv2d``,
    else linear), and a base weight saved with them is the base's own; else an AdapterError."""
    expected = next((name for cls, name in _LAYOUTS if isinstance(module, cls)), "linear")
    where = f"adapter {adapter.name!r}, module {path!r}"
    if f.layer != expected:
        raise AdapterError(f"{where}: the adapter holds {f.layer} LoRA factors, but the base model's module is "
                           f"{type(module).__name__} (was it trained on a different base model?)")
    if f.layer == "conv2d" and tuple(f.kernel_size) != tuple(module.kernel_size):
        raise AdapterError(f"adapter {adapter.name!r} was made for a different base model: module {path!r} has kernel "
                           f"{tuple(module.kernel_size)} but the adapter's lora_A has kernel {tuple(f.kernel_size)}")
    saved = adapter.base_weights.get(path)
    if saved is not None:
        weight = resident_weight(module)
        same = (tuple(saved.shape) == tuple(weight.shape)
                and torch.equal(saved.to(device=weight.device, dtype=weight.dtype), weight.detach()))
        if not same:
            raise AdapterError(f"{where}: the adapter saved a base embedding {list(saved.shape)} (PEFT's "
                               "save_embedding_layers) that differs from the base model's (resized or trained "
                               "embeddings?); molora composes on the base model's own weights and would drop it")
