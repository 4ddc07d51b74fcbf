"""Train routed LoRA experts with the Hugging Face Trainer (molora.integrations.MoLoRATrainer).

    python examples/hf_trainer.py --max-steps 20                  # tiny random GPT-2, generated data, CPU
    python examples/hf_trainer.py --model gpt2 --max-steps 200    # a real causal LM (downloads unless cached)

Top-2 routing over 4 experts in the attention and MLP input projections, with the Switch/GShard
balancing loss in the training loss; the logs show ``aux_loss`` and the share of tokens each
expert of each layer receives; every ``--save-steps`` a molora checkpoint (experts and routers
only) is written to ``--out/checkpoint-N``, and ``--resume`` continues from the last one.
"""

from __future__ import annotations

import argparse

import torch

import molora
from molora.integrations import MoLoRATrainer


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    base.loss_type = "ForCausalLM"
    return base


def token_dataset(n: int = 64, seq: int = 16, vocab: int = 101, seed: int = 0):
    """Sequences with a learnable pattern (each token = previous + 1 mod vocab, random start)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(seq)) % vocab
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face causal LM (default: a tiny random GPT-2)")
    parser.add_argument("--out", default="molora-trainer-out")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    args = parser.parse_args(argv)

    base = AutoModelForCausalLM.from_pretrained(args.model) if args.model else tiny_gpt2()
    config = molora.MoLoRAConfig(target_modules=["c_attn", "c_fc"], num_experts=4, rank=4, alpha=8,
                                 router="topk", top_k=2, aux_loss_coef=0.01)
    model = molora.get_molora_model(base, config)
    model.print_trainable_parameters()
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=max(1, args.max_steps // 4), save_strategy="steps", save_steps=args.save_steps,
        report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
    )
    trainer = MoLoRATrainer(model=model, args=training_args, train_dataset=token_dataset(), routing_log="layer")
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(args.out)  # molora_config.json + molora_model.safetensors
    logs = [h for h in trainer.state.log_history if "aux_loss" in h]
    for h in logs:
        print(f"step {h['step']}: loss {h['loss']:.4f}  aux_loss {h['aux_loss']:.4f}  mean load CV {h['routing/mean_load_cv']:.3f}")
    return {"logs": logs}


if __name__ == "__main__":
    main()
