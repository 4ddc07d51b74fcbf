"""The command line: --help everywhere, compose -> export-peft, clear errors with exit code 2."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import molora
from molora.apps.cli import build_parser, main

from helpers import make_peft_adapter, model_inputs, peft_output, tiny_bert


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"demo", "compose", "export-peft", "bench", "stats", "train-router"} <= set(commands)
    for name in commands:  # in-process: one interpreter start for all commands
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0 and f"usage: molora {name}" in capsys.readouterr().out, name
    out = subprocess.run([sys.executable, "-m", "molora.apps.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(name in out.stdout for name in commands)


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


def test_export_combination_flags_equal_the_python_call(cli_files):
    """--combination/--density/--svd-rank/--seed write what export_peft writes with the same options."""
    from safetensors.torch import load_file

    f, out = cli_files, cli_files["root"] / "combo"
    for combination, flags, opts in (("dare_ties_svd", ["--density", "0.5", "--svd-rank", "2", "--seed", "3"],
                                      dict(density=0.5, svd_rank=2, seed=3)),
                                     ("ties", ["--density", "0.4", "--majority-sign-method", "frequency"],
                                      dict(density=0.4, majority_sign_method="frequency"))):
        argv = ["export-peft", "--base", f["base"], "--checkpoint", f["ckpt"], "--weight", "a=0.6", "--weight", "b=-0.3",
                "--combination", combination, *flags, "--out", str(out / combination)]
        assert main(argv) == 0
        model = molora.MoLoRAModel.from_pretrained(tiny_bert(), f["ckpt"])
        model.export_peft(out / f"{combination}-py", {"a": 0.6, "b": -0.3}, combination, **opts)
        cli, py = (load_file(str(out / d / "adapter_model.safetensors")) for d in (combination, f"{combination}-py"))
        assert cli.keys() == py.keys() and all(torch.equal(cli[k], py[k]) for k in cli)
        if combination.endswith("_svd"):
            assert {t.shape[0] for k, t in cli.items() if "lora_A" in k} == {2}


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


# ---------------------------------------------------------------------- bench, stats, train-router
def save_tiny_tokenizer(path):
    """A whitespace word-level tokenizer over the 101 ids of the tiny test models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 101)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(path))


def write_rows(path, n=6, seed=0, **extra):
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(f"w{rng.randrange(2, 101)}" for _ in range(rng.randrange(3, 9)))
            f.write(json.dumps({"text": text, **{k: v[i] for k, v in extra.items()}}) + "\n")
    return path


def routed_checkpoint(base, path, targets, router="topk", **kw):
    torch.manual_seed(5)
    cfg = molora.MoLoRAConfig(target_modules=targets, num_experts=4, rank=2, router=router, **kw)
    model = molora.get_molora_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for b in layer.bank.B:
                b.normal_(0, 0.2)
    model.save_pretrained(path)
    return model


def test_stats_over_a_data_file_equals_one_forward(tmp_path, capsys):
    import json

    from molora.stats import routing_stats

    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    model = routed_checkpoint(base, tmp_path / "ckpt", ["query", "value"], top_k=2)
    data = write_rows(tmp_path / "data.jsonl", n=5)
    assert main(["stats", "--base", str(tmp_path / "base"), "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data),
                 "--out", str(tmp_path / "st"), "--batch-size", "2", "--no-progress"]) == 0
    got = json.loads((tmp_path / "st" / "routing_stats.json").read_text())
    assert (tmp_path / "st" / "routing_heatmap.png").stat().st_size > 1000
    assert "mean load CV" in capsys.readouterr().out
    # Reference: one forward over all rows (padding masked), molora.stats.routing_stats.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    ref = routing_stats(model)
    assert got["layers"].keys() == ref["layers"].keys()
    for name, s in ref["layers"].items():
        assert got["layers"][name]["tokens"] == s["tokens"] == int(enc["attention_mask"].sum())
        for key in ("token_fraction", "gate_share", "load_cv"):
            assert got["layers"][name][key] == pytest.approx(s[key], abs=1e-5), (name, key)


def lm_loss(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss)


