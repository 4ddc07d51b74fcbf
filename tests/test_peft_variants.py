"""Every LoRA variant a PEFT user can save: composed equal to PEFT's own output, or refused with an
AdapterError naming the config field (or the module) — never silently wrong. Real adapters, saved
by PEFT's get_peft_model + save_pretrained on tiny random models."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

import molora
from molora.errors import AdapterError

from helpers import make_peft_adapter, model_inputs, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")


def tiny_linear():
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(12, 10))
    return base.eval()


def tiny_conv():
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    return base.eval()


def _inputs(kind):
    if kind == "linear":
        return (torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1)),)
    if kind == "conv":
        return (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)),)
    return model_inputs(kind)


def _output(model, kind, inputs):
    with torch.no_grad():
        if kind in ("linear", "conv"):
            return model(*inputs)
        out = model(**inputs)
        return out.logits if kind == "gpt2" else out.last_hidden_state


BASES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "linear": tiny_linear, "conv": tiny_conv}

# (id, base, LoraConfig kwargs, None = composes equal to PEFT, else a regex the AdapterError must match)
CASES = [
    ("plain", "bert", dict(target_modules=["query", "value"]), None),
    ("rslora", "gpt2", dict(target_modules=["c_attn"], use_rslora=True), None),
    ("layers_to_transform", "bert", dict(target_modules=["query"], layers_to_transform=[1]), None),
    ("target_parameters", "linear", dict(target_modules=[], target_parameters=["proj.weight"]), None),
    ("dropout", "bert", dict(target_modules=["query"], lora_dropout=0.3), None),
    ("dora", "bert", dict(target_modules=["query"], use_dora=True), None),
    ("dora_conv1d", "gpt2", dict(target_modules=["c_attn"], use_dora=True), None),
    ("alora", "gpt2", dict(target_modules=["c_attn"], task_type="CAUSAL_LM", alora_invocation_tokens=[5, 7]),
     r"alora_invocation_tokens=\[5, 7\]: the adapter uses aLoRA"),
    ("lora_bias", "bert", dict(target_modules=["query"], lora_bias=True), r"lora_bias=True: the adapter uses a bias on lora_B"),
    ("bias_all", "bert", dict(target_modules=["query"], bias="all"), r"bias='all'"),
    ("trainable_tokens", "bert", dict(target_modules=["query"], trainable_token_indices={"word_embeddings": [1, 2]}),
     r"trainable_token_indices=\{'word_embeddings': \[1, 2\]\}"),
    ("modules_to_save", "bert", dict(target_modules=["query"], modules_to_save=["pooler.dense"]), r"modules_to_save=\['pooler.dense'\]"),
    ("embedding", "bert", dict(target_modules=["word_embeddings"]),
     r"module 'embeddings\.word_embeddings' is an Embedding LoRA"),
    ("pissa_unconverted", "linear", dict(target_modules=["proj"], init_lora_weights="pissa"),
     r"init_lora_weights='pissa': the initialisation changes the base weights"),
    ("olora_unconverted", "linear", dict(target_modules=["proj"], init_lora_weights="olora"),
     r"init_lora_weights='olora'"),
    ("conv2d", "conv", dict(target_modules=["conv"]), r"module 'conv' is a Conv2d LoRA"),
]


@pytest.mark.parametrize("name, kind, kw, refused", CASES, ids=[c[0] for c in CASES])
def test_variant_equals_peft_or_is_refused(tmp_path, name, kind, kw, refused):
    base = BASES[kind]()
    kw = dict(kw)
    if kind in ("linear", "conv"):
        kw.setdefault("r", 2)
    d = make_peft_adapter(base, tmp_path / name, seed=3, **kw)
    if refused is not None:
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(AdapterError, match=refused):
            molora.compose(base, {name: d}, router="task")
        assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
        assert not any(type(m).__module__.startswith("molora") for m in base.modules())
        return
    from peft import PeftModel

    inputs = _inputs(kind)
    ref = _output(PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval(), kind, inputs)
    assert not torch.allclose(ref, _output(base, kind, inputs), atol=1e-3), "the adapter must change the output"
    model = molora.compose(copy.deepcopy(base), {name: d}, router="task")
    batch = (inputs[0] if isinstance(inputs, tuple) else inputs["input_ids"]).shape[0]
    with model.routing(task_ids=[0] * batch):
        out = _output(model, kind, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_alora_on_its_own_is_refused_before_anything_else(tmp_path):
    """The silently-wrong case of issue 14: aLoRA used to compose as plain LoRA."""
    d = make_peft_adapter(tiny_gpt2(), tmp_path / "al", seed=1, target_modules=["c_attn"], task_type="CAUSAL_LM",
                          alora_invocation_tokens=[3])
    with pytest.raises(AdapterError, match=rf"^adapter 'al': {re.escape(str(d / 'adapter_config.json'))}: "
                                           r"alora_invocation_tokens=\[3\]"):
        molora.load_peft_adapter(d)


def test_field_unknown_to_this_peft_is_refused_unless_off(tmp_path):
    """A field a newer PEFT saved (PEFT itself only warns and drops it) is refused when it is set."""
    d = make_peft_adapter(tiny_linear(), tmp_path / "new", seed=1, r=2, target_modules=["proj"])
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_future_variant": None}))
    molora.load_peft_adapter(d)  # off: same forward
    cfg_path.write_text(json.dumps({**cfg, "use_future_variant": True}))
    with pytest.raises(AdapterError, match=r"use_future_variant=True: a field this PEFT .* does not know"):
        molora.load_peft_adapter(d)


def test_peft_rejecting_a_value_is_an_adapter_error(tmp_path):
    """PEFT's own validation (here: layers_pattern without layers_to_transform) is wrapped."""
    d = make_peft_adapter(tiny_linear(), tmp_path / "v", seed=1, r=2, target_modules=["proj"])
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "layers_pattern": "layers", "layers_to_transform": None}))
    with pytest.raises(AdapterError, match=rf"^adapter 'v': {re.escape(str(cfg_path))}: PEFT cannot read it: ValueError"):
        molora.load_peft_adapter(d)


