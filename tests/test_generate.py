"""generate(): beams, sampling with num_return_sequences, and sequence-level routers under the
KV cache. References: PEFT's own ``generate(adapter_names=...)``, ``use_cache=False``, and a
base model with each example's prefill decision merged into its weights."""

from __future__ import annotations

import copy

import pytest
import torch

from molora import MoLoRAConfig, RoutingError, compose, get_molora_model

from helpers import make_peft_adapter, tiny_gpt2, tiny_llama

GEN = {"max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": None}


BASES = {"llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}


def prompts(batch: int = 3, seq: int = 5, seed: int = 3, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:  # left padding, as decoder-only generation wants
        ids[0, :2], mask[0, :2] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=sorted(BASES))
def composed(request, tmp_path_factory):
    """(base, folders, molora task-routed model, PEFT model holding the same adapters)."""
    from peft import PeftModel

    make, targets = BASES[request.param]
    base = make()
    tmp = tmp_path_factory.mktemp(f"gen_{request.param}")
    folders = {n: make_peft_adapter(base, tmp / n, seed=s, r=4, alpha=8, target_modules=targets)
               for n, s in (("a", 1), ("b", 2), ("c", 3))}
    model = compose(copy.deepcopy(base), folders, router="task").eval()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folders["a"]), adapter_name="a").eval()
    for n in ("b", "c"):
        pm.load_adapter(str(folders[n]), adapter_name=n)
    return base, folders, model, pm


TASKS = ["b", "a", "c"]


