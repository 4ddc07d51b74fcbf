"""Train a routed model with DistributedDataParallel (CPU/gloo or GPU/nccl).

    torchrun --nproc_per_node 2 examples/ddp_train.py            # plain torchrun
    accelerate launch --num_processes 2 examples/ddp_train.py    # through accelerate (same script)

Each process takes its share of every global batch; DDP averages the gradients, so the trained
experts equal a single-process run on the whole batch (tests/test_ddp.py checks this).
Top-k routing leaves experts without tokens in a step: molora stacks all experts of a layer for
the kernel, so every expert is in the graph (with a zero gradient) and DDP needs no
``find_unused_parameters``. The balancing loss is computed per process over its own tokens (as
Mixtral under DDP), so with ``aux_loss_coef > 0`` the result differs slightly from one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import molora


def make_model(seed: int = 0, aux_loss_coef: float = 0.01) -> molora.MoLoRAModel:
    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("up", nn.Linear(16, 32))
    base.add_module("act", nn.GELU())
    base.add_module("down", nn.Linear(32, 4))
    config = molora.MoLoRAConfig(target_modules=["up", "down"], num_experts=8, rank=4, router="topk", top_k=2,
                                 aux_loss_coef=aux_loss_coef)
    model = molora.get_molora_model(base, config)
    with torch.no_grad():  # non-zero B, so that routers get gradients from the first step
        for layer in model.routed_layers().values():
            for b in layer.bank.B:
                b.normal_(0, 0.1)
    return model


def make_data(steps: int, batch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 16, generator=g), torch.randint(0, 4, (batch,), generator=g)) for _ in range(steps)]


def train(model: nn.Module, molora_model: molora.MoLoRAModel, data, rank: int = 0, world: int = 1, lr: float = 0.05) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for x, y in data:
        share = x.shape[0] // world
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = nn.functional.cross_entropy(model(xs), ys) + molora_model.aux_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()


def main() -> None:
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(aux_loss_coef=float(os.environ.get("MOLORA_AUX", "0.01")))
    ddp = DDP(model)
    train(ddp, model, make_data(steps=5, batch=8 * world), rank, world)
    if rank == 0:
        out = os.environ.get("MOLORA_DDP_OUT")
        if out:
            torch.save({k: v.detach() for k, v in model.adapter_state_dict().items()}, out)
        print("trained", sum(p.numel() for p in model.trainable_parameters()), "parameters on", world, "processes")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
