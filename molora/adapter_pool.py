"""Adapters on demand: many registered LoRA adapters, a fixed number of resident expert slots.

A model built with ``S`` task-routed experts serves any number of registered adapters: each batch
names the adapters of its examples, the pool makes them resident (copying their factors into free
slots, least-recently-used slots out) and routes every example to its adapter's slot. Adapter
weights stay where they were registered (a PEFT folder on disk, read memory-mapped through
safetensors, or tensors in host memory) until a batch needs them; a host cache of bounded bytes
keeps recently evicted adapters for a warm reload. This is the serving layout of S-LoRA (adapters
in host memory, the batch's adapters on the device) and vLLM (``max_loras`` slots,
``max_cpu_loras`` host LRU).

Loading copies into the slots' existing parameters in place, so nothing is rebuilt: a compiled
model keeps its graphs (the values change, not the shapes or the parameters), as PEFT's hotswap.
A slot's rank is the model's rank ``r``; an adapter of rank ``r_a <= r`` fills the first ``r_a``
rank rows and zeros the rest (exact), and its scaling ``alpha / r_a`` (or rsLoRA's) is the slot's.
A layer the adapter does not target gets zero factors in that slot.

Slots used by a batch in flight (inside :meth:`AdapterPool.routing`) are pinned: another thread's
batch never evicts them; a batch that needs more distinct adapters than there are free or
unpinned slots is refused before anything changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from molora.bank import lora_scaling
from molora.errors import AdapterError, MoLoRAError
from molora.model import MoLoRAModel
from molora.peft_io import LoraFactors, load_peft_adapter


@dataclass
class LoadStats:
    """Counts and seconds of what the pool did (cold: read from the source; warm: host cache)."""

    hits: int = 0
    cold_loads: int = 0
    warm_loads: int = 0
    evictions: int = 0
    cold_seconds: float = 0.0
    warm_seconds: float = 0.0


class AdapterPool:
    """Registered adapters served through the ``S`` expert slots of a task-routed model.

    Args:
        model: a :class:`~molora.model.MoLoRAModel` whose shared router is ``"task"`` with the
            identity mapping (one task per expert: ``get_molora_model(..., router="task")``);
            its ``num_experts`` experts are the slots. Every layer's experts must have the same
            rank (the slot rank).
        host_cache_bytes: bytes of adapter factors kept in host memory after a cold load
            (least-recently-used out); ``0`` reads the source on every load.
    """

    def __init__(self, model: MoLoRAModel, *, host_cache_bytes: int = 256 * 2**20) -> None:
        router = model.shared_router
        if getattr(router, "name", None) != "task" or list(router.mapping) != list(range(model.num_experts)):
            raise MoLoRAError("AdapterPool needs a model whose shared router is 'task' with one task per expert "
                              "(get_molora_model(..., MoLoRAConfig(router='task')))")
        self.model = model
        self.layers = model.routed_layers()
        for name, layer in self.layers.items():
            if layer.bank.kind != "lora" or layer.bank.shared_a or len(set(layer.bank.ranks)) > 1 \
                    or layer.expert_ids != list(range(model.num_experts)):
                raise MoLoRAError(f"AdapterPool: module {name!r} must hold every slot as a plain LoRA expert at one rank "
                                  f"without a shared A; has kind {layer.bank.kind!r}, ranks {layer.bank.ranks}, "
                                  f"shared_a={getattr(layer.bank, 'shared_a', False)}")
        self.num_slots = model.num_experts
        self.host_cache_bytes = int(host_cache_bytes)
        self.stats = LoadStats()
        self._sources: dict[str, str | Mapping[str, LoraFactors]] = {}
        self._slot_of: dict[str, int] = {}
        self._resident: OrderedDict[int, str] = OrderedDict()  # slot -> adapter, least recently used first
        self._pins: dict[int, int] = {}
        self._host: OrderedDict[str, dict[str, LoraFactors]] = OrderedDict()
        self._host_bytes = 0
        self._lock = threading.RLock()
        self._clear_slots(range(self.num_slots))

    # ------------------------------------------------------------------ registry
    def register(self, name: str, source: str | os.PathLike | Mapping[str, LoraFactors]) -> None:
        """Register adapter ``name``: a PEFT adapter folder (read when first needed) or
        ``{module path: LoraFactors}`` in host memory. Nothing is loaded yet."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"AdapterPool: an adapter name must be a non-empty string; got {name!r}")
        with self._lock:
            if name in self._sources:
                raise AdapterError(f"AdapterPool: adapter {name!r} is already registered; delete_adapter() it first")
            if isinstance(source, Mapping):
                source = {m: self._check_factors(name, m, f) for m, f in source.items()}
            elif isinstance(source, (str, os.PathLike)):
                if not os.path.isdir(source):
                    raise AdapterError(f"AdapterPool: adapter {name!r}: folder {source} does not exist")
                source = os.fspath(source)
            else:
                raise AdapterError(f"AdapterPool: adapter {name!r}: source must be a folder or a mapping; got {type(source).__name__}")
            self._sources[name] = source

    load_adapter = register

    def unload_adapter(self, name: str) -> None:
        """Free ``name``'s slot (it stays registered and reloads when a batch names it)."""
        with self._lock:
            self._known(name)
            slot = self._slot_of.get(name)
            if slot is None:
                return
            if self._pins.get(slot):
                raise MoLoRAError(f"AdapterPool: adapter {name!r} is in use by a batch in flight; cannot unload it")
            self._evict(slot)

    def delete_adapter(self, name: str) -> None:
        """Unload and unregister ``name`` (its host-cached copy is dropped too)."""
        with self._lock:
            self.unload_adapter(name)
            del self._sources[name]
            cached = self._host.pop(name, None)
            if cached is not None:
                self._host_bytes -= _nbytes(cached)

    @property
    def adapters(self) -> list[str]:
        """The registered adapters."""
        return list(self._sources)

    @property
    def resident(self) -> dict[str, int]:
        """Resident adapters and their slots."""
        return dict(self._slot_of)

    # ------------------------------------------------------------------ routing
    @contextlib.contextmanager
    def routing(self, adapters: Sequence[str], **signals) -> Iterator[Tensor]:
        """``with pool.routing(["a", "b", "a"]):`` routes example ``i`` to adapter ``adapters[i]``
        for the forwards (and ``generate``) inside the block, loading what is not resident first.
        Yields the slot id of each example."""
        names = list(adapters)
        with self._lock:
            slots = self._acquire(names)
        try:
            task_ids = torch.tensor([slots[n] for n in names], dtype=torch.long)
            with self.model.routing(task_ids=task_ids, **signals):
                yield task_ids
        finally:
            with self._lock:
                for s in set(slots.values()):
                    self._pins[s] -= 1

    def _acquire(self, names: list[str]) -> dict[str, int]:
        """Slots of ``names`` (loaded where needed), pinned; all or nothing."""
        for n in names:
            self._known(n)
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._slot_of]
        keep = {self._slot_of[n] for n in wanted if n in self._slot_of}
        free = [s for s in range(self.num_slots) if s not in self._resident]
        evictable = [s for s in self._resident if s not in keep and not self._pins.get(s)]
        if len(missing) > len(free) + len(evictable):
            raise MoLoRAError(f"AdapterPool: the batch needs {len(wanted)} distinct adapters; {len(self._slot_of)} of "
                              f"{self.num_slots} slots are resident and {len(free) + len(evictable)} can take new ones "
                              f"(in use by batches in flight: {sum(1 for v in self._pins.values() if v)})")
        loaded = {n: self._factors(n) for n in missing}  # read everything before changing any slot
        targets = dict(zip(free + evictable, missing))
        for slot in targets:
            if slot in self._resident:
                self._evict(slot, clear=False)  # overwritten below
        try:
            self._write_slots({slot: loaded[n] for slot, n in targets.items()})
        except BaseException:
            # a slot written part-way holds some modules of the new adapter: leave every target
            # slot empty (its adapter evicted, reloadable) rather than half an adapter
            self._clear_slots(targets)
            for layer in self.layers.values():
                layer.bank._refresh_scaling()
            raise
        for slot, n in targets.items():
            self._resident[slot] = n
            self._slot_of[n] = slot
        self.stats.hits += len(wanted) - len(missing)
        slots = {n: self._slot_of[n] for n in wanted}
        for s in slots.values():
            self._resident.move_to_end(s)
            self._pins[s] = self._pins.get(s, 0) + 1
        return slots

    # ------------------------------------------------------------------ slots
    def _factors(self, name: str) -> dict[str, LoraFactors]:
        """The adapter's factors per module: host memory, the host cache (warm) or its folder (cold)."""
        source = self._sources[name]
        if isinstance(source, Mapping):
            return dict(source)
        cached = self._host.get(name)
        t0 = time.perf_counter()
        if cached is not None:
            self._host.move_to_end(name)
            self.stats.warm_loads += 1
            self.stats.warm_seconds += time.perf_counter() - t0
            return cached
        adapter = load_peft_adapter(source, name=name)
        if adapter.saved_modules:  # the pool swaps LoRA factors only; dropping the modules would be silent
            raise AdapterError(f"AdapterPool: adapter {name!r} saved modules {sorted(adapter.saved_modules)} whole "
                               "(PEFT's modules_to_save), which a pool slot cannot hold; compose such adapters with "
                               "molora.compose(..., router='task')")
        if adapter.token_rows:  # the same for trained embedding rows
            raise AdapterError(f"AdapterPool: adapter {name!r} trained tokens of {sorted(adapter.token_rows)} (PEFT's "
                               "trainable_token_indices), which a pool slot cannot hold; compose such adapters with "
                               "molora.compose(..., router='task')")
        factors = {m: self._check_factors(name, m, f) for m, f in adapter.modules.items()}
        self.stats.cold_loads += 1
        self.stats.cold_seconds += time.perf_counter() - t0
        self._cache(name, factors)
        return factors

    def _cache(self, name: str, factors: dict[str, LoraFactors]) -> None:
        size = _nbytes(factors)
        if size > self.host_cache_bytes:
            return
        self._host[name] = factors
        self._host_bytes += size
        while self._host_bytes > self.host_cache_bytes:
            _, old = self._host.popitem(last=False)
            self._host_bytes -= _nbytes(old)

    def _check_factors(self, name: str, module: str, f: LoraFactors) -> LoraFactors:
        layer = self.layers.get(module)
        if layer is None:
            raise AdapterError(f"AdapterPool: adapter {name!r} targets {module!r}, which the model does not route "
                               f"(routed modules: {sorted(self.layers)[:8]}...)")
        bank = layer.bank
        r = bank.ranks[0]
        if f.A.shape[1] != bank.d_in or f.B.shape[0] != bank.d_out or f.rank > r:
            raise AdapterError(f"AdapterPool: adapter {name!r} module {module!r}: lora_A {list(f.A.shape)}, lora_B "
                               f"{list(f.B.shape)} do not fit slots [{bank.d_out} x {bank.d_in}] of rank <= {r}")
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()) or not torch.isfinite(torch.tensor(f.alpha)):
            raise AdapterError(f"AdapterPool: adapter {name!r} module {module!r} has NaN or inf factors or alpha")
        return f

    def _write_slots(self, assignments: Mapping[int, Mapping[str, LoraFactors]]) -> None:
        """Copy each adapter's factors into its slot (zeros where it has no factors for a module);
        a bank's scaling is rebuilt once, after all its slots are written."""
        with torch.no_grad():
            for module, layer in self.layers.items():
                bank = layer.bank
                for slot, factors in assignments.items():
                    A, B = bank.A[slot], bank.B[slot]
                    f = factors.get(module)
                    if f is None:
                        A.zero_()
                        B.zero_()
                        continue
                    A[: f.rank].copy_(f.A)
                    A[f.rank:].zero_()
                    B[:, : f.rank].copy_(f.B)
                    B[:, f.rank:].zero_()
                    # the slot keeps rank r; its scaling is the adapter's own alpha / r_a
                    bank.alphas[slot] = lora_scaling(f.alpha, f.rank, f.use_rslora) * bank.ranks[slot]
                    bank.rslora[slot] = False
                if assignments:
                    bank._refresh_scaling()

    def _evict(self, slot: int, clear: bool = True) -> None:
        name = self._resident.pop(slot)
        del self._slot_of[name]
        if clear:
            self._clear_slots([slot])
        self.stats.evictions += 1

    def _clear_slots(self, slots) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                for s in slots:
                    layer.bank.B[s].zero_()

    def _known(self, name: str) -> None:
        if name not in self._sources:
            raise AdapterError(f"AdapterPool: adapter {name!r} is not registered (registered: {len(self._sources)}, "
                               f"e.g. {list(self._sources)[:5]})")


def _nbytes(factors: Mapping[str, LoraFactors]) -> int:
    return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size() for f in factors.values())
