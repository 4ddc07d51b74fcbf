"""The command line: --help everywhere, compose -> export-peft, clear errors with exit code 2."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import molora
from molora.cli import build_parser, main

from helpers import make_peft_adapter, model_inputs, peft_output, tiny_bert


def test_every_subcommand_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"demo", "compose", "export-peft"} <= set(commands)
    for name in commands:
        out = subprocess.run([sys.executable, "-m", "molora.cli", name, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: molora" in out.stdout, name


def test_compose_then_export(tmp_path, capsys):
    pytest.importorskip("peft")
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    a = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["query", "value"])
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=2, target_modules=["query"])
    assert main(["compose", "--base", str(tmp_path / "base"), "--adapter", f"a={a}", "--adapter", str(b),
                 "--router", "task", "--out", str(tmp_path / "ckpt")]) == 0
    model = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "ckpt")
    assert model.expert_names == ["a", "b"]
    assert main(["export-peft", "--base", str(tmp_path / "base"), "--checkpoint", str(tmp_path / "ckpt"),
                 "--weight", "a=1.0", "--out", str(tmp_path / "mix")]) == 0
    inputs = model_inputs("bert")
    with torch.no_grad(), model.routing(task_ids=[0, 0, 0]):
        routed = model(**inputs).last_hidden_state
    torch.testing.assert_close(peft_output(base, tmp_path / "mix", inputs), routed, atol=1e-5, rtol=1e-5)


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    assert main(["compose", "--base", str(tmp_path / "base"), "--adapter", f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = BertModel(BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
    d = make_peft_adapter(other, tmp_path / "other", seed=1, target_modules=["query"])
    assert main(["compose", "--base", str(tmp_path / "base"), "--adapter", f"o={d}", "--out", str(tmp_path / "o")]) == 2
    assert "different base model" in capsys.readouterr().err
    assert main(["export-peft", "--base", str(tmp_path / "base"), "--checkpoint", str(tmp_path / "nope"),
                 "--weight", "a=1", "--out", str(tmp_path / "m")]) == 2
    assert "no molora checkpoint" in capsys.readouterr().err
    assert main(["export-peft", "--base", str(tmp_path / "nothere"), "--checkpoint", str(tmp_path / "nope"),
                 "--weight", "a=1", "--out", str(tmp_path / "m")]) == 2
    assert "not a folder" in capsys.readouterr().err
