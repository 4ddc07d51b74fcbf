"""The Triton kernels on CPU tensors under ``TRITON_INTERPRET=1`` against the float64 reference.

Triton reads ``TRITON_INTERPRET`` when it is imported (its own ``@jit`` helpers such as
``tl.sum``), when a kernel is decorated, and again when a kernel runs (lazy imports inside the
interpreter). So the variable is set here before Triton is imported and left set: that is
harmless to the other tests because the interpreter is never a default backend (the default is
``triton`` only for CUDA tensors). If Triton was already imported without it in this process,
these tests rerun this file in a subprocess with the variable set instead. Tiny shapes (the
interpreter runs every program sequentially in numpy), one block configuration (16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

IN_PROCESS = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernel_cases import assert_matches_reference, make_case  # noqa: E402

if IN_PROCESS:
    import molora.kernels.triton_backend as tb

    assert tb.INTERPRETED
    needs_interpreter = pytest.mark.skipif(False, reason="")
else:
    tb = None
    needs_interpreter = pytest.mark.skip(reason="Triton was imported without TRITON_INTERPRET: see test_in_subprocess")


def test_in_subprocess():
    """Fallback when this process's Triton is not the interpreter: run this file in a fresh one."""
    if IN_PROCESS:
        pytest.skip("the interpreter runs in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = Path(__file__)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)],
                         cwd=here.parents[1], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def dense(*args):
    return tb.routed_lora_triton(*args, path="dense")


def grouped(*args):
    return tb.routed_lora_triton(*args, path="grouped")


PATHS = [dense, grouped]


@needs_interpreter
@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("routing", ["random", "empty_experts", "one_expert", "dropped", "zero_gates"])
def test_routings_fp32(path, routing):
    case = make_case(T=37, d_in=45, d_out=29, E=5, r=4, k=2, routing=routing, mixed_ranks=True)
    assert_matches_reference(case, torch.float32, path, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("r, k", [(1, 1), (4, "E"), (12, 2), (16, None)])
def test_ranks_and_k_fp32(path, r, k):
    E = 3
    case = make_case(T=21, d_in=19, d_out=35, E=E, r=r, k=E if k == "E" else k, seed=r)
    assert_matches_reference(case, torch.float32, path, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("k", [2, None])
def test_shared_a_fp32(path, k):
    """HydraLoRA: one A for all experts (A x computed once per token, not per expert)."""
    case = make_case(T=33, d_in=21, d_out=18, E=4, r=5, k=k, shared=True, routing="dropped", mixed_ranks=True)
    assert_matches_reference(case, torch.float32, path, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shared", [False, True])
def test_fp16(path, shared):
    case = make_case(T=37, d_in=45, d_out=29, E=4, r=12, k=2, shared=shared, routing="dropped", mixed_ranks=True)
    assert_matches_reference(case, torch.float16, path, atol=5e-3, rtol=5e-3)


@needs_interpreter
@pytest.mark.parametrize("path", PATHS, ids=lambda f: f.__name__)
def test_bf16_upcast_in_interpreter(path):
    """bf16 tl.dot is wrong in the interpreter; the kernels upcast bf16 to fp32 there."""
    case = make_case(T=20, d_in=24, d_out=17, E=3, r=4, k=2)
    assert_matches_reference(case, torch.bfloat16, path, atol=3e-2, rtol=3e-2)


@needs_interpreter
def test_dispatch_picks_paths():
    assert tb.triton_path(4, 8, None, False) == "dense"
    assert tb.triton_path(64, 8, 2, False) == "grouped"
    assert tb.triton_path(64, 16, None, False) == "grouped"  # too wide for the fused kernel's registers
    with pytest.raises(ValueError, match="path must be"):
        tb.routed_lora_triton(*make_case(E=2, r=2, k=1)[:5], path="sparse")


@needs_interpreter
def test_cuda_required_without_interpreter(monkeypatch):
    monkeypatch.setattr(tb, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        tb.routed_lora_triton(*make_case(E=2, r=2, k=1)[:5])
