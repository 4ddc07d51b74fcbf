"""Per-request mixtures (router "mixture"): each example's own weights over named adapters.

References: a float64 loop over one routed layer, and, per example, the same adapters under a
static mixture of that example's weights (router "static", itself checked against PEFT)."""

from __future__ import annotations

import copy

import pytest
import torch

from molora import MoLoRAConfig, RoutingError, compose, get_molora_model

from helpers import make_peft_adapter
from test_generate import GEN, prompts, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIXES = [{"a": 0.7, "c": -0.3}, {"b": 1.0}, {}]          # example 2 names no adapter: the base model


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    base = tiny_llama()
    tmp = tmp_path_factory.mktemp("mixture")
    folders = {n: make_peft_adapter(base, tmp / n, seed=s, r=4, alpha=8, target_modules=TARGETS)
               for n, s in (("a", 1), ("b", 2), ("c", 3))}
    return base, folders, compose(copy.deepcopy(base), folders, router="mixture").eval()


def static_model(base, folders, mix):
    return compose(copy.deepcopy(base), folders, router="static",
                   weights=[mix.get(n, 0.0) for n in folders]).eval()


def test_layer_equals_float64_loop():
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(6, 5)
    holder.forward = lambda t: holder.proj(t)
    model = get_molora_model(holder, MoLoRAConfig(target_modules=["proj"], num_experts=4, rank=2, alpha=4.0, router="mixture"))
    layer = model.routed_layers()["proj"]
    with torch.no_grad():
        for b in layer.bank.B:
            b.normal_()
    x = torch.randn(3, 4, 6)
    w = torch.tensor([[0.5, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    with torch.no_grad(), model.routing(expert_weights=w):
        y = model(x)
    ref = torch.empty(3, 4, 5, dtype=torch.float64)
    W, bias = holder.proj.weight.double(), holder.proj.bias.double()
    for b in range(3):
        out = x[b].double() @ W.T + bias
        for e in range(4):
            A, B = layer.bank.A[e].double(), layer.bank.B[e].double()
            out = out + w[b, e].double() * layer.bank.scaling[e] * (x[b].double() @ A.T @ B.T)
        ref[b] = out
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    decision = model.last_routing()["proj"].decision
    assert decision.indices.shape == (3, 4) and decision.indices[1].eq(-1).all()   # k = most named; row 1 none


def test_each_example_equals_its_static_mixture(setting):
    base, folders, model = setting
    inputs = prompts()
    with torch.no_grad(), model.routing(expert_weights=MIXES):
        ours = model(**inputs).logits
        decision = next(iter(model.last_routing().values())).decision
    assert decision.indices.shape[1] == 2                     # sparse: the two named by example 0, not E=3
    for b, mix in enumerate(MIXES):
        ref = static_model(base, folders, mix)
        with torch.no_grad():
            expect = ref(input_ids=inputs["input_ids"][b:b + 1], attention_mask=inputs["attention_mask"][b:b + 1]).logits
        torch.testing.assert_close(ours[b:b + 1], expect, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours[2:], base(**{k: v[2:] for k, v in inputs.items()}).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beams+return"])
def test_generate_keeps_each_examples_mixture(setting, kw):
    base, folders, model = setting
    inputs = prompts()
    with torch.no_grad():
        with model.routing(expert_weights=MIXES):
            ours = model.generate(**inputs, **GEN, **kw, do_sample=False)
            no_cache = model.generate(**inputs, **GEN, **kw, do_sample=False, use_cache=False)
        assert torch.equal(ours, no_cache)
        per = len(ours) // len(MIXES)
        for b, mix in enumerate(MIXES):
            ref = static_model(base, folders, mix).generate(
                **{k: v[b:b + 1] for k, v in inputs.items()}, **GEN, **kw, do_sample=False)
            assert torch.equal(ours[b * per:(b + 1) * per], ref)


def test_bad_mixtures_are_refused(setting):
    _, _, model = setting
    inputs = prompts()
    cases = [([{"zz": 1.0}, {}, {}], "unknown experts"), ([{"a": float("nan")}, {}, {}], "expert 'a'"),
             (torch.ones(3, 2), "has 2 columns"), (torch.ones(3), r"\[batch, experts\]"),
             (torch.full((3, 3), float("inf")), "NaN or inf")]
    for mix, message in cases:
        with pytest.raises(RoutingError, match=message), torch.no_grad():
            with model.routing(expert_weights=mix):
                model(**inputs)
    with pytest.raises(RoutingError, match="needs expert_weights"), torch.no_grad():
        model(**inputs)
