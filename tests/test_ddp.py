"""DDP (gloo, 2 CPU processes) trains the same experts as one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"


def test_ddp_matches_single_process(tmp_path):
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import ddp_train
    finally:
        sys.path.pop(0)
    # The balancing loss is per-process (not a function of the global batch): leave it out here.
    single = ddp_train.make_model(aux_loss_coef=0.0)
    ddp_train.train(single, single, ddp_train.make_data(steps=5, batch=16))
    expected = single.adapter_state_dict()

    out = tmp_path / "ddp.pt"
    env = {**os.environ, "MOLORA_DDP_OUT": str(out), "OMP_NUM_THREADS": "1", "MOLORA_AUX": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(EXAMPLE)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got.keys() == expected.keys()
    initial = ddp_train.make_model().adapter_state_dict()
    assert any(not torch.equal(initial[k], expected[k]) for k in expected), "training must move the experts"
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4)
