"""Checkpoints: bit-exact round trips, atomic writes, clear errors, nothing half-applied."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import molora
from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.errors import CheckpointError
from molora.persistence import CONFIG_NAME, VERSION, WEIGHTS_NAME, WEIGHTS_PATTERN

from helpers import model_inputs, tiny_bert


def _trained(bert, **cfg):
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query", "value"], num_experts=3, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("cfg", [dict(router="topk", top_k=2), dict(router="task", shared_a=True, rank=3)])
def test_round_trip_is_bit_exact(bert, tmp_path, cfg):
    model = _trained(bert, **cfg)
    model.set_experts_trainable(False, ["expert_1"])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MoLoRAModel.from_pretrained(copy.deepcopy(bert), tmp_path / "ckpt")
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in loaded.parameters()]
    inputs = model_inputs("bert")
    with torch.no_grad(), molora.routing(task_ids=[2, 0, 1]):
        assert torch.equal(model(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state)


def _weights_file(folder):
    return folder / json.loads((folder / CONFIG_NAME).read_text())["weights"]["file"]


def test_checkpoint_has_no_pickle(bert, tmp_path):
    _trained(bert).save_pretrained(tmp_path / "c")
    names = sorted(os.listdir(tmp_path / "c"))
    assert names[0] == CONFIG_NAME and len(names) == 2 and WEIGHTS_PATTERN.fullmatch(names[1])
    assert _weights_file(tmp_path / "c").name == names[1]


def test_truncated_weights_raise_clear_error(bert, tmp_path):
    _trained(bert).save_pretrained(tmp_path / "c")
    f = _weights_file(tmp_path / "c")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "c")


def test_corrupt_config_and_missing_folder(bert, tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "nothing")
    _trained(bert).save_pretrained(tmp_path / "c")
    cfg = tmp_path / "c" / CONFIG_NAME
    cfg.write_text(cfg.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "c")


def test_version_1_checkpoint_still_loads_and_is_replaced_whole(bert, tmp_path):
    """A version-1 folder (fixed weights name, no fingerprint) loads; the next save commits a
    version-2 checkpoint and only then removes the old fixed-name file."""
    model = _trained(bert)
    model.save_pretrained(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    _weights_file(tmp_path / "c").rename(tmp_path / "c" / WEIGHTS_NAME)
    meta.update(version=1, weights={**meta["weights"], "file": WEIGHTS_NAME})
    del meta["base_fingerprint"]
    (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps(meta))
    other = tiny_bert()
    with torch.no_grad():  # no fingerprint in version 1: another base is not detected
        other.encoder.layer[0].attention.self.query.weight.add_(1.0)
    other_copy = copy.deepcopy(other)
    loaded = MoLoRAModel.from_pretrained(other, tmp_path / "c")
    assert _same(loaded, model)
    loaded.save_pretrained(tmp_path / "c")
    assert WEIGHTS_NAME not in os.listdir(tmp_path / "c")
    assert json.loads((tmp_path / "c" / CONFIG_NAME).read_text())["version"] == VERSION
    assert _same(MoLoRAModel.from_pretrained(other_copy, tmp_path / "c"), model)
    with pytest.raises(CheckpointError, match="another base model"):  # now fingerprinted: other's base
        MoLoRAModel.from_pretrained(copy.deepcopy(bert), tmp_path / "c")


def _same(a, b):
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loading_into_another_base_changes_nothing(bert, gpt2, tmp_path):
    from transformers import BertConfig, BertModel

    _trained(bert).save_pretrained(tmp_path / "c")
    wider = BertModel(BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
    names = [n for n, _ in wider.named_modules()]
    with pytest.raises(CheckpointError, match=r"another base model.*query.*\[32 x 32\].*\[48 x 48\]"):
        MoLoRAModel.from_pretrained(wider, tmp_path / "c")
    assert [n for n, _ in wider.named_modules()] == names
    with pytest.raises(CheckpointError, match="has no module"):
        MoLoRAModel.from_pretrained(gpt2, tmp_path / "c")


def test_nan_in_checkpoint_is_rejected(bert, tmp_path):
    model = _trained(bert)
    with torch.no_grad():
        next(iter(model.trainable_parameters()))[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        MoLoRAModel.from_pretrained(bert, tmp_path / "c")


# ---------------------------------------------------------------------- malformed files
LAYER = "encoder.layer.0.attention.self.query"
REQUIRED = {
    "topk": [("format",), ("version",), ("config",), ("expert_names",), ("shared_router",), ("layers",), ("weights",),
             ("weights", "file"), ("weights", "sha256"), ("weights", "bytes"),
             *[("layers", LAYER, *k) for k in [("bank",), ("bank", "d_in"), ("bank", "d_out"), ("bank", "shared_a"),
                                               ("bank", "shared_rank"), ("bank", "ranks"), ("bank", "alphas"),
                                               ("bank", "rslora"), ("expert_ids",), ("dropout",), ("router",),
                                               ("router", "name"), ("router", "config")]],
             *[("base_fingerprint", *k) for k in [("method",), ("samples",), ("modules",), ("modules", LAYER, "shape"),
                                                  ("modules", LAYER, "dtype"), ("modules", LAYER, "sample_sha256")]]],
    "task": [("shared_router", "name"), ("shared_router", "d_in"), ("shared_router", "config")],
}
CASES = [(kind, path) for kind, paths in REQUIRED.items() for path in paths]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One pristine checkpoint per router kind (per-layer topk router; shared task router)."""
    out = {}
    for kind, cfg in {"topk": dict(router="topk", top_k=2), "task": dict(router="task")}.items():
        folder = tmp_path_factory.mktemp(kind)
        _trained(tiny_bert(), **cfg).save_pretrained(folder)
        out[kind] = folder
    return out


