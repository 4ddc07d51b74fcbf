"""MoLoRATrainer: the loss is task loss + aux loss (against hand-written loops), logs carry aux_loss
and expert utilisation, save_strategy checkpoints are molora checkpoints that reload bit-exactly
and resume training to the same weights."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler

import molora
from molora.persistence import WEIGHTS_PATTERN
from molora.integrations import MoLoRATrainer, find_molora_model, load_molora_weights

datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402


def tiny_cls_base():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(cfg)


def tiny_lm_base():
    from helpers import tiny_gpt2

    base = tiny_gpt2()
    base.loss_type = "ForCausalLM"  # lets the Trainer count shifted labels for num_items_in_batch
    return base


def routed(base, targets, seed=1):
    torch.manual_seed(seed)
    config = molora.MoLoRAConfig(target_modules=targets, num_experts=4, rank=2, alpha=4, router="topk", top_k=2,
                                 aux_loss_coef=0.5, z_loss_coef=0.01)
    model = molora.get_molora_model(base, config)
    with torch.no_grad():  # non-zero B so that every parameter moves from the first step
        for layer in model.routed_layers().values():
            for b in layer.bank.B:
                b.normal_(0, 0.1)
    return model


def cls_data(n=16, seq=6):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 101, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, -2:] = 0
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
        "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
        "text": [f"example {i}" for i in range(n)],  # a column the model does not take: must be dropped
    })


def lm_data(n=16, seq=6):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 101, (n, seq), generator=g)
    labels = ids.clone()
    labels[::2, :3] = -100  # different numbers of target tokens per micro-batch
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


class SequentialTrainer(MoLoRATrainer):
    """Batches in dataset order, so that a hand-written loop can see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True,
                logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def batch_of(ds, rows):
    return {k: torch.tensor(ds[rows][k]) for k in ("input_ids", "attention_mask", "labels") if k in ds.column_names}


def test_compute_loss_is_task_loss_plus_aux(tmp_path):
    model = routed(tiny_cls_base(), ["query", "value"])
    ds = cls_data()
    trainer = MoLoRATrainer(model=model, args=args(tmp_path), train_dataset=ds)
    batch = batch_of(ds, slice(0, 4))
    model.train()
    got = trainer.compute_loss(model, dict(batch))
    out = model(**batch)
    logits = out.logits
    aux = model.aux_loss()
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"]) + aux
    assert aux.item() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP and accelerate wrap it
    assert find_molora_model(wrapper) is model
    with pytest.raises(ValueError, match="MoLoRAModel"):
        MoLoRATrainer(model=tiny_cls_base(), args=args(tmp_path), train_dataset=ds)


