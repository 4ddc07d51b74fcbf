"""molora against the real PEFT library: composition, one-hot routing, soft mixtures, export."""

from __future__ import annotations

import copy
import json
import re

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
    assert config["peft_version"] == peft.__version__  # written by PEFT's LoraConfig.save_pretrained
    assert molora.load_peft_adapter(tmp_path / "mix").peft_config.use_dora is False
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


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weights_are_rejected(bert, tmp_path, value):
    from safetensors.torch import load_file, save_file

    d = make_peft_adapter(bert, tmp_path / "nan", seed=1, target_modules=["query"])
    f = d / "adapter_model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = value
    save_file(state, str(f))
    with pytest.raises(AdapterError, match=rf"adapter 'nan': {f}: tensor '{key}' contains NaN or inf"):
        molora.compose(bert, [d])


def test_bin_only_adapter_is_refused_with_how_to_convert(bert, tmp_path):
    """No pickle is ever loaded: a folder with only adapter_model.bin gets an AdapterError whose
    conversion command, run by the user, makes the folder loadable."""
    from safetensors.torch import load_file

    d = make_peft_adapter(bert, tmp_path / "bin", seed=4, target_modules=["query"])
    state = load_file(str(d / "adapter_model.safetensors"))
    torch.save(state, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model\.bin is a pickle file.*safe_serialization=True") as err:
        molora.load_peft_adapter(d)
    assert "\n" not in str(err.value)  # one line (the CLI prints it as is)
    command = re.search(r'python -c "(.*)"', str(err.value))[1]
    exec(command, {})  # what the user runs on a file they trust
    adapter = molora.load_peft_adapter(d)
    key = next(k for k in state if "lora_A" in k)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    assert torch.equal(adapter.modules[module].A, state[key])


def test_no_torch_load_in_molora():
    """The pickle path is gone from the library: no torch.load call anywhere in its sources."""
    import pathlib

    root = pathlib.Path(molora.__file__).resolve().parent
    calls = [str(p) for p in root.rglob("*.py") if re.search(r"^[^#\n\"']*\btorch\.load\(", p.read_text(), re.M)]
    assert calls == []


def _malformed(path, edit):
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    result = edit(cfg)
    if isinstance(result, bytes):
        cfg_path.write_bytes(result)
    else:
        cfg_path.write_text(result if isinstance(result, str) else json.dumps(cfg if result is None else result))


def _set(**kw):
    return lambda cfg: cfg.update(kw)


def _drop(key):
    return lambda cfg: cfg.__delitem__(key)


@pytest.mark.parametrize("edit, field", [
    (lambda cfg: '{"peft_type": "LORA", "r": 4,', "not valid JSON"),
    (lambda cfg: b"\xff\xfe{}", "not valid JSON"),
    (lambda cfg: [cfg], "must hold a JSON object; got list"),
    (_drop("r"), "missing field 'r'"),
    (_drop("target_modules"), "missing field 'target_modules'"),
    (_drop("peft_type"), "peft_type: not a PEFT adapter"),
    (_set(peft_type="PREFIX_TUNING"), "peft_type: a PREFIX_TUNING adapter"),
    (_set(peft_type=["LORA"]), "peft_type: not a PEFT adapter"),
    (_set(r="4"), "r must be a positive int; got '4'"),
    (_set(r=4.0), "r must be a positive int; got 4.0"),
    (_set(r=True), "r must be a positive int; got True"),
    (_set(r=0), "r must be a positive int; got 0"),
    (_set(lora_alpha=float("nan")), "lora_alpha must be a finite number; got nan"),
    (_set(lora_alpha=float("inf")), "lora_alpha must be a finite number; got inf"),
    (_set(lora_alpha="8"), "lora_alpha must be a number; got '8'"),
    (_set(target_modules={"query": 1}), "target_modules must be a list of module names or a regex string"),
    (_set(rank_pattern=["query", 2]), "rank_pattern must be an object"),
    (_set(rank_pattern={"query": "4"}), r"rank_pattern\['query'\] must be a positive int"),
    (_set(alpha_pattern={"query": float("nan")}), r"alpha_pattern\['query'\] must be a finite number"),
    (_set(alpha_pattern={"(query": 4.0}), r"alpha_pattern pattern '\(query' is not a valid regex"),
    (_set(use_rslora="yes"), "use_rslora must be true or false"),
    (_set(use_dora=1), "use_dora must be true or false"),
    (_set(modules_to_save="classifier"), "modules_to_save must be a list or null"),
])
def test_malformed_adapter_config_names_the_file_and_field(bert, tmp_path, edit, field):
    d = make_peft_adapter(bert, tmp_path / "bad", seed=1, target_modules=["query"])
    _malformed(d, edit)
    with pytest.raises(AdapterError, match=rf"^adapter 'bad': {re.escape(str(d / 'adapter_config.json'))}.*{field}"):
        molora.load_peft_adapter(d)
    with pytest.raises(AdapterError, match=field):
        molora.compose(bert, [d])


def test_malformed_adapter_weights_name_the_file(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    d = make_peft_adapter(bert, tmp_path / "w", seed=1, target_modules=["query"])
    f = d / "adapter_model.safetensors"
    state = load_file(str(f))
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match=rf"adapter 'w': cannot read {f}"):
        molora.load_peft_adapter(d)
    a = next(k for k in state if "lora_A" in k)
    b = a.replace("lora_A", "lora_B")
    save_file({**state, a: state[a][:2].contiguous(), b: state[b][:, :2].contiguous()}, str(f))  # rank 2, config: 4
    with pytest.raises(AdapterError, match=rf"rank 2 in {f} but {d / 'adapter_config.json'} says r=4"):
        molora.load_peft_adapter(d)
    f.unlink()
    with pytest.raises(AdapterError, match=rf"adapter 'w': no adapter_model.safetensors in {d}"):
        molora.load_peft_adapter(d)
    with pytest.raises(AdapterError, match=rf"adapter 'gone': folder {tmp_path / 'gone'} does not exist"):
        molora.load_peft_adapter(tmp_path / "gone")


def test_no_matching_module(bert):
    with pytest.raises(MoLoRAError, match="no module of BertModel matches"):
        molora.get_molora_model(bert, molora.MoLoRAConfig(target_modules=["nonexistent"]))
