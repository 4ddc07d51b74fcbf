"""Timestep-gated LoRA experts in a diffusers UNet (TimeStep Master routing), trained a few steps.

    python examples/diffusers_timestep.py --steps 3            # tiny UNet built from a config, CPU, seconds

The UNet's attention projections (to_q, to_k, to_v, to_out.0) get interval experts at the
granularities ``--intervals`` (default 1 2 4: one ungated core expert for all t, two experts for
the halves of [0, T), four for the quarters). Every forward runs inside
``model.routing(timesteps=t)`` with the timesteps the scheduler noised the batch with, so each
example uses the experts of its own timestep intervals (``i_g(t) = max(1, ceil(t n_g / T))``,
see :mod:`molora.routers.timestep`). Nothing is downloaded: the UNet is built from a small config
with random weights (use ``UNet2DConditionModel.from_pretrained(...)`` for a real one).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import molora


def build_unet(seed: int = 0):
    """A tiny random ``UNet2DConditionModel`` (8x8 latents, 4 channels, 16-dim text embeddings)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )


def make_model(unet: nn.Module, intervals: tuple[int, ...] = (1, 2, 4), num_timesteps: int = 1000,
               rank: int = 4) -> molora.MoLoRAModel:
    """Wrap the UNet's attention projections with TimeStep Master interval experts, named
    ``t<n>_<i>`` (interval i of n; ``t1_0`` is the ungated core expert)."""
    names = [f"t{n}_{i}" for n in intervals for i in range(n)]
    config = molora.MoLoRAConfig(
        target_modules=["to_q", "to_k", "to_v", "to_out.0"], num_experts=len(names), rank=rank, alpha=rank,
        expert_names=names,
        router="timestep", router_kwargs={"intervals": list(intervals), "num_timesteps": num_timesteps},
    )
    return molora.get_molora_model(unet, config)


def train_step(model: molora.MoLoRAModel, scheduler, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
               text: torch.Tensor, generator: torch.Generator | None = None,
               timesteps: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """One denoising step (epsilon prediction, MSE) routed by the scheduler's timesteps; returns
    the loss and the timesteps used."""
    T = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = torch.randint(0, T, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with model.routing(timesteps=timesteps):  # the same t the UNet is conditioned on
        pred = model(noisy, timesteps, encoder_hidden_states=text).sample
    loss = nn.functional.mse_loss(pred, noise) + model.aux_loss()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach()), timesteps


def main(argv: list[str] | None = None) -> dict:
    from diffusers import DDPMScheduler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = make_model(build_unet(), tuple(args.intervals), scheduler.config.num_train_timesteps)
    model.print_trainable_parameters()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, 8, 8, generator=g)
    text = torch.randn(args.batch, 5, 16, generator=g)
    losses = []
    for step in range(args.steps):
        loss, t = train_step(model, scheduler, opt, latents, text, generator=g)
        losses.append(loss)
        decision = next(iter(model.last_routing().values())).decision
        experts = [[model.expert_names[i] for i in row] for row in decision.indices.tolist()]
        print(f"step {step}: loss {loss:.4f}  t={t.tolist()}  experts={experts}")
    return {"losses": losses}


if __name__ == "__main__":
    main()
