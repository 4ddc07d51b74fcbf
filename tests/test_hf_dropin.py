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


# ---------------------------------------------------------------------- 3. a plain transformers.Trainer
def tiny_cls_base():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(cfg)


EXPERT_TYPES = [0, 0, 1, 1]


def routed_classifier():
    cfg = MoLoRAConfig(target_modules=["query", "value"], num_experts=4, rank=2, alpha=4, router="soft",
                       aux_loss_coef=0.5, localized_loss_coef=0.3, expert_types=EXPERT_TYPES, modules_to_save=["classifier"])
    model = get_molora_model(tiny_cls_base(), cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B and router weights: experts and routing differ from the start
        for layer in model.routed_layers().values():
            for b in layer.bank.B:
                b.normal_(0, 0.1)
            for w in layer.router.parameters():
                w.normal_(0, 0.5)
    return model


def cls_rows(n=8, seq=6):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, -2:] = 0
    return {"input_ids": torch.randint(1, 101, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g), "task_ids": torch.tensor([0, 1] * (n // 2))}


def reference_loss(model, rows):
    """CE of the base forward + 0.5 * Switch/GShard + 0.3 * LoRAMoE localized loss, from the
    routers' recorded logits, computed here with the loss functions (not by the model's forward)."""
    from molora.routers.losses import load_balancing_loss, localized_balancing_loss

    with torch.no_grad(), model.routing(task_ids=rows["task_ids"]):
        logits = model.base_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        router_logits = [r.decision.logits for r in model.last_routing().values()]
    ce = torch.nn.functional.cross_entropy(logits, rows["labels"])
    mask = rows["attention_mask"]
    aux = 0.5 * load_balancing_loss(router_logits, 1, mask) \
        + 0.3 * localized_balancing_loss(router_logits, rows["task_ids"], EXPERT_TYPES, 0.1, mask)
    return ce, aux


def test_forward_takes_routing_keywords_and_returns_the_aux_loss():
    """``model(..., task_ids=...)`` routes as ``with model.routing(task_ids=...)``; with labels,
    ``output.loss = CE + aux`` and ``output.aux_loss = aux``; without labels nothing is added."""
    model = routed_classifier().train()
    rows = cls_rows()
    ce, aux = reference_loss(model, rows)
    assert aux.item() > 0.05
    out = model(**rows)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ce + aux, rtol=1e-5, atol=1e-6)
    half = model(**rows, aux_loss_weight=0.5)
    torch.testing.assert_close(half.loss, ce + 0.5 * aux, rtol=1e-5, atol=1e-6)
    other = model(**{**rows, "task_ids": 1 - rows["task_ids"]})
    assert not torch.allclose(other.aux_loss, out.aux_loss), "task_ids must reach the localized loss"
    free = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], task_ids=rows["task_ids"])
    assert free.loss is None and "aux_loss" not in free
    with pytest.raises(molora.MoLoRAError, match="modules_to_save"):
        get_molora_model(tiny_cls_base(), MoLoRAConfig(target_modules=["query"], modules_to_save=["nohead"]))


def test_plain_trainer_trains_and_saves_the_head(tmp_path):
    """A plain transformers.Trainer (no molora subclass): the dataset's task_ids column reaches the
    routers, the logged loss is CE + aux computed independently, label names come from the base,
    and the trained head (modules_to_save) is saved with the checkpoint and reloads equal."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = routed_classifier()
    rows = cls_rows()
    ce, aux = reference_loss(copy.deepcopy(model).train(), rows)
    head_before = model.base_model.classifier.weight.detach().clone()
    ds = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in rows.items()},
                                     "text": [f"example {i}" for i in range(len(rows["labels"]))]})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3,
                             learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                             report_to=[], use_cpu=True, logging_steps=1, save_strategy="steps", save_steps=3,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, data_collator=default_data_collator)
    assert trainer.label_names == ["labels"]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3
    # one batch holds the whole data set, so the first step's loss does not depend on the order
    assert losses[0] == pytest.approx(float(ce + aux), abs=2e-4)
    assert abs(losses[0] - float(ce)) > 0.05, "the aux term must be in the logged loss"
    assert "eval_loss" in trainer.evaluate()

    head = model.base_model.classifier.weight.detach().clone()
    assert not torch.allclose(head, head_before), "the head must train"
    saved = load_file(str(tmp_path / "out" / "checkpoint-3" / "model.safetensors"))
    assert torch.equal(saved["base_model.classifier.weight"], head)
    model.save_pretrained(tmp_path / "molora")
    loaded = molora.MoLoRAModel.from_pretrained(tiny_cls_base(), tmp_path / "molora").eval()
    assert torch.equal(loaded.base_model.classifier.weight, head)
    assert loaded.base_model.classifier.weight.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**rows).logits, model(**rows).logits, rtol=0, atol=0)


def test_plain_trainer_resumes_from_its_checkpoint_exactly(tmp_path):
    """Stopped after step 2 and resumed by a plain Trainer into a fresh model (other experts, other
    head), training reaches the uninterrupted run's experts, routers and head."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments, default_data_collator

    rows = cls_rows(16)
    ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in rows.items()})

    def run(model, out, **kw):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=0.05,
                                 optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True,
                                 save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0,
                                 dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator).train(**kw)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    whole = run(routed_classifier(), tmp_path / "a")
    fresh = routed_classifier()
    with torch.no_grad():  # a different start everywhere the checkpoint must restore
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    resumed = run(fresh, tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.keys() == whole.keys()
    for k, v in whole.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(whole["base_model.classifier.weight"], routed_classifier().base_model.classifier.weight)
