"""Train a routed model with DistributedDataParallel (CPU/gloo or GPU/nccl).

    torchrun --nproc_per_node 2 examples/ddp_train.py                               # plain torchrun + DDP
    torchrun --nproc_per_node 2 examples/ddp_train.py --accelerate                  # accelerate's Accelerator
    torchrun --nproc_per_node 2 examples/ddp_train.py --fsdp                        # FSDP2 (fully_shard)
    accelerate launch --cpu --num_processes 2 examples/ddp_train.py --accelerate   # accelerate's launcher
    python examples/ddp_train.py                                                    # one process, no launcher

Each process takes its share of every global batch; DDP averages the gradients, so the trained
experts equal a single-process run on the whole batch (tests/test_ddp.py checks this).
Top-k routing leaves experts without tokens in a step: molora stacks all experts of a layer for
the kernel, so every expert is in the graph (with a zero gradient) and DDP needs no
``find_unused_parameters``. The balancing loss is computed per process over its own tokens (as
Mixtral under DDP), so with ``aux_loss_coef > 0`` the result differs slightly from one process.

FSDP: the wrapping policy that works is FSDP2's ``fully_shard`` on every ``RoutedLoRALinear``
(its frozen base layer, experts and router form one unit, unsharded for its forward) and then
on the root model, which holds the rest of the frozen base and any shared router. FSDP2 shards
per parameter, so frozen and trainable parameters may share a unit. The trained experts equal
the single-process run (tests/test_ddp.py, CPU/gloo); gather them with ``DTensor.full_tensor()``
before saving.
"""

from __future__ import annotations

import argparse
import gc
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


def train(model: nn.Module, molora_model: molora.MoLoRAModel, data, rank: int = 0, world: int = 1, lr: float = 0.05,
          accelerator=None) -> None:
    """SGD on each process's share of every global batch; with an ``accelerate.Accelerator`` the
    model and optimizer go through ``accelerator.prepare`` and ``accelerator.backward``."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)
    for x, y in data:
        share = x.shape[0] // world
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = nn.functional.cross_entropy(model(xs), ys) + molora_model.aux_loss()
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DDP training of a routed model (see the module docstring)")
    parser.add_argument("--accelerate", action="store_true", help="use accelerate.Accelerator instead of DDP directly")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per routed layer, then the root)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    model = make_model(aux_loss_coef=float(os.environ.get("MOLORA_AUX", "0.01")))
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        rank, world = accelerator.process_index, accelerator.num_processes
        train(model, model, make_data(steps=args.steps, batch=8 * world), rank, world, accelerator=accelerator)
    else:
        accelerator = None
        distributed = "WORLD_SIZE" in os.environ  # set by torchrun / accelerate launch
        if distributed:
            dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        # Every expert reaches the loss through the stacked bank (zero gradient when no token
        # picked it), so DDP's default find_unused_parameters=False is right for top-k routing.
        if args.fsdp and distributed:
            from torch.distributed.fsdp import fully_shard

            for layer in model.routed_layers().values():
                fully_shard(layer)
            wrapped = fully_shard(model)
        else:
            wrapped = DDP(model) if distributed else model
        train(wrapped, model, make_data(steps=args.steps, batch=8 * world), rank, world)
        del wrapped
    # FSDP2 holds sharded DTensors: every process joins the gather of the full tensors.
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in model.adapter_state_dict().items()}
    if rank == 0:
        out = os.environ.get("MOLORA_DDP_OUT")
        if out:
            torch.save(state, out)
        print("trained", sum(p.numel() for p in model.trainable_parameters()), "parameters on", world, "processes")
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        accelerator.free_memory()  # releases the prepared (DDP-wrapped) model
    if dist.is_initialized():  # also under accelerate: a live gloo group at exit can abort the process
        dist.barrier()
        gc.collect()  # drop DDP's reducer (and its pending gloo work) before the group goes
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
