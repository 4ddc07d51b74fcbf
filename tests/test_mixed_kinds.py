"""Mixed banks (molora.kinds.mixed): experts of every kind in one layer behind one router. Each
expert alone equals the single-kind bank holding it (outputs and gradients), a static mixture is
the gate-weighted sum of the experts' outputs (DoRA's mixture rule), merge/export/save/load keep
it, and the model-level tools of a kind find its part."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import CheckpointError, MoLoRAError
from molora.kinds import MixedBank, QRLoRABank

from helpers import assert_same_snapshot, model_inputs, peft_output, snapshot, tiny_bert

KINDS = ["lora", "dora", "qr_lora", "moslora", "ard_lora", "ortho_lora", "riemann_lora", "lora"]


def _base() -> nn.Sequential:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 12))
    return base


def _mixed(base: nn.Module, kinds=KINDS, targets=("lin",), **kw) -> molora.MoLoRAModel:
    cfg = dict(num_experts=len(kinds), rank=3, alpha=6.0, router="task")
    cfg.update(kw)
    return get_molora_model(base, MoLoRAConfig(target_modules=list(targets), expert_kind=list(kinds), **cfg))


def _randomize(model: molora.MoLoRAModel, seed: int = 0) -> None:
    """Random values in every expert tensor (QR-LoRA's dR: its upper triangle; not RiemannLoRA's
    gradient probes, which must stay 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for name, p in layer.bank.named_parameters():
                if ".Z_" not in name:  # RiemannLoRA's gradient probes stay 0
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
            for part in layer.bank.parts.values():
                if isinstance(part, QRLoRABank):
                    for p in part.dR:
                        p.copy_(torch.triu(p))


def _single(base: nn.Module, part, kind: str, **kw) -> molora.MoLoRAModel:
    """A model of one kind whose only bank holds exactly ``part``'s experts."""
    model = get_molora_model(base, MoLoRAConfig(target_modules=["lin"], num_experts=part.num_experts, rank=3,
                                                alpha=6.0, router="task", expert_kind=kind, **kw))
    model.routed_layers()["lin"].bank.load_state_dict(part.state_dict())
    return model


def test_a_list_of_kinds_builds_one_mixed_bank_with_one_part_per_kind():
    model = _mixed(_base())
    bank = model.routed_layers()["lin"].bank
    assert isinstance(bank, MixedBank) and list(bank.parts) == list(dict.fromkeys(KINDS))
    assert bank.kinds == KINDS and bank.local == [0, 0, 0, 0, 0, 0, 0, 1]
    assert [type(p).kind for p in bank.parts.values()] == list(bank.parts)
    # fresh experts of every kind start as the base exactly
    x = torch.randn(8, 16)
    assert torch.count_nonzero(bank.delta_weight([1.0] * 8)) == 0
    with torch.no_grad(), model.routing(task_ids=list(range(8))):
        torch.testing.assert_close(model(x), model.base_model.lin.base_layer(x), atol=1e-6, rtol=1e-6)


def test_each_expert_alone_equals_the_single_kind_bank_that_holds_it():
    base = _base()
    model = _mixed(copy.deepcopy(base))
    _randomize(model)
    bank = model.routed_layers()["lin"].bank
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.routing(task_ids=list(range(8))):  # row e -> expert e, one mixed batch
        mixed = model(x)
    for kind, part in bank.parts.items():
        single = _single(copy.deepcopy(base), part, kind)
        for e in bank.members(kind):
            with torch.no_grad(), single.routing(task_ids=[bank.local[e]] * 8):
                ref = single(x)
            torch.testing.assert_close(mixed[e], ref[e], atol=1e-6, rtol=1e-6, msg=f"expert {e} ({kind})")
        assert not torch.allclose(ref, base.lin(x))  # the experts do add something


def test_gradients_of_every_part_equal_its_single_kind_bank():
    base = _base()
    model = _mixed(copy.deepcopy(base))
    _randomize(model)
    bank = model.routed_layers()["lin"].bank
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    t = torch.randn(8, 12, generator=torch.Generator().manual_seed(5))
    with model.routing(task_ids=list(range(8))):
        (model(x) * t).sum().backward()
    for kind, part in bank.parts.items():
        rows = bank.members(kind)
        single = _single(copy.deepcopy(base), part, kind)
        with single.routing(task_ids=[bank.local[e] for e in rows]):
            (single(x[rows]) * t[rows]).sum().backward()
        ref = dict(single.routed_layers()["lin"].bank.named_parameters())
        for name, p in part.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and ref[name].grad is not None, (kind, name)
                torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-5, rtol=1e-5, msg=f"{kind}.{name}")
            else:
                assert p.grad is None, (kind, name)


