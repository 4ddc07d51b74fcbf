"""Distributed training on CPU/gloo with 2 processes (plain torchrun + DDP, accelerate, FSDP2)
trains the same top-k experts as one process on the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
sys.path.insert(0, str(EXAMPLE.parent))
import ddp_train  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def single_process():
    # The balancing loss is per-process (not a function of the global batch): leave it out here.
    single = ddp_train.make_model(aux_loss_coef=0.0)
    ddp_train.train(single, single, ddp_train.make_data(steps=5, batch=16))
    return single.adapter_state_dict()


def launch(mode: str, out: Path, port: int) -> list[str]:
    if mode == "accelerate":
        exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(port), str(EXAMPLE), "--accelerate"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(EXAMPLE)]
    return cmd + (["--fsdp"] if mode == "fsdp" else [])


@pytest.mark.parametrize("mode,port", [("torchrun", 29533), ("accelerate", 29534), ("fsdp", 29535)])
def test_two_processes_match_one(tmp_path, single_process, mode, port):
    if mode == "accelerate":
        pytest.importorskip("accelerate")
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "MOLORA_DDP_OUT": str(out), "OMP_NUM_THREADS": "1", "MOLORA_AUX": "0"}
    run = subprocess.run(launch(mode, out, port), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "on 2 processes" in run.stdout
    got = torch.load(out, weights_only=True)
    expected = single_process
    assert got.keys() == expected.keys()
    initial = ddp_train.make_model().adapter_state_dict()
    assert any(not torch.equal(initial[k], expected[k]) for k in expected), "training must move the experts"
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4)


def test_experts_without_tokens_still_get_a_gradient():
    """Why DDP needs no find_unused_parameters: an expert no token picked gets a zero gradient
    (the bank is stacked for the kernel), so every parameter's gradient hook fires each step."""
    model = ddp_train.make_model(aux_loss_coef=0.0)
    for layer in model.routed_layers().values():
        layer.router.top_k = 1
    x = torch.randn(1, 16)  # one token, top-1: one expert per layer is used, seven are not
    model(x).sum().backward()
    for name, layer in model.routed_layers().items():
        used = set(model.last_routing()[name].decision.indices.flatten().tolist())
        assert len(used) == 1
        for e, b in enumerate(layer.bank.B):
            assert b.grad is not None, (name, e)
            assert (b.grad.abs().sum() > 0) == (e in used), (name, e)
    assert all(p.grad is not None for p in model.trainable_parameters())
