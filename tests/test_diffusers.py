"""diffusers: timestep-gated LoRA experts in a tiny UNet2DConditionModel (built from a config, no
download), routed by the scheduler's timesteps; one training step; decisions as the schedule says."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import molora

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import diffusers_timestep as ex  # noqa: E402

T = 1000
INTERVALS = (1, 2, 4)
# Boundaries: interval i of n covers ((i-1) T/n, i T/n]; t = 0 joins the first one.
TIMESTEPS = [0, 250, 251, 999]


def hand_interval(t: int, n: int) -> int:
    """0-based TimeStep Master interval, integer arithmetic: max(1, ceil(t n / T)) - 1."""
    return max(1, -(-t * n // T)) - 1


def test_one_training_step_routes_by_the_scheduler_timestep():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=T)
    model = ex.make_model(ex.build_unet(), INTERVALS, T)
    layers = model.routed_layers()
    assert len(layers) == 32 and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for name in layers)
    before = {name: torch.stack(list(layer.bank.B)).clone() for name, layer in layers.items()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, 16, generator=g)
    loss, t = ex.train_step(model, scheduler, opt, latents, text, generator=g, timesteps=torch.tensor(TIMESTEPS))
    assert math.isfinite(loss)

    offsets = [sum(INTERVALS[:k]) for k in range(len(INTERVALS))]
    expected = torch.tensor([[off + hand_interval(ti, n) for off, n in zip(offsets, INTERVALS)] for ti in TIMESTEPS])
    assert expected.tolist() == [[0, 1, 3], [0, 1, 3], [0, 1, 4], [0, 2, 6]]
    for name, layer in layers.items():
        d = model.last_routing()[name].decision
        assert d.per_example and torch.equal(d.indices, expected), name
        assert torch.equal(d.gates[:, 0], torch.ones(4)), "the core expert is ungated"
        torch.testing.assert_close(d.gates[:, 1:], torch.full((4, 2), 0.5))  # zero-init context router: uniform

    # B starts at 0, so the step moves exactly the B of the experts some example was routed to.
    used = set(expected.flatten().tolist())
    assert used == {0, 1, 2, 3, 4, 6}  # interval (500, 750] of the quarters (expert 5) saw no example
    for name, layer in layers.items():
        after = torch.stack(list(layer.bank.B))
        for e in range(model.num_experts):
            moved = not torch.equal(after[e], before[name][e])
            assert moved == (e in used), (name, model.expert_names[e])


def test_tlora_rank_schedule_in_the_unet():
    """T-LoRA: rank-1 experts with gates [j < r(t)], r(t) = floor(((T - t)/T)^a (r_max - r_min)) + r_min."""
    r_max, r_min, a = 4, 1, 2.0
    config = molora.MoLoRAConfig(target_modules=["to_q", "to_v"], num_experts=r_max, rank=1, alpha=1.0, router="tlora",
                                 router_kwargs={"num_timesteps": T, "min_rank": r_min, "exponent": a})
    model = molora.get_molora_model(ex.build_unet(), config)
    t = torch.tensor([0, 300, 500, 999])
    with torch.no_grad(), model.routing(timesteps=t):
        model(torch.randn(4, 4, 8, 8), t, encoder_hidden_states=torch.randn(4, 5, 16))
    ranks = [math.floor(((T - ti) / T) ** a * (r_max - r_min)) + r_min for ti in t.tolist()]
    assert ranks == [4, 2, 1, 1]
    expected = torch.tensor([[1.0 if j < r else 0.0 for j in range(r_max)] for r in ranks])
    for record in model.last_routing().values():
        assert torch.equal(record.decision.gates, expected)

