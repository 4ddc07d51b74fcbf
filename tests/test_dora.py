"""DoRA experts (molora.kinds.dora): real PEFT DoRA adapters composed equal to PEFT (task routing,
mixed batches, gradients), soft routing against a float64 loop of sum_e g_e y_e, persistence,
merging and the PEFT export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import AdapterError, MoLoRAError
from molora.kinds import DoRABank

from helpers import model_inputs, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402



# base maker, PEFT target_modules, output field, input kind
BASES = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"], "logits", "gpt2"),
    "gpt2": (tiny_gpt2, ["c_attn"], "logits", "gpt2"),  # Conv1D: fan_in_fan_out
    "bert": (tiny_bert, ["query", "value"], "last_hidden_state", "bert"),
}


def make_dora_adapter(base: nn.Module, path: Path, *, seed: int, targets: list[str], r: int = 4, alpha: float = 8,
                      **kw) -> Path:
    """A PEFT DoRA adapter with random non-zero A, B and a magnitude away from DoRA's init
    (``m = ||W0 + s B A||_c`` times U(0.6, 1.4) per channel), saved by PEFT."""
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=True,
                                                        init_lora_weights=False, **kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.normal_(0.0, 0.3 * p.shape[1] ** -0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.6, 1.4))
    pm.save_pretrained(str(path))
    return path


def _out(model, inputs, field):
    with torch.no_grad():
        return getattr(model(**inputs), field)


def _peft(base, folder, inputs, field):
    return _out(PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval(), inputs, field)


def _adapters(base, tmp_path, targets, n=3):
    return {f"d{i}": make_dora_adapter(base, tmp_path / f"d{i}", seed=10 + i, targets=targets) for i in range(n)}


# ---------------------------------------------------------------------------------------------- PEFT equality
@pytest.mark.parametrize("arch", list(BASES))
def test_task_routing_and_mixed_batch_equal_peft_dora(tmp_path, arch):
    make, targets, field, kind = BASES[arch]
    base = make()
    adapters = _adapters(base, tmp_path, targets)
    inputs = model_inputs(kind)
    refs = [_peft(base, d, inputs, field) for d in adapters.values()]
    plain = _out(base, inputs, field)
    assert all(not torch.allclose(r, plain, atol=1e-2) for r in refs), "each adapter must change the output"
    assert not torch.allclose(refs[0], refs[1], atol=1e-2)
    model = molora.compose(copy.deepcopy(base), adapters, router="task")
    assert all(type(layer.bank) is DoRABank for layer in model.routed_layers().values())
    for i, ref in enumerate(refs):
        with model.routing(task_ids=[i] * 3):
            torch.testing.assert_close(_out(model, inputs, field), ref, atol=1e-5, rtol=1e-5)
    # a mixed batch: PEFT refuses adapter_names= with DoRA, so the reference is row i of adapter i's model
    with model.routing(task_ids=[2, 0, 1]):
        mixed = _out(model, inputs, field)
    torch.testing.assert_close(mixed, torch.stack([refs[2][0], refs[0][1], refs[1][2]]), atol=1e-5, rtol=1e-5)


def test_dora_and_plain_lora_adapters_on_one_module_both_equal_peft(tmp_path):
    """A plain LoRA adapter joins the DoRA bank with m = ||W0 + s B A||_c: exactly its LoRA."""
    from helpers import make_peft_adapter

    base = tiny_bert()
    d = make_dora_adapter(base, tmp_path / "dora", seed=1, targets=["query"])
    p = make_peft_adapter(base, tmp_path / "plain", seed=2, target_modules=["query", "value"])
    inputs = model_inputs("bert")
    model = molora.compose(copy.deepcopy(base), {"dora": d, "plain": p}, router="task")
    layers = model.routed_layers()
    assert isinstance(layers["encoder.layer.0.attention.self.query"].bank, DoRABank)
    assert not isinstance(layers["encoder.layer.0.attention.self.value"].bank, DoRABank)
    for i, folder in enumerate((d, p)):
        with model.routing(task_ids=[i] * 3):
            torch.testing.assert_close(_out(model, inputs, "last_hidden_state"),
                                       _peft(base, folder, inputs, "last_hidden_state"), atol=1e-5, rtol=1e-5)


def test_gradients_of_m_a_b_equal_peft_dora(tmp_path):
    """Training: the norm is detached (B, A get gradient through s B A x only), m through both
    terms; compared with PEFT's own backward, dropout off."""
    base = tiny_gpt2()
    folder = make_dora_adapter(base, tmp_path / "d", seed=3, targets=["c_attn"])
    inputs = model_inputs("gpt2")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folder), is_trainable=True).train()
    pm(**inputs).logits.square().mean().backward()
    model = molora.compose(copy.deepcopy(base), {"d": folder}, router="task", trainable_experts=True).train()
    with model.routing(task_ids=[0] * 3):
        model(**inputs).logits.square().mean().backward()
    for i in range(2):
        peft_layer = pm.base_model.model.transformer.h[i].attn.c_attn
        bank = model.routed_layers()[f"transformer.h.{i}.attn.c_attn"].bank
        pairs = [(bank.A[0], peft_layer.lora_A["default"].weight), (bank.B[0], peft_layer.lora_B["default"].weight),
                 (bank.magnitude[0], peft_layer.lora_magnitude_vector["default"].weight)]
        for ours, theirs in pairs:
            assert ours.grad is not None and ours.grad.abs().sum() > 0
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4)