def _mutated(saved, tmp_path, kind, path, value=None, delete=False):
    """A copy of the ``kind`` checkpoint with the config field at ``path`` deleted or replaced."""
    import shutil

    folder = tmp_path / "c"
    shutil.copytree(saved[kind], folder)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    return folder


def _load_refused(folder, *needles):
    base = tiny_bert()
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(CheckpointError) as info:
        MoLoRAModel.from_pretrained(base, folder)
    message = str(info.value)
    assert CONFIG_NAME in message, message
    for needle in needles:
        assert needle in message, message
    assert not any(isinstance(m, molora.RoutedLoRALinear) for m in base.modules())
    assert [p.requires_grad for p in base.parameters()] == flags
    return message


@pytest.mark.parametrize("kind,path", CASES, ids=[f"{k}:{'.'.join(p)}" for k, p in CASES])
def test_missing_required_field_names_file_and_field(saved, tmp_path, kind, path):
    folder = _mutated(saved, tmp_path, kind, path, delete=True)
    _load_refused(folder, f"'{'.'.join(path)}'", "missing")


@pytest.mark.parametrize("kind,path", CASES, ids=[f"{k}:{'.'.join(p)}" for k, p in CASES])
def test_wrongly_typed_field_names_file_and_field(saved, tmp_path, kind, path):
    meta = json.loads((saved[kind] / CONFIG_NAME).read_text())
    current = meta
    for key in path:
        current = current[key]
    wrong = 12345 if isinstance(current, str) else "wrong"
    _load_refused(_mutated(saved, tmp_path, kind, path, wrong), f"'{'.'.join(path)}'", "must be")


