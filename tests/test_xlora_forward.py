"""PEFT's X-LoRA against molora's composition: the loader work-arounds and the benchmark script.

References are PEFT's own: X-LoRA with its scalings forced to 1/N must equal PEFT's exact
weighted sum of the adapters (``add_weighted_adapter``, combination "cat").
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import make_peft_adapter, model_inputs, tiny_bert

peft = pytest.importorskip("peft")
if not hasattr(peft, "XLoraConfig"):
    pytest.skip("this peft has no X-LoRA (XLoraConfig)", allow_module_level=True)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"molora_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _uniform_scalings(xlora_model) -> None:
    """Zero X-LoRA's classifier output layer: its softmax then gives every adapter 1/N."""
    last = xlora_model.base_model.internal_xlora_classifier.layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def test_peft_xlora_loads_bert_adapters_and_applies_them(tmp_path):
    """Bare BertModel + adapters named freely: PEFT's X-LoRA fails (key prefix) or applies nothing
    (names) on its own; through load_peft_xlora it computes the exact 1/N mixture."""
    from peft import PeftModel

    base = tiny_bert()
    dirs = {n: make_peft_adapter(base, tmp_path / n, seed=s, target_modules=["query", "value"])
            for n, s in (("sentiment", 1), ("topic", 2), ("news", 3))}
    inputs = model_inputs("bert")
    xl = _load("peft_xlora").load_peft_xlora(base, dirs, task_type="FEATURE_EXTRACTION", xlora_depth=2,
                                              xlora_size=8, layerwise_scalings=True)
    _uniform_scalings(xl)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["sentiment"]), adapter_name="sentiment")
    for n in ("topic", "news"):
        pm.load_adapter(str(dirs[n]), adapter_name=n)
    pm.add_weighted_adapter(list(dirs), [1 / 3] * 3, "mix", combination_type="cat")
    pm.set_adapter("mix")
    with torch.no_grad():
        got = xl(**inputs).last_hidden_state
        scalings = xl.base_model.get_latest_scalings()
        want = pm.eval()(**inputs).last_hidden_state
        plain = base(**inputs).last_hidden_state
    assert scalings.shape == (3, 7, 4, 3)  # batch, tokens, LoRA layers (2 x query/value), adapters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapters are applied


def test_peft_xlora_rejects_regex_targets_under_the_wrapper(tmp_path):
    base = tiny_bert()
    folder = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=r".*\.(query|value)")
    with pytest.raises(ValueError, match="regex"):
        _load("peft_xlora").load_peft_xlora(base, {"a": folder}, task_type="FEATURE_EXTRACTION")


def test_xlora_forward_benchmark_runs_and_writes_its_table(tmp_path):
    out_path = tmp_path / "xlora.json"
    out = _load("xlora_forward").main(["--experts", "2", "--layers", "1", "--hidden", "32", "--heads", "2",
                                       "--intermediate", "48", "--vocab", "50", "--batch", "2", "--seq", "5",
                                       "--rounds", "1", "--threads", "1", "--out", str(out_path)])
    saved = json.loads(out_path.read_text())
    assert saved["results"].keys() == {"2"} and saved == json.loads(json.dumps(out))
    res = saved["results"]["2"]
    timing = res["threads"]["1"]
    assert set(timing["ms"]) == {"base", "static_mixture", "gradient_router", "xlora_style", "peft_xlora"}
    assert set(timing["ratio_peft_xlora_over_molora"]) == {"static_mixture", "gradient_router", "xlora_style"}
    assert all(v > 0 for v in timing["ms"].values())
    work = res["work_per_forward"]
    assert (work["peft_xlora"]["decoder_passes"], work["peft_xlora"]["passes_with_lora"]) == (2, 2)
    for m in ("static_mixture", "gradient_router", "xlora_style"):
        assert (work[m]["decoder_passes"], work[m]["passes_with_lora"]) == (1, 1)
    assert res["checks"]["shape"] == [2, 5, 50]
    assert res["checks"]["max_abs_diff_peft_xlora_uniform_vs"]["molora static_mixture"] < 1e-4
