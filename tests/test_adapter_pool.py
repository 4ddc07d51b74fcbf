"""Adapters on demand (molora/adapter_pool.py): more registered PEFT adapters than expert slots,
loaded as batches need them, least-recently-used out, each batch equal to PEFT's mixed batch
with all the adapters loaded."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from helpers import make_peft_adapter, snapshot, assert_same_snapshot, tiny_gpt2

from molora import MoLoRAConfig, get_molora_model
from molora.adapter_pool import AdapterPool
from molora.errors import AdapterError, MoLoRAError
from molora.peft_io import LoraFactors

TARGETS = ["c_attn", "c_fc"]
# (rank, alpha, rslora): mixed ranks below the slot rank, rsLoRA among them
SPECS = [(4, 8, False), (8, 4, False), (2, 16, True), (8, 8, True), (4, 2, False), (6, 12, False)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    base = tiny_gpt2()
    root = tmp_path_factory.mktemp("pool")
    paths = {}
    for i, (r, alpha, rs) in enumerate(SPECS):
        paths[f"a{i}"] = make_peft_adapter(base, root / f"a{i}", seed=i, r=r, alpha=alpha, target_modules=TARGETS,
                                           use_rslora=rs, fan_in_fan_out=True)
    # one adapter that targets only c_attn: the pool zeros the other modules of its slot
    paths["attn_only"] = make_peft_adapter(base, root / "attn_only", seed=9, r=4, alpha=8, target_modules=["c_attn"],
                                           fan_in_fan_out=True)
    return base, paths


@pytest.fixture(scope="module")
def peft_all(adapters):
    from peft import PeftModel

    base, paths = adapters
    names = list(paths)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(paths[n]), adapter_name=n)
    return pm.eval()


def make_pool(base, paths, slots=3, **kw):
    model = get_molora_model(copy.deepcopy(base), MoLoRAConfig(target_modules=TARGETS, num_experts=slots, rank=8,
                                                               router="task"))
    pool = AdapterPool(model, **kw)
    for n, p in paths.items():
        pool.register(n, p)
    return model, pool


def ids(batch, seed=0):
    return torch.randint(0, 101, (batch, 9), generator=torch.Generator().manual_seed(seed))


def peft_logits(pm, x, names):
    with torch.no_grad():
        return pm(input_ids=x, adapter_names=list(names)).logits


def test_batches_equal_peft_mixed_batch_with_lru(adapters, peft_all):
    base, paths = adapters
    model, pool = make_pool(base, paths, slots=3)
    batches = [["a0", "a3", "a5", "a0"], ["a1", "a3"], ["attn_only", "a2", "a1"], ["a0", "a4", "a0"]]
    for i, names in enumerate(batches):
        x = ids(len(names), seed=i)
        with torch.no_grad(), pool.routing(names):
            y = model(input_ids=x).logits
        torch.testing.assert_close(y, peft_logits(peft_all, x, names), atol=1e-5, rtol=1e-5)
        assert set(names) <= set(pool.resident)
    # batch 2 needed a1 (a free slot? no: 3 resident) -> evicted a5 (least recently used), kept a3
    assert pool.stats.evictions >= 3 and pool.stats.cold_loads >= 6
    assert len(pool.resident) == 3


def test_generate_inside_pool_routing(adapters, peft_all):
    base, paths = adapters
    model, pool = make_pool(base, paths, slots=2)
    names = ["a2", "a4"]
    x = ids(2, seed=5)
    gen = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), pool.routing(names):
        ours = model.generate(input_ids=x, **gen)
    with torch.no_grad():
        theirs = peft_all.generate(input_ids=x, adapter_names=names, **gen)
    assert torch.equal(ours, theirs)


def test_warm_reload_from_host_cache_and_cold_without(adapters):
    base, paths = adapters
    for cache, cold in ((1 << 30, 3), (0, 4)):
        model, pool = make_pool(base, paths, slots=2, host_cache_bytes=cache)
        for names in (["a0", "a1"], ["a2"], ["a0"]):  # a0 evicted by a2, then reloaded
            with pool.routing(names):
                pass
        assert pool.stats.cold_loads == cold
        assert pool.stats.warm_loads == 4 - cold


def test_too_many_adapters_for_the_slots_changes_nothing(adapters):
    base, paths = adapters
    model, pool = make_pool(base, paths, slots=2)
    with pool.routing(["a0"]):
        pass
    before, resident = snapshot(model), pool.resident
    with pytest.raises(MoLoRAError, match="needs 3 distinct adapters"):
        with pool.routing(["a1", "a2", "a3"]):
            pass
    assert_same_snapshot(before, snapshot(model))
    assert pool.resident == resident


def test_slots_in_flight_are_pinned(adapters):
    """A batch in flight in one thread keeps its adapters: another thread's batch cannot evict them."""
    base, paths = adapters
    model, pool = make_pool(base, paths, slots=2)
    inside, release, errors = threading.Event(), threading.Event(), []

    def first():
        with pool.routing(["a0", "a1"]):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(10)
    try:
        with pool.routing(["a2"]):
            pass
    except MoLoRAError as exc:
        errors.append(str(exc))
    release.set()
    t.join()
    assert errors and "in flight: 2" in errors[0]
    with pool.routing(["a2"]):  # once the first batch is done its slots can be reused
        assert "a2" in pool.resident


