"""A call that fails leaves the model exactly as it was (full snapshot: tensors, requires_grad,
module types, hooks, config), and merge/unmerge round-trips bit-exactly."""

from __future__ import annotations

import pytest
import torch

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import MoLoRAError
from molora.routers import StaticRouter, TopKRouter

from helpers import assert_same_snapshot, make_peft_adapter, model_inputs, snapshot, tiny_bert


def _model(router="topk", **kw):
    cfg = MoLoRAConfig(target_modules=["query", "value"], num_experts=3, router=router,
                       top_k=2 if router == "topk" else None, **kw)
    model = get_molora_model(tiny_bert(), cfg)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for b in layer.bank.B:
                b.normal_(0, 0.1)
    return model


FAILING_CALLS = {
    "merge-nan": lambda m: m.merge([1.0, float("nan"), 0.0]),
    "merge-inf": lambda m: m.merge({"expert_0": float("inf")}),
    "merge-unknown": lambda m: m.merge({"nope": 1.0}),
    "merge-count": lambda m: m.merge([1.0, 2.0]),
    "merge-str": lambda m: m.merge(["a", 1.0, 1.0]),
    "merge-overflow": lambda m: m.merge([3e38, 3e38, 3e38]),
    "add-duplicate": lambda m: m.add_expert("expert_0"),
    "add-empty": lambda m: m.add_expert(""),
    "add-rank": lambda m: m.add_expert("x", rank=0),
    "add-alpha-nan": lambda m: m.add_expert("x", alpha=float("nan")),
    "add-init": lambda m: m.add_expert("x", init="zeros"),
    "set-router-per-layer": lambda m: m.set_router(TopKRouter(3, 32)),
    "set-router-size": lambda m: m.set_router(StaticRouter(5, 32)),
    "set-layer-routers-size": lambda m: m.set_layer_routers(lambda path, layer: TopKRouter(2, 32), "topk"),
    "export-nan": lambda m: m.export_peft("/tmp/molora-never-written", [float("nan"), 1.0, 1.0]),
}


@pytest.mark.parametrize("name", sorted(FAILING_CALLS))
def test_failed_change_leaves_the_model_as_it_was(name):
    model = _model()
    before = snapshot(model)
    with pytest.raises((MoLoRAError, NotImplementedError, ValueError)):
        FAILING_CALLS[name](model)
    assert_same_snapshot(before, snapshot(model))


def test_failed_merge_overflow_writes_no_layer():
    """The second layer's merge overflows: the first is not written either."""
    model = _model()
    layers = list(model.routed_layers().values())
    with torch.no_grad():
        layers[-1].bank.B[0].fill_(3e38)
    before = snapshot(model)
    with pytest.raises(MoLoRAError, match="NaN or inf"):
        model.merge([1.0, 0.0, 0.0])
    assert_same_snapshot(before, snapshot(model))
    assert not model.merged


def test_add_expert_of_a_router_that_cannot_grow_changes_nothing():
    class Frozen(TopKRouter):
        expert_dims = {}

    model = _model()
    model.set_layer_routers(lambda path, layer: Frozen(3, 32, top_k=2), "topk", {"top_k": 2})
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="cannot grow"):
        model.add_expert("new")
    assert_same_snapshot(before, snapshot(model))


def test_failed_compose_leaves_the_base_as_it_was(tmp_path):
    """An adapter for another base is refused before the base model is touched (flags, modules, hooks)."""
    base = tiny_bert()
    good = make_peft_adapter(base, tmp_path / "good", seed=1, target_modules=["query", "value"])
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=101, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=24, max_position_embeddings=64))
    bad = make_peft_adapter(other, tmp_path / "bad", seed=2, target_modules=["query", "value"])
    base.encoder.layer[0].attention.self.query.weight.requires_grad_(True)  # a flag the user set
    before = snapshot(base)
    with pytest.raises(MoLoRAError):
        molora.compose(base, {"good": good, "bad": bad}, router="task")
    assert_same_snapshot(before, snapshot(base))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unmerge_restores_the_base_bit_exactly(dtype):
    """100 merge/unmerge cycles leave the base weights bit-identical in every dtype."""
    model = _model()
    model.base_model.to(dtype)
    before = {n: l.base_layer.weight.detach().clone() for n, l in model.routed_layers().items()}
    for i in range(100):
        model.merge([0.3 + i / 100, -0.7, 1.1])
        assert model.merged
        model.unmerge()
    for n, layer in model.routed_layers().items():
        assert torch.equal(layer.base_layer.weight, before[n]), n


def test_merge_add_expert_unmerge():
    """An expert added while merged (it adds nothing yet) does not block unmerge, which restores the base."""
    model = _model()
    inputs = model_inputs("bert")
    with torch.no_grad():
        base_out = model.base_model.embeddings(inputs["input_ids"])  # any untouched path
        weights = {n: l.base_layer.weight.detach().clone() for n, l in model.routed_layers().items()}
    model.merge([1.0, 0.5, 0.0])
    model.add_expert("late")
    model.unmerge()
    for n, layer in model.routed_layers().items():
        assert torch.equal(layer.base_layer.weight, weights[n])
        assert layer.bank.num_experts == 4
    with torch.no_grad():
        assert torch.equal(model.base_model.embeddings(inputs["input_ids"]), base_out)


def test_merged_output_equals_static_mixture():
    model = _model()
    inputs = model_inputs("bert")
    w = [0.2, 0.5, 0.3]
    model.set_router(StaticRouter(3, 32, weights=w))
    with torch.no_grad():
        routed = model(**inputs).last_hidden_state
        model.merge(w)
        merged = model(**inputs).last_hidden_state
    torch.testing.assert_close(merged, routed, atol=1e-5, rtol=1e-5)