@pytest.mark.parametrize("path,value,needle", [
    (("version",), VERSION + 1, "newer format"),
    (("version",), 0, "'version'"),
    (("format",), "peft", "not a molora checkpoint"),
    (("weights", "file"), "../outside.safetensors", "plain file name"),
    (("weights", "bytes"), -1, "'weights.bytes'"),
    (("expert_names",), ["only_one"], "expert_ids"),
    (("config",), {"bogus": 1}, "'config'"),
    (("config", "rank"), "eight", "'config'"),
    (("layers", LAYER, "bank", "alphas"), [1.0], "'layers.%s.bank.alphas'" % LAYER),
    (("layers", LAYER, "router", "config"), {"bogus_option": 1}, "'layers.%s'" % LAYER),
    (("base_fingerprint", "method"), "md5-of-everything", "'base_fingerprint.method'"),
    (("base_fingerprint", "modules", "no.such.layer"), {"shape": [1], "dtype": "float32", "sample_sha256": "0" * 64},
     "not routed layers"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_field_values_name_file_and_field(saved, tmp_path, path, value, needle):
    _load_refused(_mutated(saved, tmp_path, "topk", path, value), needle)


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "null", "{\"format\": \"molora\""])
def test_config_that_is_no_json_object_is_refused(saved, tmp_path, text):
    import shutil

    shutil.copytree(saved["topk"], tmp_path / "c")
    (tmp_path / "c" / CONFIG_NAME).write_text(text)
    _load_refused(tmp_path / "c")


def test_build_failure_leaves_base_untouched(saved, tmp_path):
    """A layout that passes the checks but does not fit the saved tensors fails after layers
    were built: the base keeps its requires_grad flags and its modules."""
    meta = json.loads((saved["topk"] / CONFIG_NAME).read_text())
    ranks = [r + 1 for r in meta["layers"][LAYER]["bank"]["ranks"]]
    _load_refused(_mutated(saved, tmp_path, "topk", ("layers", LAYER, "bank", "ranks"), ranks), "do not fit")


# ---------------------------------------------------------------------- base fingerprint
def test_fingerprint_is_recorded_per_routed_layer(saved):
    meta = json.loads((saved["topk"] / CONFIG_NAME).read_text())
    fp = meta["base_fingerprint"]
    assert set(fp["modules"]) == set(meta["layers"]) and fp["method"] == "strided-sample-sha256"
    assert fp["modules"][LAYER]["shape"] == [32, 32] and fp["modules"][LAYER]["dtype"] == "float32"


def test_fingerprint_tells_another_base_from_a_merged_one(bert, tmp_path):
    model = _trained(bert)
    model.save_pretrained(tmp_path / "plain")
    other = tiny_bert()
    with torch.no_grad():
        other.encoder.layer[1].attention.self.value.weight.mul_(1.01)
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointError, match=r"another base model \(module 'encoder.layer.1.attention.self.value' differs\)"):
        MoLoRAModel.from_pretrained(other, tmp_path / "plain")
    assert all(torch.equal(snapshot[k], v) for k, v in other.state_dict().items())
    assert all(p.requires_grad for p in other.parameters())

    # Saved while merged: the fingerprint is the unmerged base's, plus the merged weight's.
    model.merge([0.5, 0.25, 0.25])
    model.save_pretrained(tmp_path / "merged")
    merged_base = model.unload()  # the mixture stays folded into the weights
    with pytest.raises(CheckpointError, match=r"already has the checkpoint's merged mixture folded in \(module '.*'(, and \d+ more)?\): load onto a fresh base"):
        MoLoRAModel.from_pretrained(merged_base, tmp_path / "merged")
    fresh = MoLoRAModel.from_pretrained(tiny_bert(), tmp_path / "merged")
    assert _same(fresh, _trained(tiny_bert()))


def test_fingerprint_reads_a_sample_not_the_whole_weight():
    from molora.persistence import sample_digest

    w = torch.randn(64, 512)
    assert sample_digest(w, 4096) == sample_digest(w.clone(), 4096)
    assert sample_digest(w.t().contiguous().t(), 4096) == sample_digest(w, 4096)  # layout does not matter
    w2 = w.clone()
    w2[0, 0] += 1.0  # the first and last value are always sampled
    assert sample_digest(w2, 4096) != sample_digest(w, 4096)
    w3 = w + 1e-3 * torch.randn_like(w)  # a dense change (a folded-in LoRA delta) shows
    assert sample_digest(w3, 4096) != sample_digest(w, 4096)


@pytest.mark.parametrize("kind,field", [("ard_lora", "rank_alpha"), ("moslora", "M"), ("qr_lora", "dR"),
                                        ("dora", "magnitude"), (("lora", "dora"), "parts.dora.magnitude")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_kind_parameter_in_checkpoint_is_rejected(bert, tmp_path, kind, field, value):
    """A kind's own tensors (ARD gates, MoSLoRA mixers, QR-LoRA's dR, DoRA magnitudes) are checked
    as the A/B factors are: a checkpoint whose file holds NaN/inf there does not load, and the
    base it was loaded onto is left exactly as it was."""
    import safetensors.torch

    from helpers import assert_same_snapshot, snapshot

    torch.manual_seed(0)
    model = get_molora_model(copy.deepcopy(bert), MoLoRAConfig(target_modules=["query"], num_experts=2, rank=4,
                                                               router="topk", top_k=1, expert_kind=kind))
    model.save_pretrained(tmp_path / "c")
    (weights,) = (tmp_path / "c").glob("*.safetensors")
    tensors = safetensors.torch.load_file(weights)
    names = [n for n in tensors if field in n]
    assert names, sorted(tensors)
    tensors[names[0]] = tensors[names[0]].clone().flatten().index_fill_(0, torch.tensor([0]), value).view_as(tensors[names[0]])
    safetensors.torch.save_file(tensors, weights)
    meta_path = tmp_path / "c" / "molora_config.json"
    meta = json.loads(meta_path.read_text())
    if "sha256" in meta.get("weights", {}):  # the file is checksummed: write the new digest so the value check is reached
        import hashlib

        meta["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        meta["weights"]["bytes"] = weights.stat().st_size
        meta_path.write_text(json.dumps(meta))
    target = copy.deepcopy(bert)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        MoLoRAModel.from_pretrained(target, tmp_path / "c")
    assert_same_snapshot(before, snapshot(target))