@pytest.mark.parametrize("kw", [{"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}, {}],
                         ids=["beams", "beams+return", "greedy"])
def test_task_routing_generate_equals_peft(composed, kw):
    _, _, model, pm = composed
    inputs = prompts()
    with torch.no_grad():
        with model.routing(task_ids=TASKS):
            ours = model.generate(**inputs, **GEN, **kw, do_sample=False, output_scores=True, return_dict_in_generate=True)
        ref = pm.generate(**inputs, **GEN, **kw, do_sample=False, adapter_names=TASKS, output_scores=True,
                          return_dict_in_generate=True)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sampling_with_return_sequences_equals_peft_on_repeated_rows(composed):
    """PEFT expands ``adapter_names`` for beams only; its reference here is the same sampling on
    rows repeated by hand (the same ``[B n, V]`` draws under one seed)."""
    _, _, model, pm = composed
    inputs, n = prompts(), 3
    with torch.no_grad():
        torch.manual_seed(7)
        with model.routing(task_ids=TASKS):
            ours = model.generate(**inputs, **GEN, do_sample=True, num_return_sequences=n, top_k=0)
        repeated = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}
        torch.manual_seed(7)
        ref = pm.generate(**repeated, **GEN, do_sample=True, top_k=0, adapter_names=[t for t in TASKS for _ in range(n)])
    assert torch.equal(ours, ref)
    assert not torch.equal(ours[0::n], ours[1::n])  # the draws differ: sampling really ran


def test_task_routing_generate_cache_equals_no_cache(composed):
    _, _, model, _ = composed
    inputs = prompts()
    with torch.no_grad(), model.routing(task_ids=TASKS):
        cached = model.generate(**inputs, **GEN, num_beams=2, do_sample=False)
        uncached = model.generate(**inputs, **GEN, num_beams=2, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_signals_for_another_batch_are_refused(composed):
    _, _, model, _ = composed
    with torch.no_grad(), model.routing(task_ids=["a", "b"]), pytest.raises(RoutingError, match="2 examples"):
        model.generate(**prompts(batch=3), **GEN, num_beams=2)


# ---------------------------------------------------------------- sequence-level routers
def sequence_model(kind: str):
    make, targets = BASES[kind]
    model = get_molora_model(make(), MoLoRAConfig(target_modules=targets, num_experts=3, rank=4, alpha=8,
                                                  router="soft", router_kwargs={"granularity": "sequence"}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for p in layer.bank.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            # a sharp router: the pooled prompt and a pooled single token pick different mixes
            layer.router.proj.weight.copy_(torch.randn(layer.router.proj.weight.shape, generator=g) * 4.0)
    return model.eval()


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beams", "beams+return"])
def test_sequence_router_decides_at_prefill_with_and_without_cache(kind, kw):
    model = sequence_model(kind)
    inputs = prompts()
    with torch.no_grad():
        cached = model.generate(**inputs, **GEN, **kw, do_sample=False, output_scores=True, return_dict_in_generate=True)
        uncached = model.generate(**inputs, **GEN, **kw, do_sample=False, use_cache=False, output_scores=True,
                                  return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_sequence_router_keeps_the_prompts_decision(kind):
    """Independent reference: each example's gates from a plain forward of its prompt, merged
    into the base weights layer by layer; the base alone then generates what the routed model
    does (greedy, KV cache)."""
    model = sequence_model(kind)
    inputs = prompts(pad=False)
    with torch.no_grad():
        routed = model.generate(**inputs, **GEN, do_sample=False)
        model(**inputs)
        records = model.last_routing()
        layers = model.routed_layers()
        for b in range(inputs["input_ids"].shape[0]):
            for name, layer in layers.items():
                layer.merge(records[name].decision.gates[b])
            one = {k: v[b:b + 1] for k, v in inputs.items()}
            merged = model.generate(**one, **GEN, do_sample=False)  # merged layers run the base only
            model.unmerge()
            assert torch.equal(merged, routed[b:b + 1]), f"example {b}"
    # the old behaviour (each cached step pooling its one new token) routes differently
    gates_prompt = records[next(iter(layers))].decision.gates
    with torch.no_grad():
        model(input_ids=routed[:, -1:])
    gates_token = model.last_routing()[next(iter(layers))].decision.gates
    assert (gates_prompt - gates_token).abs().max() > 0.05


def test_decisions_are_not_kept_across_generate_calls():
    model = sequence_model("llama")
    a, b = prompts(seed=3), prompts(seed=4)
    with torch.no_grad():
        first = model.generate(**a, **GEN, do_sample=False)
        second = model.generate(**b, **GEN, do_sample=False)
        again = model.generate(**b, **GEN, do_sample=False, use_cache=False)
    assert torch.equal(second, again) and not torch.equal(first, second)


def test_token_router_is_not_frozen_by_generate():
    """A token-level router decides afresh at every step: cache and no cache agree because each
    position's decision depends on that position alone."""
    make, targets = BASES["llama"]
    model = get_molora_model(make(), MoLoRAConfig(target_modules=targets, num_experts=3, rank=4, router="topk", top_k=1))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
        cached = model.generate(**prompts(), **GEN, do_sample=False)
        uncached = model.generate(**prompts(), **GEN, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_experts_are_stacked_once_per_generate_call(composed, monkeypatch):
    """Each bank's factors are read at the prefill and serve every decoding step; a write made
    between two calls is seen by the next one (against a fresh composition holding the edit)."""
    from molora.bank import BaseExpertBank

    base, folders, model, _ = composed
    calls: dict[int, int] = {}
    stacked = BaseExpertBank.stacked

    def counting(self):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return stacked(self)

    monkeypatch.setattr(BaseExpertBank, "stacked", counting)
    inputs = prompts()
    with torch.no_grad(), model.routing(task_ids=TASKS):
        model.generate(**inputs, **GEN, do_sample=False)
    assert len(calls) == len(model.routed_layers()) and set(calls.values()) == {1}
    monkeypatch.setattr(BaseExpertBank, "stacked", stacked)

    layer = next(iter(model.routed_layers().values()))
    B = layer.bank.B[0]
    saved = B.detach().clone()
    gen = dict(**GEN, do_sample=False, output_scores=True, return_dict_in_generate=True)
    try:
        with torch.no_grad():
            with model.routing(task_ids=TASKS):
                before = model.generate(**inputs, **gen)
            B.mul_(3.0)
            with model.routing(task_ids=TASKS):
                edited = model.generate(**inputs, **gen)
                plain = model.generate(**inputs, **gen, use_cache=False)
        for a, b in zip(edited.scores, plain.scores):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(edited.scores[0], before.scores[0], atol=1e-4)
    finally:
        with torch.no_grad():
            B.copy_(saved)
