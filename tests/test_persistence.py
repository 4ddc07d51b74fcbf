"""Checkpoints: bit-exact round trips, atomic writes, clear errors, nothing half-applied."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import molora
from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.errors import CheckpointError
from molora.persistence import CONFIG_NAME, WEIGHTS_NAME

from helpers import model_inputs


def _trained(bert, **cfg):
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query", "value"], num_experts=3, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("cfg", [dict(router="topk", top_k=2), dict(router="task", shared_a=True, rank=3)])
def test_round_trip_is_bit_exact(bert, tmp_path, cfg):
    model = _trained(bert, **cfg)
    model.set_experts_trainable(False, ["expert_1"])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MoLoRAModel.from_pretrained(copy.deepcopy(bert), tmp_path / "ckpt")
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in loaded.parameters()]
    inputs = model_inputs("bert")
    with torch.no_grad(), molora.routing(task_ids=[2, 0, 1]):
        assert torch.equal(model(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state)


def test_checkpoint_has_no_pickle(bert, tmp_path):
    _trained(bert).save_pretrained(tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == [CONFIG_NAME, WEIGHTS_NAME]
    json.loads((tmp_path / "c" / CONFIG_NAME).read_text())


def test_truncated_weights_raise_clear_error(bert, tmp_path):
    _trained(bert).save_pretrained(tmp_path / "c")
    f = tmp_path / "c" / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "c")


def test_corrupt_config_and_missing_folder(bert, tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "nothing")
    _trained(bert).save_pretrained(tmp_path / "c")
    cfg = tmp_path / "c" / CONFIG_NAME
    cfg.write_text(cfg.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "c")


def test_crash_mid_save_never_loads_half_written(bert, tmp_path, monkeypatch):
    old = _trained(bert)
    old.save_pretrained(tmp_path / "c")
    new = _trained(bert)
    with torch.no_grad():
        for p in new.trainable_parameters():
            p.add_(1.0)
    real_replace = os.replace
    calls = []

    def crash_on(n):
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == n:
                raise OSError("simulated crash")
            return real_replace(src, dst)
        return replace

    # Crash before the weights land: the old checkpoint is intact.
    monkeypatch.setattr(os, "replace", crash_on(1))
    with pytest.raises(OSError):
        new.save_pretrained(tmp_path / "c")
    monkeypatch.setattr(os, "replace", real_replace)
    loaded = MoLoRAModel.from_pretrained(copy.deepcopy(bert), tmp_path / "c")
    assert all(torch.equal(loaded.adapter_state_dict()[k], v) for k, v in old.adapter_state_dict().items())
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "c"))
    # Crash between the weights and the config: the mismatch is detected, not loaded.
    calls.clear()
    monkeypatch.setattr(os, "replace", crash_on(2))
    with pytest.raises(OSError):
        new.save_pretrained(tmp_path / "c")
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MoLoRAModel.from_pretrained(copy.deepcopy(bert), tmp_path / "c")


def test_loading_into_another_base_changes_nothing(bert, gpt2, tmp_path):
    from transformers import BertConfig, BertModel

    _trained(bert).save_pretrained(tmp_path / "c")
    wider = BertModel(BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
    names = [n for n, _ in wider.named_modules()]
    with pytest.raises(CheckpointError, match=r"query.*\[32 x 32\].*\[48 x 48\]"):
        MoLoRAModel.from_pretrained(wider, tmp_path / "c")
    assert [n for n, _ in wider.named_modules()] == names
    with pytest.raises(CheckpointError, match="has no module"):
        MoLoRAModel.from_pretrained(gpt2, tmp_path / "c")


def test_nan_in_checkpoint_is_rejected(bert, tmp_path):
    model = _trained(bert)
    with torch.no_grad():
        next(iter(model.trainable_parameters()))[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "c")
