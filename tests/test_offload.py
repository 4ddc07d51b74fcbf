"""Offloaded and meta-device bases: experts live where each layer computes (accelerate's execution
device) and hold the adapters' weights; a base whose weights were never loaded is refused, never
silently given empty experts; merging into an offloaded or a quantised weight is refused. References:
PEFT on the same base in memory; float references; snapshots."""

from __future__ import annotations

import copy

import pytest
import torch

import molora
from molora import MoLoRAConfig, MoLoRAError, get_molora_model

from helpers import assert_same_snapshot, make_peft_adapter, model_inputs, peft_output, snapshot, tiny_bert

pytest.importorskip("accelerate")
TARGETS = ["query", "value"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    base = tiny_bert()
    base.save_pretrained(tmp / "base")
    ads = {n: make_peft_adapter(base, tmp / n, seed=s, r=4, alpha=8, target_modules=TARGETS) for n, s in (("a", 1), ("b", 2))}
    return tmp, base, ads


def offloaded(tmp):
    from transformers import AutoModel

    # the encoder's weights stay on disk and come in for each forward (accelerate hooks, meta between calls)
    return AutoModel.from_pretrained(tmp / "base", device_map={"embeddings": "cpu", "encoder": "disk", "pooler": "cpu"},
                                     offload_folder=str(tmp / "weights"))


def test_disk_offloaded_base_routes_exactly_and_keeps_the_adapters(folders, tmp_path):
    tmp, base, ads = folders
    off = offloaded(tmp)
    assert off.encoder.layer[0].attention.self.query.weight.is_meta
    model = molora.compose(off, ads, router="task")
    for layer in model.routed_layers().values():
        assert layer.bank.device.type == "cpu" and all(not p.is_meta for p in layer.bank.parameters())
    inputs = model_inputs("bert")
    n = inputs["input_ids"].shape[0]
    tasks = [i % 2 for i in range(n)]
    with torch.no_grad(), model.routing(task_ids=tasks):
        out = model(**inputs).last_hidden_state
    refs = {t: peft_output(base, ads["ab"[t]], inputs) for t in (0, 1)}
    for i, t in enumerate(tasks):
        torch.testing.assert_close(out[i], refs[t][i], atol=1e-6, rtol=1e-6)
    # a checkpoint made on the offloaded model loads onto another offloaded base (and onto one in memory)
    model.save_pretrained(str(tmp_path / "ck"))
    for other in (offloaded(tmp), copy.deepcopy(base)):
        again = molora.MoLoRAModel.from_pretrained(other, str(tmp_path / "ck"))
        with torch.no_grad(), again.routing(task_ids=tasks):
            torch.testing.assert_close(again(**inputs).last_hidden_state, out, atol=1e-6, rtol=1e-6)
    # merging needs a weight to write into: refused, the model unchanged
    def resident_snapshot():  # offloaded weights have no values to compare (meta): their shape and dtype
        snap = snapshot(model)
        snap["state"] = {k: (torch.zeros(v[0].shape, dtype=v[1]), *v[1:]) if v[0].is_meta else v
                         for k, v in snap["state"].items()}
        return snap

    before = resident_snapshot()
    with pytest.raises(MoLoRAError, match="offloaded.*export_peft"):
        model.merge({"a": 0.5, "b": 0.5})
    after = resident_snapshot()
    assert_same_snapshot(before, after)


def test_meta_base_without_weights_is_refused(folders, tmp_path):
    from transformers import BertModel

    tmp, base, ads = folders
    with torch.device("meta"):
        empty = BertModel(base.config)
    types = {n: type(m) for n, m in empty.named_modules()}
    with pytest.raises(MoLoRAError, match=r"module 'encoder\.layer\.0\.attention\.self\.query': its weight is on the meta "
                                          r"device.*adapters' weights would be lost"):
        molora.compose(empty, ads, router="task")
    with pytest.raises(MoLoRAError, match="meta device"):
        get_molora_model(empty, MoLoRAConfig(target_modules=TARGETS, num_experts=2))
    molora.compose(copy.deepcopy(base), ads, router="task").save_pretrained(str(tmp_path / "ck"))
    with pytest.raises(molora.CheckpointError, match="meta device"):
        molora.MoLoRAModel.from_pretrained(empty, str(tmp_path / "ck"))
    assert {n: type(m) for n, m in empty.named_modules()} == types  # nothing was wrapped


def test_kinds_built_from_the_base_weight_are_refused_on_an_offloaded_base(folders, tmp_path):
    """QR-LoRA's Q and DoRA's norms are computed from W0's values, which an offloaded layer does not
    hold between calls: refused by the bank (one check), named for the module, whether the model is
    built from a config or composed from PEFT DoRA adapters; the base is left as it was."""
    tmp, base, ads = folders
    model = offloaded(tmp)
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for kind in ("qr_lora", "dora"):
        with pytest.raises(MoLoRAError, match=rf"module 'encoder\.layer\.0\.attention\.self\.query': expert kind "
                                              rf"'{kind}' is built from the base weight, which is offloaded"):
            get_molora_model(model, MoLoRAConfig(target_modules=TARGETS, num_experts=2, rank=4, expert_kind=kind))
    dora = {n: make_peft_adapter(base, tmp_path / n, seed=s, r=4, alpha=8, target_modules=TARGETS, use_dora=True)
            for n, s in (("d1", 3), ("d2", 4))}
    with pytest.raises(MoLoRAError, match=r"module 'encoder\.layer\.0\.attention\.self\.query': expert kind 'dora' "
                                          r"is built from the base weight, which is offloaded"):
        molora.compose(model, dora, router="task")
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_merge_into_a_quantised_base_is_refused():
    """A quantised linear (a subclass of nn.Linear holding packed integer weights, as bitsandbytes'
    Linear4bit/Linear8bitLt do): routing works through the layer's own call; merging is refused."""
    from torch import nn

    class PackedLinear(nn.Linear):
        def __init__(self, d_in, d_out):
            super().__init__(d_in, d_out, bias=False)
            q = torch.randint(-8, 8, (d_out, d_in), dtype=torch.int8)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.scale = 0.05

        def forward(self, x):
            return x @ (self.weight.float() * self.scale).T

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = PackedLinear(8, 6)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_molora_model(Net(), MoLoRAConfig(target_modules=["proj"], num_experts=2, rank=2, router="task"))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_()
    x = torch.randn(2, 8)
    layer = model.routed_layers()["proj"]
    with torch.no_grad(), model.routing(task_ids=[1, 0]):
        y = model(x)
    A, B = layer.bank.stacked()
    ref = x @ (layer.base_layer.weight.float() * 0.05).T
    ref = ref + torch.stack([float(layer.bank.scaling[e]) * (x[i] @ A[e].T @ B[e].T) for i, e in enumerate([1, 0])])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    before = snapshot(model)
    with pytest.raises(MoLoRAError, match=r"module 'proj': the base weight is torch.int8 \(PackedLinear: a quantised layer\)"):
        model.merge([0.5, 0.5])
    assert_same_snapshot(before, snapshot(model))