def test_a_static_mixture_is_the_weighted_sum_of_the_expert_outputs_and_merges_exactly():
    """The mixture rule of DoRA (sum_e g_e y_e for gates summing to 1) holds across kinds."""
    base = _base()
    task = _mixed(copy.deepcopy(base))
    _randomize(task)
    w = torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(6)), 0).tolist()
    static = _mixed(copy.deepcopy(base), router="static", router_kwargs={"weights": w})
    static.routed_layers()["lin"].bank.load_state_dict(task.routed_layers()["lin"].bank.state_dict())
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = torch.zeros(5, 12, dtype=torch.float64)
        for e in range(8):
            with task.routing(task_ids=[e] * 5):
                ref += w[e] * task(x).double()
        out = static(x)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        before = snapshot(static)
        static.merge(w)
        torch.testing.assert_close(static(x), out, atol=1e-5, rtol=1e-5)
        static.unmerge()
        assert torch.equal(static(x), out)
    assert_same_snapshot(before, snapshot(static))


def test_stack_is_one_batched_op_per_kind_and_cached_when_frozen(monkeypatch):
    model = _mixed(_base())
    _randomize(model)
    bank = model.routed_layers()["lin"].bank
    calls = {}
    for kind, part in bank.parts.items():
        original = part._stack
        monkeypatch.setattr(part, "_stack", lambda k=kind, f=original: calls.__setitem__(k, calls.get(k, 0) + 1) or f())
    A, B = bank._stack()
    assert calls == {k: 1 for k in bank.parts}  # the two "lora" experts: one call for both
    widths = {k: p._stack()[1].shape[2] for k, p in bank.parts.items()}
    assert A.shape == (8, max(widths.values()), 16) and B.shape == (8, 12, max(widths.values()))
    for e in range(8):  # each expert's rows are its part's, zero-padded
        A_e, B_e = bank.parts[bank.kinds[e]]._stack()
        A_e = A_e if A_e.dim() == 2 else A_e[bank.local[e]]
        w = widths[bank.kinds[e]]
        assert torch.equal(A[e, :w], A_e) and torch.equal(B[e, :, :w], B_e[bank.local[e]])
        assert not A[e, w:].any() and not B[e, :, w:].any()
    bank.set_trainable(False)
    first = bank.stacked()
    assert bank.stacked() is first
    with torch.no_grad():
        bank.parts["dora"].magnitude[0].mul_(2.0)  # a source written in place: a new stack
    assert bank.stacked() is not first


