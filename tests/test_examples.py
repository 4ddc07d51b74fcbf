"""Every script in examples/ runs on tiny settings, so the examples cannot rot.

A new example must add its tiny arguments to TINY_ARGS (the test fails otherwise). The scripts
run in-process with ``runpy`` as ``__main__`` (as ``python examples/X.py ...`` would), inside a
temporary working folder. The multi-process launches are covered by tests/test_ddp.py.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TINY_ARGS = {
    "ddp_train.py": ["--steps", "1"],
    "diffusers_timestep.py": ["--steps", "1", "--batch", "2"],
    "hf_trainer.py": ["--max-steps", "2", "--save-steps", "1", "--out", "trainer-out"],
}
NEEDS = {"diffusers_timestep.py": "diffusers", "hf_trainer.py": "accelerate"}


def test_every_example_has_tiny_arguments():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(TINY_ARGS)


@pytest.mark.parametrize("name", sorted(TINY_ARGS))
def test_example_runs(name, tmp_path, monkeypatch, capsys):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *TINY_ARGS[name]])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert "trainable params" in out or "trained" in out, out[-2000:]
    if name == "hf_trainer.py":
        from molora.persistence import WEIGHTS_PATTERN

        names = [p.name for p in (tmp_path / "trainer-out" / "checkpoint-2").iterdir()]
        assert len([n for n in names if WEIGHTS_PATTERN.fullmatch(n)]) == 1, names
        assert "aux_loss" in out
