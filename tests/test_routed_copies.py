"""PEFT adapters with ``modules_to_save`` (a sequence-classification head trained in full and saved
with the adapter) compose as per-expert copies (molora.routed_copies), equal to PEFT: task
routing against PEFT with that adapter active, a mixed batch against PEFT's ``adapter_names=``,
an adapter without a saved head on the base head, the checkpoint round-trip, export, merge, and
bad input refused with the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import molora
from molora.errors import AdapterError, MoLoRAError, RoutingError

from helpers import assert_same_snapshot, make_peft_adapter, snapshot

peft = pytest.importorskip("peft")

TARGETS = ["query", "value"]


def cls_base(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.2, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base, adapters a and b (task_type SEQ_CLS: PEFT saves the classifier with them, trained
    here by make_peft_adapter) and c (no modules_to_save), and PEFT's logits with each active."""
    from peft import PeftModel

    tmp = tmp_path_factory.mktemp("mts")
    base = cls_base()
    dirs = {"a": make_peft_adapter(base, tmp / "a", seed=1, target_modules=TARGETS, task_type="SEQ_CLS"),
            "b": make_peft_adapter(base, tmp / "b", seed=2, target_modules=TARGETS, task_type="SEQ_CLS"),
            "c": make_peft_adapter(base, tmp / "c", seed=3, target_modules=TARGETS)}
    ids = torch.randint(0, 101, (4, 6), generator=torch.Generator().manual_seed(5))
    refs = {}
    for name, d in dirs.items():
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()
        with torch.no_grad():
            refs[name] = pm(input_ids=ids).logits
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    return base, dirs, ids, refs, plain


def logits(model, ids, **routing):
    with torch.no_grad():
        return model(input_ids=ids, **routing).logits


def test_peft_saves_the_head_and_the_loader_reads_it(setup):
    base, dirs, *_ = setup
    a = molora.load_peft_adapter(dirs["a"])
    assert set(a.saved_modules) == {"classifier"} and set(a.saved_modules["classifier"]) == {"weight", "bias"}
    assert not torch.equal(a.saved_modules["classifier"]["weight"], base.classifier.weight)  # trained head
    assert molora.load_peft_adapter(dirs["c"]).saved_modules == {}


def test_task_routing_and_mixed_batch_equal_peft(setup):
    from peft import PeftModel

    base, dirs, ids, refs, plain = setup
    assert all(not torch.allclose(refs[n], plain, atol=1e-3) for n in refs)
    model = molora.compose(copy.deepcopy(base), dirs, router="task")
    assert list(model.routed_copies()) == ["classifier"] and model.routed_copies()["classifier"].expert_ids == [0, 1]
    for i, name in enumerate(dirs):
        torch.testing.assert_close(logits(model, ids, task_ids=[i] * 4), refs[name], atol=1e-6, rtol=0)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a"]), adapter_name="a")
    pm.load_adapter(str(dirs["b"]), adapter_name="b")
    pm.eval()
    with torch.no_grad():
        mixed = pm(input_ids=ids, adapter_names=["b", "a", "a", "b"]).logits
    torch.testing.assert_close(logits(model, ids, task_ids=["b", "a", "a", "b"]), mixed, atol=1e-6, rtol=0)
    # with c (no saved head) in the batch: PEFT's wrapper has no copy for c and cannot mix it, so
    # the reference is row i of adapter i's own run
    out = logits(model, ids, task_ids=[2, 0, 1, 2])
    expected = torch.stack([refs["c"][0], refs["a"][1], refs["b"][2], refs["c"][3]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    with model.disable_adapters():
        assert torch.equal(logits(model, ids), plain)


def test_static_router_one_hot_is_exact_and_a_blend_is_the_gate_weighted_sum(setup):
    base, dirs, ids, refs, _ = setup
    one_hot = molora.compose(copy.deepcopy(base), dirs, router="static", weights=[0.0, 1.0, 0.0])
    torch.testing.assert_close(logits(one_hot, ids), refs["b"], atol=1e-6, rtol=0)

    blend = molora.compose(copy.deepcopy(base), dirs, router="static", weights=[0.5, 0.25, 0.0])
    seen = {}
    head = blend.routed_copies()["classifier"]
    hook = head.register_forward_hook(lambda m, args, out: seen.update(x=args[0].double(), y=out.double()))
    logits(blend, ids)
    hook.remove()
    # independent reference: the heads as PEFT saved them, in float64; f0 weighs 1 - 0.5 - 0.25
    heads = {n: load_file(str(dirs[n] / "adapter_model.safetensors")) for n in "ab"}
    def f(w, b):
        return seen["x"] @ w.double().T + b.double()
    ref = (0.25 * f(base.classifier.weight.detach(), base.classifier.bias.detach())
           + 0.5 * f(heads["a"]["base_model.model.classifier.weight"], heads["a"]["base_model.model.classifier.bias"])
           + 0.25 * f(heads["b"]["base_model.model.classifier.weight"], heads["b"]["base_model.model.classifier.bias"]))
    torch.testing.assert_close(seen["y"], ref, atol=1e-6, rtol=0)


def test_per_token_router_is_refused_naming_the_module(setup):
    base, dirs, *_ = setup
    target = copy.deepcopy(base)
    before = snapshot(target)
    with pytest.raises(AdapterError, match=r"module 'classifier' whole \(PEFT's modules_to_save\).*router 'soft'"):
        molora.compose(target, dirs, router="soft")
    assert_same_snapshot(before, snapshot(target))


def test_freezing_and_checkpoint_round_trip(setup, tmp_path):
    base, dirs, ids, refs, _ = setup
    frozen = molora.compose(copy.deepcopy(base), dirs, router="task")
    assert not any(p.requires_grad for p in frozen.routed_copies()["classifier"].parameters())
    model = molora.compose(copy.deepcopy(base), dirs, router="task", trainable_experts=True)
    head = model.routed_copies()["classifier"]
    assert all(p.requires_grad for p in head.copies.parameters())
    assert not any(p.requires_grad for p in head.base_layer.parameters())
    model.set_experts_trainable(False, ["a"])
    with torch.no_grad():  # a trained head after composing: the checkpoint must carry it
        head.copies["1"].bias.add_(0.5)
    out = logits(model, ids, task_ids=[0, 1, 2, 1])
    model.save_pretrained(str(tmp_path / "ck"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ck"))
    assert torch.equal(logits(loaded, ids, task_ids=[0, 1, 2, 1]), out)
    copies = loaded.routed_copies()["classifier"].copies
    assert [p.requires_grad for p in copies["0"].parameters()] == [False, False]
    assert [p.requires_grad for p in copies["1"].parameters()] == [True, True]
    # a checkpoint merged on one adapter reloads merged, running that adapter's head
    model.merge({"a": 1.0})
    model.save_pretrained(str(tmp_path / "merged"))
    again = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "merged"))
    torch.testing.assert_close(logits(again, ids), refs["a"], atol=1e-5, rtol=0)


def test_export_writes_the_head_back_and_refuses_a_blend(setup, tmp_path):
    from peft import PeftModel

    base, dirs, ids, refs, _ = setup
    model = molora.compose(copy.deepcopy(base), dirs, router="task")
    for name in ("b", "c"):
        model.export_peft(str(tmp_path / name), {name: 1.0})
        exported = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name)).eval()
        torch.testing.assert_close(logits(exported, ids), refs[name], atol=1e-5, rtol=0)
    assert exported.peft_config["default"].modules_to_save is None  # c saved no head
    with pytest.raises(MoLoRAError, match=r"export_peft: module 'classifier' holds whole per-adapter copies.*"
                                          r"\{0: 0.5, 1: 0.5\}"):
        model.export_peft(str(tmp_path / "blend"), {"a": 0.5, "b": 0.5})
    assert not (tmp_path / "blend").exists()