def test_train_router_trains_only_the_router(tmp_path, capsys):
    import json

    from transformers import AutoTokenizer

    from helpers import tiny_gpt2

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    before = routed_checkpoint(base, tmp_path / "ckpt", ["c_attn", "c_fc"], router="soft")
    data = write_rows(tmp_path / "shots.jsonl", n=8, seed=1)
    argv = ["train-router", "--base", str(tmp_path / "base"), "--model-class", "causal-lm", "--checkpoint",
            str(tmp_path / "ckpt"), "--data", str(data), "--out", str(tmp_path / "trained"), "--steps", "8",
            "--lr", "0.05", "--batch-size", "8", "--val-fraction", "0", "--method", "existing", "--no-progress"]
    assert main(argv) == 0
    assert "trained the router" in capsys.readouterr().out
    after = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "trained")
    a, b = before.adapter_state_dict(), after.adapter_state_dict()
    assert a.keys() == b.keys()
    router_keys = [k for k in a if ".router." in k]
    assert router_keys and all(torch.equal(a[k], b[k]) for k in a if k not in router_keys), "experts must stay frozen"
    assert any(not torch.equal(a[k], b[k]) for k in router_keys), "the router must train"
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    assert lm_loss(after, tok, texts) < lm_loss(before, tok, texts)


def test_train_router_auto_chooses_by_cv_and_saves_the_winner(tmp_path, capsys):
    import json
    import math

    from transformers import AutoTokenizer

    from helpers import tiny_gpt2

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    before = routed_checkpoint(base, tmp_path / "ckpt", ["c_attn", "c_fc"], router="soft")
    data = write_rows(tmp_path / "shots.jsonl", n=6, seed=1)
    argv = ["train-router", "--base", str(tmp_path / "base"), "--model-class", "causal-lm", "--checkpoint",
            str(tmp_path / "ckpt"), "--data", str(data), "--out", str(tmp_path / "auto"), "--steps", "4",
            "--method", "auto", "--folds", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if "CV loss" in line]
    assert sorted(row[0] for row in lines) == ["lorahub", "per_layer", "uniform", "weights"]
    chosen = [row[0] for row in lines if row[-1] == "chosen"]
    assert len(chosen) == 1 and f"chose {chosen[0]!r} by 2-fold cross-validation on 6 rows" in out
    scores = [float(row[3]) for row in lines]
    assert scores == sorted(scores)  # listed best first
    after = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "auto")
    a, b = before.adapter_state_dict(), after.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if ".router." not in k and k in b), "experts must stay frozen"
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    assert math.isfinite(lm_loss(after, tok, texts))


