"""The PEFT interop matrix: architecture x LoRA variant. Each cell is a real PEFT adapter (saved by
PEFT's get_peft_model + save_pretrained on a tiny random model) that either composes exactly as
PEFT runs it (task routing with each adapter, a mixed batch of two adapters against PEFT's
``adapter_names=`` batch, and the export round-trip: ``export_peft(dir, {name: 1.0})`` reloaded by
``PeftModel`` equals PEFT on the original adapter), or is refused by an AdapterError naming the
config field or module with the model untouched; a cell PEFT or the architecture cannot have is
"n/a" with its reason. README's matrix is rendered from MATRIX (:func:`render_matrix`)."""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import molora
from molora.errors import AdapterError

from helpers import (assert_same_snapshot, make_peft_adapter, snapshot, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5,
                     tiny_unet)

peft = pytest.importorskip("peft")

BATCH, SEQ = 2, 5


@dataclass(frozen=True)
class Arch:
    """A tiny architecture and the names its cells target (PEFT suffix matching)."""

    label: str
    make: Callable[[], torch.nn.Module]
    targets: list[str]  # every projection PEFT users adapt on it
    regex: str  # the same kind of targets as one regex string
    params: list[str]  # target_parameters
    excluded: str  # one full module name for exclude_modules
    kept: str  # a non-LoRA module for modules_to_save
    embedding: str | None  # an nn.Embedding (trainable tokens, Embedding LoRA)
    conv: list[str] | None  # nn.Conv2d modules: 3x3, 3x3 strided, 1x1
    causal_lm: bool
    conv1d: bool  # transformers' Conv1D projections (weights [d_in, d_out])
    layers_pattern: str | None  # None: PEFT finds the layer index itself; "": there is none


ARCHS = {
    "bert": Arch("BERT", tiny_bert, ["query", "value", "intermediate.dense"], r".*\.(query|value)",
                 ["query.weight", "value.weight"], "encoder.layer.0.attention.self.value", "pooler.dense",
                 "word_embeddings", None, False, False, None),
    "gpt2": Arch("GPT-2 (Conv1D)", tiny_gpt2, ["c_attn", "c_fc"], r".*\.c_(attn|fc)", ["c_attn.weight"],
                 "transformer.h.0.mlp.c_fc", "ln_f", "wte", None, True, True, "h"),
    "llama": Arch("LLaMA", tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  r".*\.(q|v|down)_proj", ["q_proj.weight", "down_proj.weight"], "model.layers.1.self_attn.k_proj",
                  "norm", "embed_tokens", None, True, False, "layers"),
    "t5": Arch("T5", tiny_t5, ["q", "k", "v", "o", "wi", "wo"], r".*\.(q|v|wo)", ["q.weight", "wo.weight"],
               "decoder.block.0.layer.1.EncDecAttention.q", "final_layer_norm", "shared", None, False, False, "block"),
    "unet": Arch("UNet (diffusers)", tiny_unet, ["to_q", "to_k", "to_v", "to_out.0"], r".*\.to_(q|v)",
                 ["to_q.weight"], "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "conv_out", None,
                 ["conv_in", "downsamplers.0.conv", "conv_shortcut"], False, False, ""),
}