def test_merge_runs_the_chosen_head_and_refuses_a_blend_untouched(setup):
    base, dirs, ids, refs, _ = setup
    model = molora.compose(copy.deepcopy(base), dirs, router="task")
    before = snapshot(model)
    with pytest.raises(MoLoRAError, match=r"merge: module 'classifier' holds whole per-adapter copies"):
        model.merge({"a": 1.0, "b": 1.0})
    assert_same_snapshot(before, snapshot(model))
    assert model.routed_copies()["classifier"].pinned is None
    model.merge({"b": 1.0, "c": 0.0})
    torch.testing.assert_close(logits(model, ids), refs["b"], atol=1e-5, rtol=0)
    model.unmerge()
    torch.testing.assert_close(logits(model, ids, task_ids=[0] * 4), refs["a"], atol=1e-6, rtol=0)


def test_a_saved_head_of_another_shape_is_refused_untouched(setup, tmp_path):
    base, dirs, *_ = setup
    five = make_peft_adapter(cls_base(num_labels=5), tmp_path / "five", seed=4, target_modules=TARGETS,
                             task_type="SEQ_CLS")
    target = copy.deepcopy(base)
    before = snapshot(target)
    with pytest.raises(AdapterError, match=r"adapter 'five' was made for a different base model: module 'classifier' "
                                           r"\(modules_to_save\) has (weight \[5, 32\]|bias \[5\]) in the adapter but "
                                           r"\[3(, 32)?\] in the base model"):
        molora.compose(target, {"a": dirs["a"], "five": five}, router="task")
    assert_same_snapshot(before, snapshot(target))
    assert not any(type(m).__module__.startswith("molora") for m in target.modules())


def test_a_per_layer_router_set_later_is_refused_at_the_head(setup):
    base, dirs, ids, *_ = setup
    model = molora.compose(copy.deepcopy(base), dirs, router="task")
    from molora.routers import build_router

    model.set_layer_routers(lambda path, layer: build_router("soft", num_experts=layer.bank.num_experts,
                                                             d_in=layer.router_width), "soft")
    with pytest.raises(RoutingError, match=r"module 'classifier' holds whole per-adapter copies"):
        logits(model, ids)


def test_general_adapters_with_a_saved_head_are_refused(setup):
    """GenKnowSub subtracts LoRA factors only: a general adapter's head would be dropped silently."""
    base, dirs, *_ = setup
    target = copy.deepcopy(base)
    before = snapshot(target)
    with pytest.raises(AdapterError, match=r"general adapters \['a'\] saved whole modules"):
        molora.compose(target, {"c": dirs["c"]}, router="task", general_adapters={"a": dirs["a"]})
    assert_same_snapshot(before, snapshot(target))


def test_checkpoint_refuses_a_base_whose_copied_module_differs(setup, tmp_path):
    """The original of a copied module (what an expert without a copy runs) is part of the base
    fingerprint: loading onto a base with another head is refused by name, the base untouched."""
    from helpers import assert_same_snapshot, snapshot

    base, dirs, ids, refs, _ = setup
    molora.compose(copy.deepcopy(base), dirs, router="task").save_pretrained(str(tmp_path / "ck"))
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.classifier.weight.mul_(1.5)
    before = snapshot(other)
    with pytest.raises(molora.CheckpointError, match=r"another base model \(module 'classifier' differs"):
        molora.MoLoRAModel.from_pretrained(other, str(tmp_path / "ck"))
    assert_same_snapshot(before, snapshot(other))
    molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ck"))  # the right base loads