def test_save_load_round_trip_and_malformed_kinds_are_refused(tmp_path):
    bert = tiny_bert()
    kinds = ["lora", "dora", "qr_lora", "moslora"]
    model = _mixed(copy.deepcopy(bert), kinds, ("query", "value"), router="topk", top_k=2, rank=4, alpha=8.0)
    _randomize(model)
    inputs = model_inputs("bert")
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    model.save_pretrained(str(tmp_path / "ck"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(bert), str(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, ref)
    assert loaded.molora_config.expert_kind == kinds
    for name, layer in loaded.routed_layers().items():
        saved = model.routed_layers()[name].bank
        assert isinstance(layer.bank, MixedBank) and layer.bank.kinds == kinds
        assert list(layer.bank.state_dict()) == list(saved.state_dict())
        assert all(torch.equal(v, saved.state_dict()[k]) for k, v in layer.bank.state_dict().items())
    from molora.persistence import CONFIG_NAME

    path = tmp_path / "ck" / CONFIG_NAME
    good = json.loads(path.read_text())
    name = next(iter(good["layers"]))
    for change, match in [(lambda b: b.update(kinds=["lora"]), "bank.kinds' has 1 entries"),
                          (lambda b: b.update(kinds=["lora", "vera", "qr_lora", "moslora"]), "'kinds' must list one kind"),
                          (lambda b: b["parts"].pop("dora"), "'parts' must hold one spec per kind"),
                          (lambda b: b["parts"]["qr_lora"].update(ranks=[2]), "part 'qr_lora' must be"),
                          (lambda b: b["parts"].update(dora=[1]), "must be a JSON object")]:
        meta = copy.deepcopy(good)
        change(meta["layers"][name]["bank"])
        path.write_text(json.dumps(meta))
        base = copy.deepcopy(bert)
        before = snapshot(base)
        with pytest.raises(CheckpointError, match=match):
            molora.MoLoRAModel.from_pretrained(base, str(tmp_path / "ck"))
        assert_same_snapshot(before, snapshot(base))


@pytest.mark.parametrize("weights", [[0.7, 0.0, -0.4, 0.5], [0.6, 0.8, 0.0, -0.3]], ids=["lora_kinds", "with_dora"])
def test_export_to_peft_reloads_equal_to_the_static_mixture(tmp_path, weights):
    pytest.importorskip("peft")
    bert = tiny_bert()
    model = _mixed(copy.deepcopy(bert), ["lora", "dora", "qr_lora", "moslora"], ("query", "value"), rank=4, alpha=8.0)
    _randomize(model)
    model.export_peft(tmp_path / "peft", dict(zip(model.expert_names, weights)))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is (weights[1] != 0)
    inputs = model_inputs("bert")
    model.merge(weights)
    with torch.no_grad():
        merged = model(**inputs).last_hidden_state
    torch.testing.assert_close(peft_output(bert, tmp_path / "peft", inputs), merged, atol=1e-5, rtol=1e-5)


def test_add_expert_of_a_kind_keeps_the_others_and_refusals_change_nothing():
    model = _mixed(_base(), ["lora", "qr_lora", "ard_lora"])
    _randomize(model)
    x = torch.randn(3, 16)
    with torch.no_grad(), model.routing(task_ids=[0, 1, 2]):
        before = model(x)
    model.add_expert("d", kind="dora")
    model.add_expert("q", kind="qr_lora")  # the QR part's rank (its shared Q fixes it)
    bank = model.routed_layers()["lin"].bank
    assert bank.kinds == ["lora", "qr_lora", "ard_lora", "dora", "qr_lora"]
    assert model.molora_config.expert_kind == bank.kinds
    with torch.no_grad(), model.routing(task_ids=[0, 1, 2]):
        assert torch.equal(model(x), before)
    with torch.no_grad(), model.routing(task_ids=[3, 4, 3]):  # fresh DoRA and QR experts: the base
        torch.testing.assert_close(model(x), model.base_model.lin(x), atol=1e-6, rtol=1e-6)
    state = snapshot(model)
    for kw, match in [(dict(kind="vera"), "kind must be one of"), (dict(kind="qr_lora", rank=5), "of its own rank only")]:
        with pytest.raises(MoLoRAError, match=match):
            model.add_expert("bad", **kw)
        assert_same_snapshot(state, snapshot(model))
    single = get_molora_model(_base(), MoLoRAConfig(target_modules=["lin"], num_experts=2, rank=3))
    with pytest.raises(MoLoRAError, match="banks hold 'lora' experts only"):
        single.add_expert("d", kind="dora")
    assert single.num_experts == 2


def test_kind_tools_find_their_part_prune_ard_keeps_outputs():
    from molora.kinds import ard_penalty, ortho_penalty, prune_ard

    model = _mixed(_base(), ["lora", "ard_lora", "ortho_lora", "ard_lora"], router="soft")
    _randomize(model)
    bank = model.routed_layers()["lin"].bank
    ard = bank.parts["ard_lora"]
    with torch.no_grad():
        ard.rank_alpha[0][1] = 0.0  # expert 1: one dead channel
        ard.rank_alpha[1].clamp_(min=0.1)
    assert ard_penalty(model, l1=1.0) > 0 and ortho_penalty(model) > 0
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = model(x)
    assert prune_ard(model) == {"lin": [2, 3]}
    assert bank.ranks == [3, 2, 3, 3] and bank.scaling.tolist() == [2.0, 2.0, 2.0, 2.0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)


def test_config_checks_the_kinds_list():
    with pytest.raises(MoLoRAError, match="gives each of the num_experts=3 experts one of"):
        MoLoRAConfig(target_modules=["lin"], num_experts=3, expert_kind=["lora", "dora"])
    with pytest.raises(MoLoRAError, match="gives each of the num_experts=2 experts one of"):
        MoLoRAConfig(target_modules=["lin"], num_experts=2, expert_kind=["lora", "vera"])
    with pytest.raises(MoLoRAError, match="shared_a=True is not allowed"):
        MoLoRAConfig(target_modules=["lin"], num_experts=2, expert_kind=["lora", "dora"], shared_a=True, rank=4)
    same = MoLoRAConfig(target_modules=["lin"], num_experts=2, expert_kind=["dora", "dora"])
    assert same.expert_kind == "dora"  # one kind: that kind's bank, not a mixed one


def test_a_layer_whose_live_experts_share_one_kind_still_takes_other_kinds():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(16, 16))
    base.add_module("lin2", nn.Linear(16, 12))
    model = get_molora_model(base, MoLoRAConfig(target_modules=["lin", "lin2"], num_experts=2, rank=4, router="task",
                                                expert_kind=["lora", "dora"], block_ranks={"lin2": [4, 0]}))
    banks = {n: layer.bank for n, layer in model.routed_layers().items()}
    assert banks["lin"].kinds == ["lora", "dora"] and banks["lin2"].kinds == ["lora"]
    assert isinstance(banks["lin2"], MixedBank)
    model.add_expert("d2", kind="dora")
    assert banks["lin"].kinds == ["lora", "dora", "dora"] and banks["lin2"].kinds == ["lora", "dora"]