def inputs(arch: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    if arch == "unet":
        return (torch.randn(BATCH, 4, 8, 8, generator=g), torch.tensor([10, 700])), {
            "encoder_hidden_states": torch.randn(BATCH, 5, 16, generator=g)}
    ids = torch.randint(3, 101, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    kw = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = torch.randint(3, 101, (BATCH, 3), generator=g)
    return (), kw


def output(model, arch: str, **extra) -> torch.Tensor:
    args, kw = inputs(arch)
    with torch.no_grad():
        out = model(*args, **kw, **extra)
    if arch == "unet":
        return out.sample
    return out.logits if ARCHS[arch].causal_lm else out.last_hidden_state


@dataclass(frozen=True)
class NA:
    """A cell that cannot exist, and why. ``attempt``: the LoraConfig kwargs of a cell PEFT itself
    cannot build or save, which the cell's test tries, expecting PEFT's error ``error`` (so the cell
    is revisited when PEFT changes)."""

    reason: str
    attempt: dict | None = None
    error: str = ""


@dataclass(frozen=True)
class Row:
    """A LoRA variant: its LoraConfig kwargs on an architecture (or NA), and None if it composes
    exactly, else the regex the AdapterError must match. ``init``: PiSSA/OLoRA adapters are
    initialised from the base and saved converted (a delta on the original base) or not."""

    id: str
    label: str
    config: Callable[[Arch], dict | NA]
    refused: Callable[[Arch], str] | None = None
    init: str | None = None
    converted: bool = True
    # PEFT runs adapter_names= batches of it (else: rows of single-adapter runs); or per architecture
    peft_mixed: bool | Callable[[Arch], bool] = True


def _needs(field: str, reason: str, kw: Callable[[Arch], dict]) -> Callable[[Arch], dict | NA]:
    return lambda a: kw(a) if getattr(a, field) else NA(reason)


NO_CAUSAL = "aLoRA is for causal LMs (PEFT: task_type CAUSAL_LM)"
NO_EMBEDDING = "no nn.Embedding in the model"

MATRIX = [
    Row("plain", "plain LoRA", lambda a: dict(target_modules=a.targets)),
    Row("regex", "regex `target_modules`", lambda a: dict(target_modules=a.regex)),
    Row("rslora", "rsLoRA", lambda a: dict(target_modules=a.targets, use_rslora=True)),
    Row("patterns", "`rank_pattern` + `alpha_pattern`",
        lambda a: dict(target_modules=a.targets, rank_pattern={re.escape(a.targets[1]): 2},
                       alpha_pattern={re.escape(a.targets[0]): 3})),
    Row("layers", "`layers_to_transform` (+ `layers_pattern`)",
        lambda a: NA("no numbered layer list PEFT can index") if a.layers_pattern == "" else
        dict(target_modules=a.targets, layers_to_transform=[1],
             **({"layers_pattern": a.layers_pattern} if a.layers_pattern else {}))),
    Row("exclude", "`exclude_modules`", lambda a: dict(target_modules=a.targets, exclude_modules=[a.excluded])),
    Row("dropout", "`lora_dropout` (eval)", lambda a: dict(target_modules=a.targets, lora_dropout=0.3)),
    Row("target_parameters", "`target_parameters`", lambda a: dict(target_modules=[], target_parameters=a.params),
        peft_mixed=False),
    Row("pissa", "PiSSA, converted", lambda a: dict(target_modules=a.targets), init="pissa"),
    Row("olora", "OLoRA, converted", lambda a: NA(
        "PEFT's converted save fails on Conv1D (size mismatch)", dict(target_modules=a.targets), "size mismatch")
        if a.conv1d else dict(target_modules=a.targets), init="olora"),
    Row("dora", "DoRA", lambda a: dict(target_modules=a.targets, use_dora=True), peft_mixed=False),
    Row("alora", "aLoRA", _needs("causal_lm", NO_CAUSAL, lambda a: dict(
        target_modules=a.targets, task_type="CAUSAL_LM", alora_invocation_tokens=[5, 7])),
        lambda a: r"alora_invocation_tokens=\[5, 7\]: the adapter uses aLoRA"),
    Row("lora_bias", "`lora_bias`", lambda a: dict(target_modules=a.targets, lora_bias=True),
        lambda a: r"lora_bias=True: the adapter uses a bias on lora_B"),
    Row("bias_all", "`bias=\"all\"`", lambda a: dict(target_modules=a.targets, bias="all"), lambda a: r"bias='all'"),
    # the kept module trained in full (make_peft_adapter moves it): each adapter's own copy runs
    # (molora.routed_copies); PEFT mixes batches only of Linear/Embedding/Conv copies, not norms
    Row("modules_to_save", "`modules_to_save`", lambda a: dict(target_modules=a.targets, modules_to_save=[a.kept]),
        peft_mixed=lambda a: a.kept in ("pooler.dense", "conv_out")),
    # each adapter's trained rows (make_peft_adapter moves them) run per example (molora.routed_tokens)
    Row("trainable_tokens", "`trainable_token_indices`", _needs("embedding", NO_EMBEDDING, lambda a: dict(
        target_modules=a.targets, trainable_token_indices={a.embedding: [1, 2]}))),
    Row("embedding", "Embedding target (+ a linear)", _needs("embedding", NO_EMBEDDING, lambda a: dict(
        target_modules=[a.embedding, a.targets[0]]))),
    Row("conv2d", "Conv2d targets (+ a linear)", _needs("conv", "no nn.Conv2d in the model", lambda a: dict(
        target_modules=[*a.conv, a.targets[0]]))),
    Row("pissa_raw", "PiSSA, not converted", lambda a: dict(target_modules=a.targets), init="pissa", converted=False,
        refused=lambda a: r"init_lora_weights='pissa': the initialisation changes the base weights"),
    Row("olora_raw", "OLoRA, not converted", lambda a: dict(target_modules=a.targets), init="olora", converted=False,
        refused=lambda a: r"init_lora_weights='olora'"),
]


def cell(row: Row, arch: str) -> str:
    """The README text of a cell: "=" (exact), "refused" or "n/a"."""
    if isinstance(row.config(ARCHS[arch]), NA):
        return "n/a"
    return "=" if row.refused is None else "refused"


def render_matrix() -> str:
    """README's matrix (rows: variants, columns: architectures), then the reasons for n/a."""
    lines = ["| variant | " + " | ".join(a.label for a in ARCHS.values()) + " |",
             "|---|" + "---|" * len(ARCHS)]
    lines += [f"| {row.label} | " + " | ".join(cell(row, k) for k in ARCHS) + " |" for row in MATRIX]
    reasons = {}
    for row in MATRIX:
        for k, a in ARCHS.items():
            c = row.config(a)
            if isinstance(c, NA):
                reasons.setdefault((row.label, c.reason), []).append(a.label)
    notes = "; ".join(f"{label} on {', '.join(archs)}: {reason}" for (label, reason), archs in reasons.items())
    return "\n".join(lines) + f"\n\nn/a: {notes}."


@functools.cache
def _base(arch: str) -> torch.nn.Module:
    return ARCHS[arch].make()  # built once per architecture; every use is a deepcopy


def base_model(arch: str) -> torch.nn.Module:
    return copy.deepcopy(_base(arch))


def make_adapter(row: Row, arch: str, path: Path, seed: int, kw: dict | None = None) -> Path:
    """The cell's PEFT adapter (LoraConfig ``kw``, default: the cell's). PiSSA/OLoRA follow PEFT's
    recipe: save the initial state as plain LoRA, "train" (move B), save converted against it
    (``path_initial_model_for_weight_conversion``)."""
    kw = row.config(ARCHS[arch]) if kw is None else kw
    base = base_model(arch)
    if row.init is None:
        return make_peft_adapter(base, path, seed=seed, **kw)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=row.init, **kw))
    init = path.parent / f"{path.name}-init"
    if row.converted:
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(str(init))
        pm.peft_config["default"].init_lora_weights = row.init
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * p.shape[1] ** -0.5 * torch.randn_like(p))
    pm.save_pretrained(str(path), **({"path_initial_model_for_weight_conversion": str(init)} if row.converted else {}))
    return path