def manual_lm_training(model, ds, *, steps, micro, accum, lr):
    """SGD on  sum_tokens CE / tokens in the accumulated batch  +  mean over micro-batches of aux."""
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr)
    model.train()
    row = 0
    for _ in range(steps):
        mbs = [batch_of(ds, slice(row + i * micro, row + (i + 1) * micro)) for i in range(accum)]
        row += micro * accum
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mbs)
        for b in mbs:
            logits = model(input_ids=b["input_ids"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            (ce / n_tokens + model.aux_loss() / accum).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("accum", [2])
def test_training_equals_a_hand_written_loop(tmp_path, accum):
    """GPT-2 normalises its loss by num_items_in_batch: the aux term must still count once per step."""
    ds = lm_data()
    expected = routed(tiny_lm_base(), ["c_attn", "c_fc"])
    manual_lm_training(expected, ds, steps=2, micro=4, accum=accum, lr=0.1)

    model = routed(tiny_lm_base(), ["c_attn", "c_fc"])
    initial = copy.deepcopy(model.adapter_state_dict())
    trainer = SequentialTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=accum, max_steps=2), train_dataset=ds)
    trainer.train()
    got = model.adapter_state_dict()
    assert any(not torch.equal(initial[k], got[k]) for k in got)
    for k, v in expected.adapter_state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_logs_checkpoints_and_resume(tmp_path):
    ds = cls_data()
    model = routed(tiny_cls_base(), ["query", "value"])
    trainer = MoLoRATrainer(model=model, args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                            train_dataset=ds, routing_log="expert")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        assert math.isfinite(h["aux_loss"]) and h["aux_loss"] > 0
        assert h["loss"] >= h["aux_loss"] * 0.5  # the logged loss includes aux (CE >= 0)
        for name in model.routed_layers():
            util = [h[f"routing/{name}/expert_{e}"] for e in range(4)]
            assert sum(util) == pytest.approx(2.0, abs=1e-3)  # top-2: each token picks two experts
        assert h["routing/mean_load_cv"] >= 0

    out = Path(tmp_path / "out")
    for step in (2, 4):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"molora_config.json", "optimizer.pt", "trainer_state.json"} <= files
        assert len([f for f in files if WEIGHTS_PATTERN.fullmatch(f)]) == 1  # the weights the config names
        assert not files & {"model.safetensors", "pytorch_model.bin"}, "the frozen base must not be saved"
    restored = molora.MoLoRAModel.from_pretrained(tiny_cls_base(), out / "checkpoint-4")
    trained = model.adapter_state_dict()
    assert restored.adapter_state_dict().keys() == trained.keys()
    for k, v in restored.adapter_state_dict().items():
        assert torch.equal(v, trained[k]), k

    # Resuming from step 2 with a fresh model reaches the same weights as the uninterrupted run.
    fresh = routed(tiny_cls_base(), ["query", "value"], seed=7)  # different init: the checkpoint must overwrite it
    resumed = MoLoRATrainer(model=fresh, args=args(tmp_path, output_dir=str(tmp_path / "out2"), max_steps=4,
                                                   save_strategy="steps", save_steps=2), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    for k, v in fresh.adapter_state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=1e-6, atol=1e-7, msg=k)

    with pytest.raises(ValueError, match="no molora checkpoint"):
        resumed._load_from_checkpoint(str(tmp_path))
    other = routed(tiny_cls_base(), ["query"])
    with pytest.raises(molora.CheckpointError):
        load_molora_weights(other, out / "checkpoint-4")


def test_routing_log_levels(tmp_path):
    ds = cls_data()
    with pytest.raises(ValueError, match="routing_log"):
        MoLoRATrainer(model=routed(tiny_cls_base(), ["query"]), args=args(tmp_path), train_dataset=ds, routing_log="all")
    model = routed(tiny_cls_base(), ["query"])
    trainer = MoLoRATrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=ds, routing_log="layer")
    trainer.train()
    log = trainer.state.log_history[0]
    assert {f"routing/{n}/load_cv" for n in model.routed_layers()} <= set(log)
    assert not any(k.endswith("expert_0") for k in log)
    # the default: a summary of a few keys, the same numbers as the per-layer log of the same run
    model = routed(tiny_cls_base(), ["query"])
    summary = MoLoRATrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=ds)
    summary.train()
    short = summary.state.log_history[0]
    per_layer = [log[f"routing/{n}/load_cv"] for n in model.routed_layers()]
    assert not any(k.startswith("routing/") and k.count("/") > 1 for k in short)
    assert short["routing/max_load_cv"] == round(max(per_layer), 4)
    assert short["routing/mean_load_cv"] == log["routing/mean_load_cv"]
    assert 0.0 <= short["routing/min_expert_share"] <= 1.0
    expert = MoLoRATrainer(model=routed(tiny_cls_base(), ["query"]), args=args(tmp_path, max_steps=1), train_dataset=ds,
                           routing_log="expert")
    expert.train()
    full = expert.state.log_history[0]
    fracs = {n: [v for k, v in full.items() if k.startswith(f"routing/{n}/")] for n in model.routed_layers()}
    want = min(min(f) / sum(f) * len(f) for f in fracs.values())
    assert abs(short["routing/min_expert_share"] - want) < 1e-3