def test_dropout_in_training_uses_the_dropped_input_for_the_base_term():
    """PEFT's DoRA in training with dropout: (c - 1) * W0 dropout(x), not the base output."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(8, 6))
    model = get_molora_model(base, MoLoRAConfig(target_modules=["lin"], num_experts=1, rank=2, router="task",
                                                expert_kind="dora", dropout=0.5))
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    with torch.no_grad():
        bank.B[0].normal_()
        bank.magnitude[0].mul_(1.5)
    x = torch.randn(5, 8)
    model.train()
    torch.manual_seed(7)
    with model.routing(task_ids=[0] * 5):
        out = model(x)
    torch.manual_seed(7)
    xd = nn.functional.dropout(x, 0.5, training=True)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    c = (bank.magnitude[0] / torch.linalg.norm(W + bank.scaling[0] * bank.B[0] @ bank.A[0], dim=1)).detach()
    ref = x @ W.T + b + (c - 1) * (xd @ W.T) + c * bank.scaling[0] * (xd @ bank.A[0].T @ bank.B[0].T)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- float64 loop
def _dora_model(base_layer: nn.Module, router: str, *, seed: int = 0) -> molora.MoLoRAModel:
    base = nn.Sequential()
    base.add_module("lin", base_layer)
    model = get_molora_model(base, MoLoRAConfig(target_modules=["lin"], num_experts=3, rank=3, alpha=6, router=router,
                                                top_k=2 if router == "topk" else None, expert_kind="dora"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bank = model.routed_layers()["lin"].bank
        for e in range(3):
            bank.A[e].copy_(torch.randn(bank.A[e].shape, generator=g) * 0.3)
            bank.B[e].copy_(torch.randn(bank.B[e].shape, generator=g) * 0.3)
            bank.magnitude[e].mul_(torch.rand(bank.d_out, generator=g) + 0.5)
    return model


def _dense(decision, E):
    if decision.indices is None:
        return decision.gates
    return torch.zeros(decision.gates.shape[0], E).scatter(1, decision.indices, decision.gates)


@pytest.mark.parametrize("router", ["soft", "topk"])
@pytest.mark.parametrize("layer_kind", ["linear", "conv1d"])
def test_soft_routing_equals_float64_sum_of_dora_outputs(router, layer_kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(16, 12) if layer_kind == "linear" else Conv1D(12, 16)
    model = _dora_model(lin, router)
    layer = model.routed_layers()["lin"]
    bank = layer.bank
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        g = _dense(layer.router(x, molora.RoutingSignals()), 3).double().reshape(2, 7, 3)
        out = model(x)
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 7, dtype=torch.float64))
    W = layer.base_layer.weight.detach().double()
    W = W.T if layer_kind == "conv1d" else W  # Conv1D stores [d_in, d_out]
    b = layer.base_layer.bias.detach().double()
    ref = torch.zeros(2, 7, 12, dtype=torch.float64)
    for e in range(3):  # y_e = m_e / ||W0 + s B A||_c * (W0 + s B A) x + b, per expert
        V = W + float(bank.scaling[e]) * bank.B[e].detach().double() @ bank.A[e].detach().double()
        c = bank.magnitude[e].detach().double() / torch.linalg.norm(V, dim=1)
        ref = ref + g[..., e:e + 1] * (c * (x.double() @ V.T) + b)
    assert not torch.allclose(ref, x.double() @ W.T + b, atol=1e-2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_fresh_dora_experts_start_as_the_base_and_grow():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    fresh = get_molora_model(nn.Sequential(nn.Linear(16, 12)),
                             MoLoRAConfig(target_modules=["0"], num_experts=2, rank=2, expert_kind="dora"))
    with torch.no_grad():  # B = 0 and m = ||W0||_c: c = 1, the base exactly
        torch.testing.assert_close(fresh(x), fresh.routed_layers()["0"].base_layer(x), atol=1e-6, rtol=1e-6)
    model = _dora_model(nn.Linear(16, 12), "soft")
    model.add_expert("new")  # m = ||W0 + s B A||_c with B = 0: the new expert adds nothing
    bank = model.routed_layers()["lin"].bank
    torch.testing.assert_close(bank.dora_scale()[3], torch.ones(12))
    assert not torch.allclose(bank.dora_scale()[:3], torch.ones(3, 12), atol=1e-2)


def test_norm_is_recomputed_after_a_step_and_after_inference_mode():
    """The cached norm follows the factors (an optimizer step moves it), and one made under
    inference_mode is not reused by a training forward (it could not be saved for backward)."""
    torch.manual_seed(0)
    model = _dora_model(nn.Linear(16, 12), "soft")
    bank = model.routed_layers()["lin"].bank
    x = torch.randn(4, 16)
    with torch.inference_mode():
        model(x)
    before = bank.weight_norm().clone()
    model(x).square().sum().backward()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    opt.step()
    after = bank.weight_norm()
    W = model.routed_layers()["lin"].base_layer.weight.detach().double()
    for e in range(3):  # the direct form, in float64
        V = W + float(bank.scaling[e]) * bank.B[e].detach().double() @ bank.A[e].detach().double()
        torch.testing.assert_close(after[e].double(), torch.linalg.norm(V, dim=1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_bank_without_a_base_weight_and_shared_a_are_refused():
    bank = DoRABank(6, 4)
    with pytest.raises(MoLoRAError, match="DoRA experts need the base weight"):
        bank.add_expert(2, 2.0)
    assert bank.num_experts == 0
    with pytest.raises(MoLoRAError, match="expert_kind 'dora' has one A per expert; shared_a=True is not allowed"):
        MoLoRAConfig(target_modules=["q"], expert_kind="dora", shared_a=True)
    with pytest.raises(ValueError, match=r"magnitude must have shape \[4\]"):
        DoRABank(6, 4, base_weight=torch.randn(4, 6)).add_expert(2, 2.0, magnitude=torch.ones(5))
    packed = nn.Linear(6, 4)
    packed.weight = nn.Parameter(torch.zeros(12, 1, dtype=torch.uint8), requires_grad=False)  # as a 4-bit base
    with pytest.raises(MoLoRAError, match=r"base weight must be a floating \[d_out=4, d_in=6\] matrix .* got \[12, 1\] torch.uint8"):
        molora.RoutedLoRALinear(packed, DoRABank(6, 4, base_weight=torch.randn(4, 6)))


# ---------------------------------------------------------------------------------------------- files
def _dora_file(tmp_path):
    """(base, adapter folder, its safetensors path, its tensors, the key of one magnitude vector)."""
    base = tiny_bert()
    folder = make_dora_adapter(base, tmp_path / "d", seed=1, targets=["query"])
    st = folder / "adapter_model.safetensors"
    tensors = load_file(str(st))
    return base, folder, st, tensors, next(k for k in tensors if k.endswith("lora_magnitude_vector"))


def test_nan_magnitude_in_the_file_is_refused(tmp_path):
    base, folder, st, tensors, key = _dora_file(tmp_path)
    tensors[key][3] = float("nan")
    save_file(tensors, str(st))
    with pytest.raises(AdapterError, match=rf"adapter 'd': .*tensor '{key}'.*NaN"):
        molora.compose(base, {"d": folder}, router="task")
    assert not any(type(m).__module__.startswith("molora") for m in base.modules())


def test_missing_or_stray_magnitude_is_refused(tmp_path):
    base, folder, st, tensors, key = _dora_file(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != key}, str(st))
    with pytest.raises(AdapterError, match=r"is DoRA \(use_dora\) and needs a floating lora_magnitude_vector \[32\].*got none"):
        molora.load_peft_adapter(folder)
    save_file(tensors, str(st))
    cfg_path = folder / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": False}))
    with pytest.raises(AdapterError, match="is a DoRA magnitude but .* has use_dora false"):
        molora.load_peft_adapter(folder)


def test_save_load_round_trip(tmp_path):
    base = tiny_llama()
    adapters = _adapters(base, tmp_path, ["q_proj", "v_proj"], n=2)
    inputs = model_inputs("gpt2")
    model = molora.compose(copy.deepcopy(base), adapters, router="soft", trainable_experts=True)
    with torch.no_grad():  # magnitudes away from what the files hold: the checkpoint must carry them
        for layer in model.routed_layers().values():
            layer.bank.magnitude[1].mul_(1.3)
    before = _out(model, inputs, "logits")
    model.save_pretrained(str(tmp_path / "ck"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ck"))
    layers = loaded.routed_layers()
    assert all(type(layer.bank) is DoRABank for layer in layers.values())
    for name, layer in model.routed_layers().items():
        torch.testing.assert_close(layers[name].bank.magnitude[1], layer.bank.magnitude[1], atol=0, rtol=0)
    torch.testing.assert_close(_out(loaded, inputs, "logits"), before, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- merge, export
def test_merge_equals_unmerged_for_one_hot_and_static_mixes(tmp_path):
    base = tiny_gpt2()
    adapters = _adapters(base, tmp_path, ["c_attn"])
    inputs = model_inputs("gpt2")
    model = molora.compose(copy.deepcopy(base), adapters, router="task")
    with model.routing(task_ids=[1] * 3):
        routed = _out(model, inputs, "logits")
    model.merge([0.0, 1.0, 0.0])
    torch.testing.assert_close(_out(model, inputs, "logits"), routed, atol=1e-5, rtol=1e-5)
    model.unmerge()
    weights = [0.5, 0.0, 0.5]
    static = molora.compose(copy.deepcopy(base), adapters, router="static", weights=weights)
    mixed = _out(static, inputs, "logits")
    static.merge(weights)
    torch.testing.assert_close(_out(static, inputs, "logits"), mixed, atol=1e-5, rtol=1e-5)
    static.unmerge()
    torch.testing.assert_close(_out(static, inputs, "logits"), mixed, atol=0, rtol=0)


@pytest.mark.parametrize("weights", [[0.0, 1.0, 0.0], [0.25, 0.0, 0.75]], ids=["one_hot", "mix"])
def test_export_is_one_peft_dora_adapter_equal_to_the_mixture(tmp_path, weights):
    base = tiny_gpt2()
    adapters = _adapters(base, tmp_path, ["c_attn", "c_fc"])
    inputs = model_inputs("gpt2")
    model = molora.compose(copy.deepcopy(base), adapters, router="static", weights=weights)
    expected = _out(model, inputs, "logits")
    model.export_peft(str(tmp_path / "out"), weights)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is True
    torch.testing.assert_close(_peft(base, tmp_path / "out", inputs, "logits"), expected, atol=1e-5, rtol=1e-5)
    if weights == [0.0, 1.0, 0.0]:
        torch.testing.assert_close(expected, _peft(base, adapters["d1"], inputs, "logits"), atol=1e-5, rtol=1e-5)
    with pytest.raises(MoLoRAError, match="hold DoRA experts, whose mixture is exact only as combination 'cat'"):
        model.export_peft(str(tmp_path / "svd"), weights, combination="svd")
    assert not (tmp_path / "svd").exists()


def test_export_of_dora_and_plain_lora_layers_is_one_dora_adapter(tmp_path):
    """Plain LoRA layers of a DoRA export carry m = ||W0 + B A||_c (DoRA's identity)."""
    from helpers import make_peft_adapter

    base = tiny_bert()
    d = make_dora_adapter(base, tmp_path / "dora", seed=1, targets=["query"])
    p = make_peft_adapter(base, tmp_path / "plain", seed=2, target_modules=["query", "value"])
    inputs = model_inputs("bert")
    weights = [0.6, 0.4]
    model = molora.compose(copy.deepcopy(base), {"dora": d, "plain": p}, router="static", weights=weights)
    expected = _out(model, inputs, "last_hidden_state")
    model.export_peft(str(tmp_path / "out"), weights)
    keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.encoder.layer.0.attention.self.value.lora_magnitude_vector" in keys
    torch.testing.assert_close(_peft(base, tmp_path / "out", inputs, "last_hidden_state"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_generate_with_task_routed_dora_experts_equals_peft(tmp_path, kw):
    """generate() reads each bank's stack once per call; the rescaling step still follows each
    row's expert. PEFT's reference: row i of the batch generated with adapter task_ids[i] active."""
    base = tiny_gpt2()
    adapters = _adapters(base, tmp_path, ["c_attn", "c_fc"], n=2)
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(3, 101, (3, 5), generator=g), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
    tasks = [1, 0, 1]
    model = molora.compose(copy.deepcopy(base), adapters, router="task").eval()
    with torch.no_grad(), model.routing(task_ids=tasks):
        ours = model.generate(**inputs, **gen)
    refs = []
    for folder in adapters.values():
        with torch.no_grad():
            refs.append(PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval().generate(**inputs, **gen))
    beams = kw.get("num_beams", 1)
    for i, t in enumerate(tasks):
        assert torch.equal(ours.sequences[i], refs[t].sequences[i])
        for a, b in zip(ours.scores, refs[t].scores):
            torch.testing.assert_close(a[i * beams:(i + 1) * beams], b[i * beams:(i + 1) * beams], atol=1e-5, rtol=1e-5)
    assert not torch.equal(refs[0].sequences, refs[1].sequences)