CELLS = [(row, arch) for row in MATRIX for arch in ARCHS
         if not isinstance(c := row.config(ARCHS[arch]), NA) or c.attempt is not None]


@pytest.mark.parametrize("row, arch", CELLS, ids=[f"{row.id}-{arch}" for row, arch in CELLS])
def test_matrix_cell_equals_peft_or_is_refused(tmp_path, row, arch):
    from peft import PeftModel

    base = base_model(arch)
    na = row.config(ARCHS[arch])
    if isinstance(na, NA):  # PEFT itself cannot: n/a until it can
        with pytest.raises(Exception, match=na.error):
            make_adapter(row, arch, tmp_path / "a", seed=3, kw=na.attempt)
        return
    a = make_adapter(row, arch, tmp_path / "a", seed=3)
    if row.refused is not None:
        before = snapshot(base)
        with pytest.raises(AdapterError, match=row.refused(ARCHS[arch])):
            molora.compose(base, {"a": a}, router="task")
        assert_same_snapshot(before, snapshot(base))
        assert not any(type(m).__module__.startswith("molora") for m in base.modules())
        return
    b = make_adapter(row, arch, tmp_path / "b", seed=4)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(a), adapter_name="a")
    pm.load_adapter(str(b), adapter_name="b")
    pm.eval()
    refs = []
    for name in ("a", "b"):
        pm.set_adapter(name)
        refs.append(output(pm, arch))
    plain = output(base, arch)
    assert all(not torch.allclose(r, plain, atol=1e-3) for r in refs), "each adapter must change the output"
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)

    model = molora.compose(copy.deepcopy(base), {"a": a, "b": b}, router="task")
    from peft.tuners.lora import LoraLayer

    peft_layers = {n: type(m.get_base_layer()) for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert {n: type(m.base_layer) for n, m in model.routed_layers().items()} == peft_layers  # every module PEFT adapts
    for i, ref in enumerate(refs):
        with model.routing(task_ids=[i] * BATCH):
            torch.testing.assert_close(output(model, arch), ref, atol=1e-5, rtol=1e-5)

    if row.peft_mixed(ARCHS[arch]) if callable(row.peft_mixed) else row.peft_mixed:
        mixed_ref = output(pm, arch, adapter_names=["b", "a"])
    else:  # PEFT refuses the mixed batch: the reference is row i of adapter i's run
        with pytest.raises((ValueError, TypeError)):
            output(pm, arch, adapter_names=["b", "a"])
        mixed_ref = torch.stack([refs[1][0], refs[0][1]])
    with model.routing(task_ids=[1, 0]):
        torch.testing.assert_close(output(model, arch), mixed_ref, atol=1e-5, rtol=1e-5)

    model.export_peft(str(tmp_path / "export"), {"a": 1.0})
    exported = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "export")).eval()
    torch.testing.assert_close(output(exported, arch), refs[0], atol=1e-5, rtol=1e-5)