def _cache_repo(cache, repo_id, files_by_folder, sha="0123456789abcdef0123456789abcdef01234567"):
    """A Hub cache as huggingface_hub lays it out: models--user--repo/{refs/main, snapshots/<sha>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    for sub, src in files_by_folder.items():
        dest = repo / "snapshots" / sha / sub
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (dest / f).write_bytes((src / f).read_bytes())
    return sha


def test_hub_id_resolves_offline_through_the_cache(tmp_path, monkeypatch):
    """load_peft_adapter("user/repo") (and compose) read a cached Hub adapter with HF_HUB_OFFLINE,
    at a revision and in a subfolder; a missing id is a clear AdapterError."""
    from huggingface_hub import constants

    base = tiny_linear()
    a = make_peft_adapter(base, tmp_path / "a", seed=1, r=2, target_modules=["proj"])
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=3, target_modules=["proj"])
    cache = tmp_path / "hub"
    sha = _cache_repo(cache, "user/repo", {"": a, "sub": b})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    local_a, local_b = molora.load_peft_adapter(a), molora.load_peft_adapter(b)
    hub_a = molora.load_peft_adapter("user/repo")
    assert hub_a.name == "repo" and torch.equal(hub_a.modules["proj"].A, local_a.modules["proj"].A)
    hub_b = molora.load_peft_adapter("user/repo", subfolder="sub", revision=sha)
    assert hub_b.name == "sub" and torch.equal(hub_b.modules["proj"].B, local_b.modules["proj"].B)
    model = molora.compose(copy.deepcopy(base), {"a": "user/repo"}, router="task")
    x = _inputs("linear")
    with model.routing(task_ids=[0, 0, 0]):
        out = _output(model, "linear", x)
    from peft import PeftModel

    torch.testing.assert_close(out, _output(PeftModel.from_pretrained(copy.deepcopy(base), str(a)), "linear", x),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterError, match=r"'user/missing' is neither a local folder nor a Hugging Face Hub adapter "
                                           r"that can be read offline from the cache"):
        molora.load_peft_adapter("user/missing")
    with pytest.raises(AdapterError, match="neither a local folder"):
        molora.load_peft_adapter("user/repo", revision="f" * 40)
    with pytest.raises(AdapterError, match=r"folder .*nope does not exist"):
        molora.load_peft_adapter("user/repo", subfolder="nope")


def test_converted_pissa_equals_peft_on_the_original_base(tmp_path):
    """PiSSA converted by PEFT (a delta on the original base) composes equal to PEFT."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_linear()
    torch.manual_seed(4)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["proj"], init_lora_weights="pissa"))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial state as plain LoRA
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        pm.base_model.model.proj.lora_B["default"].weight.add_(0.3 * torch.randn(10, 2))
    pm.save_pretrained(str(tmp_path / "pissa"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    x = _inputs("linear")
    ref = _output(PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "pissa")).eval(), "linear", x)
    assert not torch.allclose(ref, _output(base, "linear", x), atol=1e-3)
    model = molora.compose(copy.deepcopy(base), {"p": tmp_path / "pissa"}, router="task")
    with model.routing(task_ids=[0, 0, 0]):
        torch.testing.assert_close(_output(model, "linear", x), ref, atol=1e-5, rtol=1e-5)
