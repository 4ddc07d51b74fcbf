"""molora as a drop-in for Hugging Face users: routed layers look like the layers they wrap,
``model.config`` is the base model's config, and a plain ``transformers.Trainer`` trains a
routed model (routing signals as forward keywords, the aux loss in the model output, heads
saved with the checkpoint)."""

from __future__ import annotations

import copy

import pytest
import torch

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.layer import RoutedLoRALinear

from helpers import make_peft_adapter

T5_TARGETS = ["q", "v", "wo"]


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def _t5_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(2, 64, (2, 4), generator=g)}


# ---------------------------------------------------------------------- 1. routed layers' face
def test_routed_layer_reads_through_to_the_base(gpt2):
    """weight / bias / in_features / out_features are the wrapped layer's own (Conv1D: its layout and nf/nx)."""
    model = get_molora_model(gpt2, MoLoRAConfig(target_modules=["c_attn"], num_experts=2, rank=2))
    layer = model.base_model.transformer.h[0].attn.c_attn
    assert isinstance(layer, RoutedLoRALinear)
    base = layer.base_layer
    assert layer.weight is base.weight and layer.bias is base.bias
    assert tuple(layer.weight.shape) == (32, 96)  # Conv1D stores [d_in, d_out]
    assert (layer.in_features, layer.out_features, layer.nf, layer.nx) == (32, 96, 96, 32)
    lin = torch.nn.Sequential()
    lin.add_module("proj", torch.nn.Linear(5, 3, bias=False))
    routed = get_molora_model(lin, MoLoRAConfig(target_modules=["proj"], num_experts=2, rank=2)).base_model.proj
    assert routed.weight is routed.base_layer.weight and routed.bias is None
    assert (routed.in_features, routed.out_features) == (5, 3)
    with pytest.raises(AttributeError, match="nf"):
        routed.nf
    # read-through, not registered: the parameters are listed once, under base_layer
    assert "weight" not in dict(routed.named_parameters(recurse=False))


def test_t5_with_wo_equals_peft_forward_and_generate(tmp_path):
    """T5 reads ``self.wo.weight.dtype`` in its feed-forward: with ``wo`` routed, task routing to a
    PEFT LoRA adapter (q, v, wo) gives PEFT's logits and PEFT's generations."""
    from peft import PeftModel

    base = tiny_t5()
    d = make_peft_adapter(base, tmp_path / "t5", seed=4, r=4, alpha=8, target_modules=T5_TARGETS)
    inputs = _t5_inputs()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()
    with torch.no_grad():
        want = pm(**inputs).logits
        want_gen = pm.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               max_new_tokens=5, do_sample=False)
        base_out = base(**inputs).logits

    model = molora.compose(copy.deepcopy(base), {"t5": d}, router="task").eval()
    assert isinstance(model.base_model.encoder.block[0].layer[1].DenseReluDense.wo, RoutedLoRALinear)
    with torch.no_grad(), model.routing(task_ids=[0, 0]):
        got = model(**inputs).logits
        got_gen = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base_out, atol=1e-3), "the adapter must change the output"
    assert torch.equal(got_gen, want_gen)


# ---------------------------------------------------------------------- 2. model.config
def test_config_is_the_base_models(gpt2, tmp_path):
    """``model.config`` is the base config (as for PEFT's PeftModel): ``use_cache = False`` acts on
    the base's forward, ``vocab_size`` reads; MoLoRA's config is ``molora_config`` and round-trips."""
    base_config = gpt2.config
    cfg = MoLoRAConfig(target_modules=["c_attn"], num_experts=2, rank=2, router="topk", top_k=1)
    model = get_molora_model(gpt2, cfg)
    assert model.config is base_config and model.molora_config is cfg
    assert model.config.vocab_size == 101
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(input_ids=ids).past_key_values is not None
        model.config.use_cache = False
        assert base_config.use_cache is False
        assert model(input_ids=ids).past_key_values is None  # the base model read it
    model.save_pretrained(tmp_path / "ckpt")
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(model.unload()), tmp_path / "ckpt")
    assert loaded.molora_config.to_dict() == cfg.to_dict()
    assert loaded.config.vocab_size == 101 and not isinstance(loaded.config, MoLoRAConfig)