def test_readme_shows_the_rendered_matrix():
    """README's matrix is MATRIX rendered (so it cannot drift from what the tests check)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render_matrix() in readme, "README's PEFT matrix is stale: paste render_matrix()'s output"
    table = [line for line in readme.splitlines() if line.startswith("| variant | ")]
    assert len(table) == 1


def tiny_linear():
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(12, 10))
    return base.eval()


def _linear_output(model):
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


def test_alora_on_its_own_is_refused_before_anything_else(tmp_path):
    """The silently-wrong case of issue 14: aLoRA used to compose as plain LoRA."""
    d = make_peft_adapter(tiny_gpt2(), tmp_path / "al", seed=1, target_modules=["c_attn"], task_type="CAUSAL_LM",
                          alora_invocation_tokens=[3])
    with pytest.raises(AdapterError, match=rf"^adapter 'al': {re.escape(str(d / 'adapter_config.json'))}: "
                                           r"alora_invocation_tokens=\[3\]"):
        molora.load_peft_adapter(d)


def test_field_unknown_to_this_peft_is_refused_unless_off(tmp_path):
    """A field a newer PEFT saved (PEFT itself only warns and drops it) is refused when it is set."""
    d = make_peft_adapter(tiny_linear(), tmp_path / "new", seed=1, r=2, target_modules=["proj"])
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_future_variant": None}))
    molora.load_peft_adapter(d)  # off: same forward
    cfg_path.write_text(json.dumps({**cfg, "use_future_variant": True}))
    with pytest.raises(AdapterError, match=r"use_future_variant=True: a field this PEFT .* does not know"):
        molora.load_peft_adapter(d)


def test_peft_rejecting_a_value_is_an_adapter_error(tmp_path):
    """PEFT's own validation (here: layers_pattern without layers_to_transform) is wrapped."""
    d = make_peft_adapter(tiny_linear(), tmp_path / "v", seed=1, r=2, target_modules=["proj"])
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "layers_pattern": "layers", "layers_to_transform": None}))
    with pytest.raises(AdapterError, match=rf"^adapter 'v': {re.escape(str(cfg_path))}: PEFT cannot read it: ValueError"):
        molora.load_peft_adapter(d)


def _cache_repo(cache, repo_id, files_by_folder, sha="0123456789abcdef0123456789abcdef01234567"):
    """A Hub cache as huggingface_hub lays it out: models--user--repo/{refs/main, snapshots/<sha>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    for sub, src in files_by_folder.items():
        dest = repo / "snapshots" / sha / sub
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (dest / f).write_bytes((src / f).read_bytes())
    return sha


def test_hub_id_resolves_offline_through_the_cache(tmp_path, monkeypatch):
    """load_peft_adapter("user/repo") (and compose) read a cached Hub adapter with HF_HUB_OFFLINE,
    at a revision and in a subfolder; a missing id is a clear AdapterError."""
    from huggingface_hub import constants

    base = tiny_linear()
    a = make_peft_adapter(base, tmp_path / "a", seed=1, r=2, target_modules=["proj"])
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=3, target_modules=["proj"])
    cache = tmp_path / "hub"
    sha = _cache_repo(cache, "user/repo", {"": a, "sub": b})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    local_a, local_b = molora.load_peft_adapter(a), molora.load_peft_adapter(b)
    hub_a = molora.load_peft_adapter("user/repo")
    assert hub_a.name == "repo" and torch.equal(hub_a.modules["proj"].A, local_a.modules["proj"].A)
    hub_b = molora.load_peft_adapter("user/repo", subfolder="sub", revision=sha)
    assert hub_b.name == "sub" and torch.equal(hub_b.modules["proj"].B, local_b.modules["proj"].B)
    model = molora.compose(copy.deepcopy(base), {"a": "user/repo"}, router="task")
    with model.routing(task_ids=[0, 0, 0]):
        out = _linear_output(model)
    from peft import PeftModel

    torch.testing.assert_close(out, _linear_output(PeftModel.from_pretrained(copy.deepcopy(base), str(a))),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterError, match=r"'user/missing' is neither a local folder nor a Hugging Face Hub adapter "
                                           r"that can be read offline from the cache"):
        molora.load_peft_adapter("user/missing")
    with pytest.raises(AdapterError, match="neither a local folder"):
        molora.load_peft_adapter("user/repo", revision="f" * 40)
    with pytest.raises(AdapterError, match=r"folder .*nope does not exist"):
        molora.load_peft_adapter("user/repo", subfolder="nope")
