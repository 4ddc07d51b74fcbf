"""Activation checkpointing: the recomputation during backward routes as the forward did, whether
backward runs inside or after the routing block (reference: the same model without checkpointing)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from molora import MoLoRAConfig, get_molora_model

from helpers import tiny_llama



def routed(base, router: str):
    extra = {"granularity": "sequence"} if router == "soft" else {}
    model = get_molora_model(base, MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, rank=4, router=router,
                                                router_kwargs=extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


IDS = torch.randint(1, 101, (3, 7), generator=torch.Generator().manual_seed(2))
MASK = torch.ones_like(IDS)
MASK[0, :3] = 0  # a padded row: sequence routers pool only its real tokens


def grads(model, router: str, *, after_block: bool):
    signals = {"task_ids": [0, 2, 1]} if router == "task" else {}
    with model.routing(**signals):
        loss = model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
        if not after_block:
            loss.backward()
    if after_block:
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("router", ["task", "soft"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("after_block", [True, False], ids=["backward-after-block", "backward-inside"])
def test_checkpointed_gradients_equal_plain(router, reentrant, after_block):
    base = tiny_llama()
    ref = grads(routed(copy.deepcopy(base), router), router, after_block=False)
    model = routed(copy.deepcopy(base), router)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        got = grads(model, router, after_block=after_block)
    assert got.keys() == ref.keys() and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_checkpointing_enabled_on_the_base_before_wrapping():
    base = tiny_llama()
    ref = grads(routed(copy.deepcopy(base), "task"), "task", after_block=False)
    pre = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        got = grads(routed(pre, "task"), "task", after_block=True)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