def test_bench_runs_a_script_by_name(tmp_path, capsys, monkeypatch):
    # echo.py writes its arguments to the file its --out names; helper.py (no __main__) is no benchmark
    (tmp_path / "echo.py").write_text("import sys, pathlib\nif __name__ == '__main__':\n"
                                      "    pathlib.Path(sys.argv[sys.argv.index('--out') + 1]).write_text(' '.join(sys.argv[1:]))\n")
    (tmp_path / "helper.py").write_text("X = 1\n")
    out = tmp_path / "args.txt"
    assert main(["bench", "--dir", str(tmp_path), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["echo"]
    assert main(["bench", "--dir", str(tmp_path), "echo", "--keys", "10", "--out", str(out)]) == 0
    assert out.read_text() == f"--keys 10 --out {out}"  # the script's own --out wins
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--dir", str(tmp_path), "echo", "--keys", "3"]) == 0
    default = tmp_path / "molora-bench-results" / "echo.json"
    assert default.read_text() == f"--keys 3 --out {os.path.join('molora-bench-results', 'echo.json')}"
    assert main(["bench", "--dir", str(tmp_path), "--results", str(tmp_path / "mine"), "echo"]) == 0
    assert (tmp_path / "mine" / "echo.json").is_file()
    assert main(["bench", "--dir", str(tmp_path), "nope"]) == 2
    assert "unknown benchmark 'nope'; available: echo" in capsys.readouterr().err
    assert main(["bench", "--dir", str(tmp_path / "missing"), "--list"]) == 2
    assert main(["bench", "--list"]) == 0 and "balance" in capsys.readouterr().out.split()


def test_stats_and_train_router_bad_input_exit_2(tmp_path, capsys):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    routed_checkpoint(base, tmp_path / "ckpt", ["query"], router="task")
    data = write_rows(tmp_path / "d.jsonl", n=2)
    common = ["--base", str(tmp_path / "base"), "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(["stats", *common, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "w3"}\n{"text": \n')
    assert main(["stats", *common, "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
    (tmp_path / "notext.jsonl").write_text('{"txt": "w3"}\n')
    assert main(["stats", *common, "--data", str(tmp_path / "notext.jsonl")]) == 2
    assert 'string "text"' in capsys.readouterr().err
    # A checkpoint made for another base model.
    from helpers import tiny_gpt2

    routed_checkpoint(tiny_gpt2(), tmp_path / "gpt_ckpt", ["c_attn"])
    assert main(["stats", "--base", str(tmp_path / "base"), "--checkpoint", str(tmp_path / "gpt_ckpt"), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    assert "has no module" in capsys.readouterr().err
    assert main(["train-router", *common, "--data", str(data)]) == 2
    assert "needs a loss" in capsys.readouterr().err
    assert main(["train-router", *common, "--data", str(data), "--model-class", "seq-cls"]) == 2
    assert 'integer "label"' in capsys.readouterr().err
    gpt = tiny_gpt2()
    gpt.save_pretrained(tmp_path / "gbase")
    save_tiny_tokenizer(tmp_path / "gbase")
    routed_checkpoint(gpt, tmp_path / "task_ckpt", ["c_attn"], router="task")
    assert main(["train-router", "--base", str(tmp_path / "gbase"), "--model-class", "causal-lm", "--checkpoint",
                 str(tmp_path / "task_ckpt"), "--data", str(data), "--out", str(tmp_path / "o"), "--method", "existing",
                 "--no-progress"]) == 2
    assert "no trainable parameters" in capsys.readouterr().err


# ---------------------------------------------------------------------- every bad input: exit 2, one line
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A base model folder, two adapters in folders with the same last component, a malformed
    adapter, a composed checkpoint (experts a, b) and a data file."""
    pytest.importorskip("peft")
    import json

    root = tmp_path_factory.mktemp("cli")
    base = tiny_bert()
    base.save_pretrained(root / "base")
    save_tiny_tokenizer(root / "base")
    a = make_peft_adapter(base, root / "x" / "lora", seed=1, target_modules=["query"])
    b = make_peft_adapter(base, root / "y" / "lora", seed=2, target_modules=["query"])
    bad_json = make_peft_adapter(base, root / "badjson", seed=3, target_modules=["query"])
    (bad_json / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    nan_alpha = make_peft_adapter(base, root / "nanalpha", seed=3, target_modules=["query"])
    cfg = json.loads((nan_alpha / "adapter_config.json").read_text())
    (nan_alpha / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": float("nan")}))
    assert main(["compose", "--base", str(root / "base"), "--adapter", f"a={a}", "--adapter", f"b={b}",
                 "--router", "soft", "--out", str(root / "ckpt")]) == 0
    return {"root": root, "base": str(root / "base"), "a": str(a), "b": str(b), "bad_json": str(bad_json),
            "nan_alpha": str(nan_alpha), "ckpt": str(root / "ckpt"), "data": str(write_rows(root / "d.jsonl", n=2))}


def _compose(f, *extra, adapters=None):
    adapters = [f"a={f['a']}"] if adapters is None else adapters
    return ["compose", "--base", f["base"], *[x for ad in adapters for x in ("--adapter", ad)], "--out",
            str(f["root"] / "out"), *extra]


def _export(f, *weights, checkpoint=None, extra=()):
    return ["export-peft", "--base", f["base"], "--checkpoint", checkpoint or f["ckpt"],
            *[x for w in weights for x in ("--weight", w)], "--out", str(f["root"] / "mix"), *extra]


def _checkpoint_cmd(cmd, f, *extra):
    return [cmd, "--base", f["base"], "--checkpoint", f["ckpt"], "--data", f["data"], "--out", str(f["root"] / "o"),
            "--no-progress", *extra]


BAD_INPUTS = {
    # compose
    "compose: missing folder": (lambda f: _compose(f, adapters=[f"a={f['root'] / 'nope'}"]), "compose", "does not exist"),
    "compose: malformed JSON": (lambda f: _compose(f, adapters=[f"j={f['bad_json']}"]), "compose", "is not valid JSON"),
    "compose: NaN lora_alpha": (lambda f: _compose(f, adapters=[f"n={f['nan_alpha']}"]), "compose",
                                "lora_alpha must be a finite number; got nan"),
    "compose: repeated name": (lambda f: _compose(f, adapters=[f"a={f['a']}", f"a={f['b']}"]), "compose",
                               "adapter name 'a' is given twice"),
    "compose: repeated folder name": (lambda f: _compose(f, adapters=[f["a"], f["b"]]), "compose",
                                      "adapter name 'lora' is given twice"),
    "compose: empty name": (lambda f: _compose(f, adapters=[f"={f['a']}"]), "compose", "the name is empty"),
    "compose: --top-k 0": (lambda f: _compose(f, "--top-k", "0"), "compose", "argument --top-k: must be >= 1"),
    "compose: --top-k abc": (lambda f: _compose(f, "--top-k", "abc"), "compose", "argument --top-k: 'abc' is not an integer"),
    "compose: NaN router arg": (lambda f: _compose(f, "--router", "soft", "--router-arg", "temperature=nan"), "compose",
                                "'nan' is not a finite number"),
    "compose: bad router arg name": (lambda f: _compose(f, "--router-arg", "a-b=1"), "compose", "must be identifiers"),
    "compose: unknown router": (lambda f: _compose(f, "--router", "nosuch"), "compose", "nosuch"),
    "compose: unknown flag": (lambda f: _compose(f, "--nope"), "compose", "unrecognized arguments: --nope"),
    "compose: missing --base": (lambda f: ["compose", "--adapter", f["a"], "--out", "o"], "compose",
                                "the following arguments are required: --base"),
    "compose: base not a model": (lambda f: ["compose", "--base", f["a"], "--adapter", f["a"], "--out", "o"], "compose", ""),
    # export-peft
    "export: NaN weight": (lambda f: _export(f, "a=nan"), "export-peft", "weight 'a=nan': must be a finite number"),
    "export: inf weight": (lambda f: _export(f, "a=1", "b=-inf"), "export-peft", "weight 'b=-inf': must be a finite number"),
    "export: not a number": (lambda f: _export(f, "a=x"), "export-peft", "'x' is not a valid value"),
    "export: unknown expert": (lambda f: _export(f, "zz=1"), "export-peft", r"unknown experts ['zz']; experts are ['a', 'b']"),
    "export: no =": (lambda f: _export(f, "a"), "export-peft", "must look like NAME=VALUE"),
    "export: repeated expert": (lambda f: _export(f, "a=1", "a=2"), "export-peft", "weight name 'a' is given twice"),
    "export: unknown --combination": (lambda f: _export(f, "a=1", extra=["--combination", "tie"]), "export-peft",
                                      "argument --combination: invalid choice: 'tie'"),
    "export: --density 0": (lambda f: _export(f, "a=1", extra=["--combination", "ties", "--density", "0"]), "export-peft",
                            "argument --density: must be in (0, 1]"),
    "export: --density nan": (lambda f: _export(f, "a=1", extra=["--density", "nan"]), "export-peft",
                              "argument --density: must be a finite number"),
    "export: ties without --density": (lambda f: _export(f, "a=1", extra=["--combination", "ties"]), "export-peft",
                                       "combination 'ties' needs a density"),
    "export: --density with cat": (lambda f: _export(f, "a=1", extra=["--density", "0.5"]), "export-peft",
                                   "density is used by"),
    "export: --svd-rank 0": (lambda f: _export(f, "a=1", extra=["--combination", "svd", "--svd-rank", "0"]), "export-peft",
                             "argument --svd-rank: must be >= 1"),
    "export: --svd-rank with ties": (lambda f: _export(f, "a=1", extra=["--combination", "ties", "--density", "0.5",
                                                                       "--svd-rank", "2"]), "export-peft",
                                     "svd_rank is used by"),
    "export: missing checkpoint": (lambda f: _export(f, "a=1", checkpoint=str(f["root"] / "nope")), "export-peft",
                                   "no molora checkpoint"),
    # stats, train-router
    "stats: --batch-size 0": (lambda f: _checkpoint_cmd("stats", f, "--batch-size", "0"), "stats", "--batch-size: must be >= 1"),
    "stats: --max-length -3": (lambda f: _checkpoint_cmd("stats", f, "--max-length", "-3"), "stats", "--max-length: must be >= 1"),
    "stats: bad --value": (lambda f: _checkpoint_cmd("stats", f, "--value", "x"), "stats", "argument --value: invalid choice"),
    "train-router: --lr nan": (lambda f: _checkpoint_cmd("train-router", f, "--lr", "nan"), "train-router",
                               "--lr: must be a finite number"),
    "train-router: --steps 0": (lambda f: _checkpoint_cmd("train-router", f, "--steps", "0"), "train-router", "--steps: must be >= 1"),
    "train-router: --val-fraction 1.5": (lambda f: _checkpoint_cmd("train-router", f, "--val-fraction", "1.5"), "train-router",
                                         "--val-fraction: must be in [0, 1)"),
    # continual, demo, top level
    "continual: --epochs nan": (lambda f: ["continual", "--data", "d", "--order", "a", "--epochs", "nan"], "continual",
                                "--epochs: must be a finite number"),
    "continual: --lr -1": (lambda f: ["continual", "--data", "d", "--order", "a", "--lr", "-1"], "continual", "--lr: must be in (0"),
    "continual: --l1 inf": (lambda f: ["continual", "--data", "d", "--order", "a", "--l1", "inf"], "continual",
                            "--l1: must be a finite number"),
    "demo: --epochs inf": (lambda f: ["demo", "--epochs", "inf"], "demo", "--epochs: must be a finite number"),
    "demo: --experts 0": (lambda f: ["demo", "--experts", "0"], "demo", "--experts: must be >= 1"),
    "no command": (lambda f: [], None, "the following arguments are required: command"),
    "unknown command": (lambda f: ["frobnicate"], None, "invalid choice: 'frobnicate'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_exits_2_with_one_line(cli_files, capsys, case):
    argv, command, message = BAD_INPUTS[case]
    capsys.readouterr()
    assert main(argv(cli_files)) == 2
    captured = capsys.readouterr()
    prefix = f"molora {command}: error: " if command else "molora: error: "
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), captured.err
    assert message in lines[0] and "Traceback" not in captured.err
    assert not (cli_files["root"] / "out").exists() and not (cli_files["root"] / "mix").exists()


def test_compose_picks_the_model_class_from_the_adapters_task_type(tmp_path, capsys):
    """Causal-LM adapters compose onto AutoModelForCausalLM without --model-class (AutoModel would
    drop the LM head the adapters were saved under); mixed task types are refused, naming them."""
    from helpers import tiny_gpt2

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    a = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["c_attn"], task_type="CAUSAL_LM")
    assert main(["compose", "--base", str(tmp_path / "base"), "--adapter", f"a={a}", "--router", "task",
                 "--out", str(tmp_path / "ckpt")]) == 0
    model = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "ckpt")
    inputs = model_inputs("gpt2")
    with torch.no_grad(), model.routing(task_ids=[0, 0, 0]):
        ours = model(**inputs).logits
    torch.testing.assert_close(ours, peft_output(base, a, inputs, field="logits"), atol=1e-5, rtol=1e-5)
    import json

    b = make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    config = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**config, "task_type": "TOKEN_CLS"}))
    assert main(["compose", "--base", str(tmp_path / "base"), "--adapter", f"a={a}", "--adapter", f"b={b}",
                 "--out", str(tmp_path / "ckpt2")]) == 2
    assert "different model classes" in capsys.readouterr().err