def test_unload_delete_and_unknown(adapters, peft_all):
    base, paths = adapters
    model, pool = make_pool(base, paths, slots=2)
    with pool.routing(["a0", "a1"]):
        pass
    pool.unload_adapter("a0")
    assert "a0" not in pool.resident and "a0" in pool.adapters
    pool.delete_adapter("a1")
    assert "a1" not in pool.adapters and "a1" not in pool.resident
    with pytest.raises(AdapterError, match="'a1' is not registered"):
        with pool.routing(["a1"]):
            pass
    x = ids(1, seed=3)
    with torch.no_grad(), pool.routing(["a0"]):  # reloads into a free slot, still exact
        y = model(input_ids=x).logits
    torch.testing.assert_close(y, peft_logits(peft_all, x, ["a0"]), atol=1e-5, rtol=1e-5)


def test_host_memory_adapters_and_bad_factors(adapters):
    base, paths = adapters
    model, pool = make_pool(base, {}, slots=2)
    layer = model.routed_layers()["transformer.h.0.attn.c_attn"]
    d_in, d_out = layer.bank.d_in, layer.bank.d_out
    good = {"transformer.h.0.attn.c_attn": LoraFactors(torch.randn(4, d_in), torch.randn(d_out, 4), 8.0, False)}
    pool.register("mem", good)
    x = ids(2)
    with torch.no_grad():
        with model.disable_adapters():
            plain = model(input_ids=x).logits
        with pool.routing(["mem", "mem"]):
            y = model(input_ids=x).logits
    assert not torch.allclose(y, plain)
    bad = {"transformer.h.0.attn.c_attn": LoraFactors(torch.full((4, d_in), float("nan")), torch.randn(d_out, 4), 8.0, False)}
    with pytest.raises(AdapterError, match="NaN or inf"):
        pool.register("nan", bad)
    with pytest.raises(AdapterError, match="rank <= 8"):
        pool.register("big", {"transformer.h.0.attn.c_attn": LoraFactors(torch.randn(16, d_in), torch.randn(d_out, 16), 8.0, False)})
    with pytest.raises(AdapterError, match="does not route"):
        pool.register("elsewhere", {"lm_head": good["transformer.h.0.attn.c_attn"]})
    with pytest.raises(AdapterError, match="already registered"):
        pool.register("mem", good)


def test_pool_needs_a_task_routed_model():
    base = tiny_gpt2()
    model = get_molora_model(base, MoLoRAConfig(target_modules=TARGETS, num_experts=2, router="soft"))
    with pytest.raises(MoLoRAError, match="router is 'task'"):
        AdapterPool(model)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(101, 32)
        self.q_proj = torch.nn.Linear(32, 48)
        self.v_proj = torch.nn.Linear(48, 101)

    def forward(self, input_ids):
        return self.v_proj(torch.tanh(self.q_proj(self.embed(input_ids))))


def test_hotswap_does_not_recompile():
    """Loading copies into the slots' parameters in place: a compiled model keeps its graph."""
    import torch._dynamo

    torch.manual_seed(0)
    model = get_molora_model(_Tiny(), MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, rank=4, router="task"))
    pool = AdapterPool(model)
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pool.register(f"m{i}", {name: LoraFactors(torch.randn(4, layer.bank.d_in, generator=g),
                                                  torch.randn(layer.bank.d_out, 4, generator=g), 8.0, False)
                                for name, layer in model.routed_layers().items()})
    torch._dynamo.reset()
    counts = []
    compiled = torch.compile(lambda ids: model(input_ids=ids), backend=lambda gm, inputs: (counts.append(1), gm.forward)[1])
    x = ids(2, seed=7)
    with torch.no_grad():
        for names in (["m0", "m1"], ["m2", "m3"], ["m0", "m1"]):
            with pool.routing(names):
                torch.testing.assert_close(compiled(x), model(input_ids=x))
        graphs = len(counts)
        with pool.routing(["m4", "m5"]):
            torch.testing.assert_close(compiled(x), model(input_ids=x))
    assert graphs >= 1 and len(counts) == graphs  # a further swap compiles nothing new


def test_fault_while_writing_slots_leaves_no_half_adapter(adapters, peft_all, monkeypatch):
    """A failure part-way through writing the slots (here: the second layer's bank raises) leaves
    the target slots empty and unassigned, the other resident adapters as they were, and the pool
    usable: the next batch loads the adapter again and equals PEFT."""
    base, paths = adapters
    model, pool = make_pool(base, paths, slots=2)
    x = ids(2, seed=3)
    with pool.routing(["a0", "a1"]), torch.no_grad():
        model(input_ids=x)
    kept = pool.resident["a0"]
    layers = list(pool.layers.values())
    calls = {"n": 0}
    real = type(layers[-1].bank)._refresh_scaling

    def faulty(bank):
        if bank is layers[-1].bank:
            calls["n"] += 1
            raise RuntimeError("injected fault")
        real(bank)

    monkeypatch.setattr(type(layers[-1].bank), "_refresh_scaling", faulty)
    with pytest.raises(RuntimeError, match="injected fault"):
        with pool.routing(["a0", "a2"]):
            pass
    monkeypatch.undo()
    assert calls["n"] >= 1
    assert pool.resident == {"a0": kept}  # a1 was evicted for a2, a2 did not land
    freed = 1 - kept
    for layer in layers:  # the slot written part-way (first layers) holds nothing of a2
        assert not layer.bank.B[freed].any()
    with pool.routing(["a0", "a2"]), torch.no_grad():
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, peft_logits(peft_all, x, ["a0", "a2"]), atol=1e-5, rtol=1e-5)
