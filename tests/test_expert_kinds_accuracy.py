"""benchmarks/expert_kinds.py, accuracy and UNet modes: the kinds' optimizers leave frozen experts
alone (what makes a 4-expert bank hold four independently trained experts), the block-wise UNet's
ranks, and the table writer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import expert_kinds as ek  # noqa: E402
from molora import MoLoRAConfig, get_molora_model  # noqa: E402


@pytest.mark.parametrize("variant", list(ek.VARIANTS))
def test_kind_optimizer_moves_the_trained_expert_only(variant):
    kind, _ = ek.VARIANTS[variant]
    torch.manual_seed(0)
    model = get_molora_model(ek.Stack(8, 2), MoLoRAConfig(target_modules=r"layers\.\d+", num_experts=2, rank=2, alpha=4.0,
                                                          router="soft", expert_kind=ek.expert_kind(kind, 2),
                                                          expert_names=["a", "b"]))
    banks = [layer.bank for layer in model.routed_layers().values()]
    ek.randomize_experts_(ek.kind_banks(banks))
    b_before = [p.detach().clone() for bank in banks for p in bank.expert_parameters(1)]
    model.set_experts_trainable(False)
    model.set_experts_trainable(True, ["a"])
    before = {k: v.clone() for k, v in model.state_dict().items() if ".bank." in k}
    opts = ek.kind_optimizers(model, variant, lr=1e-2, riemann_lr=1e-1)
    x = torch.randn(16, 8)
    for _ in range(2):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        (model(x) - 1.0).square().mean().backward()  # both experts carry the output (soft router)
        for opt in opts:
            opt.step()
    after = model.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert moved, "expert 'a' did not train"
    assert all(k.endswith(".0") for k in moved), sorted(moved)  # expert index 0 = 'a'; 'b' and shared tensors kept
    # (in a mixed bank 'b' is index 0 of its own kind's part: compare its tensors directly)
    b_after = [p.detach() for bank in banks for p in bank.expert_parameters(1)]
    assert all(torch.equal(u, v) for u, v in zip(b_before, b_after))


def test_blockwise_unet_redistributes_lora_rank():
    pytest.importorskip("diffusers")
    r = 4
    lora, block = ek.unet_model("lora", r, 1000), ek.unet_model("blockwise", r, 1000)
    ranks = {name: layer.bank.ranks[0] for name, layer in block.routed_layers().items()}
    assert {v for k, v in ranks.items() if k.startswith("down_blocks")} == {2 * r}
    assert {v for k, v in ranks.items() if k.startswith("up_blocks")} == {r // 2}
    assert {v for k, v in ranks.items() if k.startswith("mid_block")} == {r}
    # one attention block down (2r) against two up (r/2 each) at the same width: LoRA's budget
    count = lambda m: sum(p.numel() for p in m.trainable_parameters())  # noqa: E731
    assert count(block) == count(lora)


def test_format_accuracy_table_in_points():
    result = {
        "accuracy": {"config": {"tasks": ["t1", "t2"]}, "untrained": {"t1": 0.25, "t2": 0.5},
                     "rows": [{"kind": "lora", "single": 0.5, "task_routed": 0.5, "soft_routed": 0.25, "seconds": 3.0},
                              {"kind": "dora", "single": 0.875, "task_routed": 0.875, "soft_routed": 0.625, "seconds": 4.0}]},
        "unet": {"config": {"steps": 5},
                 "rows": [{"variant": "lora", "trainable": 1234, "first_loss": 1.5, "final_loss": 1.25, "mean_last5": 1.3}]},
    }
    lines = ek.format_accuracy(result).splitlines()
    assert lines[0] == "mean accuracy over t1, t2 (points)"
    assert lines[2].split() == ["(untrained)", "37.5", "37.5", "37.5", "-"]
    assert lines[3].split() == ["lora", "50.0", "50.0", "25.0", "3"]
    assert lines[4].split() == ["dora", "87.5", "87.5", "62.5", "4"]
    assert lines[5].startswith("tiny UNet, 5 steps")
    assert lines[7].split() == ["lora", "1,234", "1.5000", "1.2500", "1.3000"]
