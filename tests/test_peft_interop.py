"""molora against the real PEFT library: composition, one-hot routing, soft mixtures, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import molora
from molora.errors import AdapterError, MoLoRAError

from helpers import MODELS, TARGETS, make_peft_adapter, model_inputs, peft_output

peft = pytest.importorskip("peft")


def _field(kind: str) -> str:
    return "logits" if kind == "gpt2" else "last_hidden_state"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "minilm"])
def test_one_hot_routing_equals_peft(kind, tmp_path):
    """Task routing to adapter i reproduces PEFT with adapter i (different ranks, alphas, rsLoRA)."""
    base = MODELS[kind]()
    targets = TARGETS[kind]
    specs = {
        "a": dict(r=4, alpha=8),
        "b": dict(r=2, alpha=16, use_rslora=True),
        "c": dict(r=6, alpha=3, target_modules=targets[:1]),  # targets only some modules
    }
    dirs = {}
    for i, (name, spec) in enumerate(specs.items()):
        spec = {"target_modules": targets, **spec}
        dirs[name] = make_peft_adapter(base, tmp_path / name, seed=10 + i, **spec)
    inputs = model_inputs(kind)
    refs = {name: peft_output(base, d, inputs, field=_field(kind)) for name, d in dirs.items()}
    with torch.no_grad():
        base_out = getattr(base(**inputs), _field(kind)).clone()

    model = molora.compose(copy.deepcopy(base), dirs, router="task")
    batch = inputs["input_ids"].shape[0]
    for i, name in enumerate(dirs):
        with torch.no_grad(), model.routing(task_ids=torch.full((batch,), i)):
            out = getattr(model(**inputs), _field(kind))
        torch.testing.assert_close(out, refs[name], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, base_out, atol=1e-3), "the adapter must change the output"
    # Mixed batch: each example gets its own adapter; names work as task ids.
    order = ["c", "a", "b"][:batch]
    with torch.no_grad(), model.routing(task_ids=order):
        out = getattr(model(**inputs), _field(kind))
    for row, name in enumerate(order):
        torch.testing.assert_close(out[row], refs[name][row], atol=1e-5, rtol=1e-5)


def test_rank_and_alpha_patterns(bert, tmp_path):
    """rank_pattern/alpha_pattern give per-module ranks and alphas, as PEFT reads them."""
    d = make_peft_adapter(bert, tmp_path / "p", seed=3, r=4, alpha=8, target_modules=["query", "value"],
                          rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 32})
    adapter = molora.load_peft_adapter(d)
    assert adapter.modules["encoder.layer.0.attention.self.value"].rank == 2
    assert adapter.modules["encoder.layer.1.attention.self.query"].alpha == 32
    assert adapter.modules["encoder.layer.0.attention.self.query"].alpha == 8
    inputs = model_inputs("bert")
    ref = peft_output(bert, d, inputs)
    model = molora.compose(copy.deepcopy(bert), {"p": d}, router="task")
    with torch.no_grad(), model.routing(task_ids=[0, 0, 0]):
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref, atol=1e-5, rtol=1e-5)


def test_soft_gates_equal_weighted_peft_deltas(tmp_path):
    """One routed linear: soft gates w give base(x) + sum_i w_i delta_i, delta_i from PEFT's get_delta_weight."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(12, 10))
    dirs = {n: make_peft_adapter(base, tmp_path / n, seed=s, r=r, alpha=a, target_modules=["proj"])
            for n, s, r, a in (("x", 1, 3, 6), ("y", 2, 5, 5), ("z", 3, 2, 9))}
    deltas = []
    for d in dirs.values():
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(d))
        deltas.append(pm.base_model.model.proj.get_delta_weight("default").detach())
    model = molora.compose(copy.deepcopy(base), dirs, router="soft")
    router = model.routed_layers()["proj"].router
    with torch.no_grad():  # fixed logits -> known gates, independent of x
        router.proj.weight.zero_()
    w = torch.softmax(torch.zeros(3), 0)
    x = torch.randn(4, 6, 12)
    expected = base.proj(x) + sum(wi * (x @ dW.T) for wi, dW in zip(w, deltas))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_export_peft_round_trip(kind, tmp_path):
    """PEFT loading the exported static mixture equals molora's merged mixture (and the routed sum)."""
    from peft import PeftModel

    base = MODELS[kind]()
    targets = TARGETS[kind]
    dirs = {
        "a": make_peft_adapter(base, tmp_path / "a", seed=1, r=4, alpha=8, target_modules=targets),
        "b": make_peft_adapter(base, tmp_path / "b", seed=2, r=2, alpha=4, target_modules=targets[:1], use_rslora=True),
    }
    weights = {"a": 0.7, "b": -0.4}
    model = molora.compose(copy.deepcopy(base), dirs, router="soft")
    model.export_peft(tmp_path / "mix", weights)
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    inputs = model_inputs(kind)
    exported = peft_output(base, tmp_path / "mix", inputs, field=_field(kind))

    model.merge(weights)
    with torch.no_grad():
        merged = getattr(model(**inputs), _field(kind))
    model.unmerge()
    torch.testing.assert_close(exported, merged, atol=1e-5, rtol=1e-5)
    # Independent check: PEFT's own weighted "cat" combination of the two adapters.
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a"]), adapter_name="a")
    pm.load_adapter(str(dirs["b"]), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    pm.set_adapter("mix")
    with torch.no_grad():
        ref = getattr(pm(**inputs), _field(kind))
    torch.testing.assert_close(exported, ref, atol=1e-5, rtol=1e-5)


def test_wrong_base_model_is_rejected_and_nothing_changes(bert, tmp_path):
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
    d = make_peft_adapter(other, tmp_path / "other", seed=1, target_modules=["query"])
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    names_before = [n for n, _ in bert.named_modules()]
    with pytest.raises(AdapterError, match=r"encoder\.layer\.0\.attention\.self\.query.*\[32 x 32\]"):
        molora.compose(bert, {"other": d})
    assert [n for n, _ in bert.named_modules()] == names_before
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())


def test_non_lora_adapter_is_rejected(bert, tmp_path):
    from peft import IA3Config, get_peft_model

    pm = get_peft_model(copy.deepcopy(bert), IA3Config(target_modules=["query", "output.dense"], feedforward_modules=["output.dense"]))
    pm.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterError, match="IA3"):
        molora.compose(bert, [tmp_path / "ia3"])


def test_nan_weights_are_rejected(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    d = make_peft_adapter(bert, tmp_path / "nan", seed=1, target_modules=["query"])
    f = d / "adapter_model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(f))
    with pytest.raises(AdapterError, match="NaN"):
        molora.compose(bert, [d])


def test_bin_adapter_is_read_without_pickle_code(bert, tmp_path):
    from safetensors.torch import load_file

    d = make_peft_adapter(bert, tmp_path / "bin", seed=4, target_modules=["query"])
    state = load_file(str(d / "adapter_model.safetensors"))
    torch.save(state, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    adapter = molora.load_peft_adapter(d)
    key = next(k for k in state if "lora_A" in k)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    assert torch.equal(adapter.modules[module].A, state[key])


def test_no_matching_module(bert):
    with pytest.raises(MoLoRAError, match="no module of BertModel matches"):
        molora.get_molora_model(bert, molora.MoLoRAConfig(target_modules=["nonexistent"]))
