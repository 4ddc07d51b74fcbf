"""Every router inside a real (tiny) transformers model: forward, backward, checkpoint round trip,
and T-LoRA's rank mask against a direct masked computation."""

from __future__ import annotations

import pytest
import torch

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model

from helpers import model_inputs, tiny_bert

E, D, CTX = 4, 32, 6  # experts, tiny BERT hidden size, width of the caller's context embeddings


def _embeddings(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, CTX, generator=torch.Generator().manual_seed(5))


# name -> (config kwargs, routing signals, setup(model) run once before the first forward)
CASES = {
    "soft": ({}, {}, None),
    "soft-sequence": ({"router": "soft", "router_kwargs": {"granularity": "sequence"}}, {}, None),
    "soft-context": ({"router": "soft", "router_kwargs": {"granularity": "context", "context_dim": CTX}},
                     {"embeddings": _embeddings()}, None),
    "topk": ({"top_k": 2, "router_kwargs": {"noise_std": 0.1, "jitter": 0.01}}, {}, None),
    "topp": ({"router_kwargs": {"top_p": 0.5}}, {}, None),
    "switch": ({"router_kwargs": {"capacity_factor": 1.0}}, {}, None),
    "task": ({}, {"task_ids": [0, 3, 1]}, None),
    "static": ({}, {}, None),
    "retrieval": ({"router_kwargs": {"key_dim": CTX, "top_k": 2, "temperature": 0.5}}, {"embeddings": _embeddings()},
                  lambda m: m.shared_router.set_keys(torch.randn(E, CTX, generator=torch.Generator().manual_seed(2)))),
    "retrieval-hidden": ({"router": "retrieval", "router_kwargs": {"source": "hidden", "top_k": 1}}, {},
                         lambda m: m.shared_router.set_keys(torch.randn(E, D, generator=torch.Generator().manual_seed(2)))),
    "timestep": ({"router_kwargs": {"intervals": [1, 3], "num_timesteps": 100}}, {"timesteps": [0, 50, 99]}, None),
    "tlora": ({"rank": 1, "router_kwargs": {"num_timesteps": 100, "min_rank": 1}}, {"timesteps": [0, 50, 99]}, None),
    "cluster": ({"router_kwargs": {"key_dim": CTX, "universal_expert": 3}}, {"embeddings": _embeddings()},
                lambda m: m.shared_router.fit(torch.randn(30, CTX, generator=torch.Generator().manual_seed(3)))),
}


def _build(case: str) -> tuple[MoLoRAModel, dict]:
    kwargs, signals, setup = CASES[case]
    kwargs = {"router": case, "rank": 2, **kwargs}
    model = get_molora_model(tiny_bert(), MoLoRAConfig(target_modules=["query", "value"], num_experts=E,
                                                       aux_loss_coef=0.01, **kwargs))
    if setup is not None:
        setup(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero B so that every expert changes the output
        for name, p in model.named_parameters():
            if ".B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, signals


@pytest.mark.parametrize("case", sorted(CASES))
def test_router_end_to_end(case, tmp_path):
    model, signals = _build(case)
    inputs = model_inputs("bert")
    model.train()
    with model.routing(**signals):
        out = model(**inputs).last_hidden_state
    loss = out.pow(2).mean() + model.aux_loss()
    loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        base = model.base_model  # adapters change the output
        with model.disable_adapters():
            plain = base(**inputs).last_hidden_state
    assert not torch.allclose(out.detach(), plain)

    model.eval()
    with torch.no_grad(), model.routing(**signals):
        ref = model(**inputs).last_hidden_state
    model.save_pretrained(str(tmp_path))
    loaded = MoLoRAModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    with torch.no_grad(), loaded.routing(**signals):
        again = loaded(**inputs).last_hidden_state
    assert torch.equal(ref, again)
    stats = loaded.routing_stats()
    assert set(stats["layers"]) == set(loaded.routed_layers())


def test_tlora_equals_direct_rank_mask():
    """T-LoRA (rank r_max, mask j < r(t)) == r_max rank-1 experts gated by the TLoRA router."""
    r_max, T, alpha = 6, 100, 12.0
    cfg = MoLoRAConfig(target_modules=["query"], num_experts=r_max, rank=1, alpha=alpha / r_max, router="tlora",
                       router_kwargs={"num_timesteps": T, "min_rank": 2, "exponent": 0.5})
    model = get_molora_model(tiny_bert(), cfg).eval()
    layer = model.routed_layers()["encoder.layer.0.attention.self.query"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in layer.bank.B:
            b.copy_(torch.randn(b.shape, generator=g))
    A = torch.cat(list(layer.bank.A))  # [r_max, d_in]: row j = rank component j
    B = torch.cat(list(layer.bank.B), dim=1)  # [d_out, r_max]
    x = torch.randn(3, 5, D, generator=g)
    t = torch.tensor([0, 40, 99])
    # direct T-LoRA: r(t) = floor(((T - t) / T)^0.5 * (6 - 2)) + 2 = (6, 5, 2)
    r = torch.floor(((T - t.double()) / T) ** 0.5 * (r_max - 2)).long() + 2
    assert r.tolist() == [6, 5, 2]
    mask = (torch.arange(r_max) < r.unsqueeze(1)).float()  # [batch, r_max]
    direct = layer.base_layer(x) + (alpha / r_max) * ((x @ A.T) * mask.unsqueeze(1)) @ B.T
    with torch.no_grad(), model.routing(timesteps=t):
        routed = layer(x)
    assert torch.allclose(routed, direct, atol=1e-5)
