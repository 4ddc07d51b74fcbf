"""Every router round-trips through save_pretrained / from_pretrained (issue 13).

For each router registered in :data:`molora.routers.ROUTERS` (per-layer and shared kinds), for
routers installed after construction (``set_router``, ``install_router``, X-LoRA style), after
``add_expert`` and after ``merge``: the loaded model gives bit-equal outputs, holds equal adapter
tensors, the same config and router configs, and the same router sharing. What a checkpoint
could not rebuild, ``save_pretrained`` refuses before it writes anything.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.errors import CheckpointError
from molora.persistence import CONFIG_NAME
from molora.routers import ROUTERS, RetrievalRouter, SoftRouter, StaticRouter
from molora.train_router import install_router
from molora.xlora_style import XLoRAStyleClassifier, XLoRAStyleRouter, attach_xlora_style

from helpers import model_inputs, tiny_bert

E, D, CTX = 4, 32, 6  # experts, tiny BERT width, width of the caller's context embeddings
TARGETS = ["query", "value"]
LAYER = "encoder.layer.1.attention.self.value"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _emb(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, CTX, generator=_gen(5))


def _spd(n: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=_gen(9))
    return a @ a.T / n + torch.eye(n)


def _keys(m, width=CTX):
    m.shared_router.set_keys(torch.randn(m.num_experts, width, generator=_gen(2)))


def _centroids(router) -> None:
    """A fitted cluster router without k-means (what fit() leaves: centroids, their experts)."""
    with torch.no_grad():
        router.centroids.copy_(torch.nn.functional.normalize(torch.randn(router.centroids.shape, generator=_gen(3)), dim=-1))
        router.cluster_experts.copy_(torch.tensor([2, 0, 1]))
        router.fitted.fill_(True)


# case -> (config kwargs, routing signals, setup(model) before the first forward)
CASES = {
    "soft": ({}, {}, None),
    "soft-sequence": ({"router": "soft", "router_kwargs": {"granularity": "sequence", "temperature": 0.7}}, {}, None),
    "soft-context": ({"router": "soft", "router_kwargs": {"granularity": "context", "context_dim": CTX}},
                     {"embeddings": _emb()}, None),
    "soft-mola": ({"router": "soft", "layer_overrides": {r"layer\.1\.attention\.self\.value": {"num_experts": 2, "rank": 3}}},
                  {}, None),
    "soft-hydra": ({"router": "soft", "shared_a": True}, {}, None),
    "topk": ({"top_k": 2, "router_kwargs": {"noise_std": 0.1, "jitter": 0.01}}, {}, None),
    "topp": ({"router_kwargs": {"top_p": 0.5}}, {}, None),
    "switch": ({"router_kwargs": {"capacity_factor": 1.0}}, {}, None),
    "task": ({"router_kwargs": {"mapping": [3, 2, 1, 0], "fallback": 1}}, {"task_ids": [0, 3, 1]}, None),
    "static": ({"router_kwargs": {"weights": [0.5, -0.25, 1.5, 0.125]}}, {}, None),
    "mixture": ({}, {"expert_weights": [[0.5, 0.0, 0.0, -1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]}, None),
    "retrieval": ({"router_kwargs": {"key_dim": CTX, "top_k": 2, "temperature": 0.5}}, {"embeddings": _emb()}, _keys),
    "retrieval-hidden": ({"router": "retrieval", "router_kwargs": {"source": "hidden", "top_k": 1}}, {},
                         lambda m: _keys(m, D)),
    "retrieval-mahalanobis": ({"router": "retrieval", "router_kwargs": {"key_dim": CTX, "metric": "mahalanobis", "top_k": 2}},
                              {"embeddings": _emb()},
                              lambda m: m.shared_router.set_keys(torch.randn(E, CTX, generator=_gen(2)), _spd(CTX), 17)),
    "timestep": ({"router_kwargs": {"intervals": [1, 3], "num_timesteps": 100}}, {"timesteps": [0, 50, 99]}, None),
    "tlora": ({"rank": 1, "router_kwargs": {"num_timesteps": 100, "min_rank": 1, "exponent": 1.5}},
              {"timesteps": [0, 50, 99]}, None),
    "cluster": ({"router_kwargs": {"key_dim": CTX, "universal_expert": 3, "universal_gate": 0.5}}, {"embeddings": _emb()},
                lambda m: _centroids(m.shared_router)),
    "weights": ({"router_kwargs": {"normalize": "softmax"}}, {}, None),
    "arrow": ({"top_k": 2, "router_kwargs": {"temperature": 0.5}}, {}, None),
}


def _randomize(model: MoLoRAModel, seed: int = 7) -> None:
    """Non-trivial values for every trainable tensor (B starts at zero, routers at uniform)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _build(case: str) -> tuple[MoLoRAModel, dict]:
    kwargs, signals, setup = CASES[case]
    kwargs = {"router": case, "rank": 2, **kwargs}
    model = get_molora_model(tiny_bert(), MoLoRAConfig(target_modules=TARGETS, num_experts=E, **kwargs))
    if setup is not None:
        setup(model)
    _randomize(model)
    return model.eval(), signals


def _out(model: MoLoRAModel, signals: dict) -> torch.Tensor:
    with torch.no_grad(), model.routing(**signals):
        return model(**model_inputs("bert")).last_hidden_state


def _routers(model: MoLoRAModel) -> list:
    """Per layer: (router class, config, index of the first layer holding the same object)."""
    layers = list(model.routed_layers().values())
    ids = [id(layer.router) for layer in layers]
    return [(type(layer.router).__name__, layer.router.get_config() if layer.router is not None else None, ids.index(i))
            for layer, i in zip(layers, ids)]


def round_trip(model: MoLoRAModel, signals: dict, folder) -> MoLoRAModel:
    """Save ``model``, load it onto a fresh base, assert it is the same model; return it."""
    ref = _out(model, signals)
    model.save_pretrained(str(folder / "a"))
    loaded = MoLoRAModel.from_pretrained(tiny_bert(), str(folder / "a")).eval()
    assert torch.equal(_out(loaded, signals), ref)
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.molora_config.to_dict() == model.molora_config.to_dict()
    assert loaded.expert_names == model.expert_names
    assert _routers(loaded) == _routers(model)
    if model.shared_router is None:
        assert loaded.shared_router is None
    else:
        assert type(loaded.shared_router) is type(model.shared_router)
        assert loaded.shared_router.get_config() == model.shared_router.get_config()
    assert [(n, p.requires_grad) for n, p in loaded.named_parameters()] == [(n, p.requires_grad) for n, p in model.named_parameters()]
    assert loaded.merged == model.merged
    # saving the loaded model writes the same checkpoint
    loaded.save_pretrained(str(folder / "b"))
    assert (folder / "a" / CONFIG_NAME).read_bytes() == (folder / "b" / CONFIG_NAME).read_bytes()
    return loaded


def test_every_registered_router_has_a_case():
    assert set(ROUTERS) <= {kw.get("router", case) for case, (kw, _, _) in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_router_round_trip(case, tmp_path):
    model, signals = _build(case)
    with model.disable_adapters():
        plain = _out(model, signals)
    assert not torch.equal(_out(model, signals), plain)  # the experts change the output
    round_trip(model, signals, tmp_path)


# ---------------------------------------------------------------------- routers installed later
def test_set_router_static(tmp_path):
    model, _ = _build("soft")
    model.set_router(StaticRouter(E, D, weights=[1.0, 0.0, -0.5, 2.0]))
    round_trip(model, {}, tmp_path)


@pytest.mark.parametrize("metric", ["cosine", "mahalanobis"])
def test_set_router_retrieval_with_fitted_keys(tmp_path, metric):
    model, _ = _build("task")
    router = RetrievalRouter(E, D, top_k=2, key_dim=CTX, metric=metric, temperature=0.3)
    if metric == "cosine":
        for e in range(E):
            router.fit_keys(e, torch.randn(5, CTX, generator=_gen(20 + e)))
    else:
        router.set_keys(torch.randn(E, CTX, generator=_gen(2)), _spd(CTX), 11)
    model.set_router(router)
    round_trip(model, {"embeddings": _emb()}, tmp_path)


@pytest.mark.parametrize("kind", ["per_layer", "shared", "weights"])
def test_install_router(tmp_path, kind):
    model, _ = _build("task")
    install_router(model, kind, granularity="token", temperature=0.5)
    _randomize(model, seed=11)
    loaded = round_trip(model, {}, tmp_path)
    routers = {id(layer.router) for layer in loaded.routed_layers().values()}
    assert len(routers) == {"per_layer": 4, "shared": 1, "weights": 1}[kind]  # "shared": one router object again


@pytest.mark.parametrize("case", ["soft", "topk", "task", "static", "retrieval", "weights", "timestep", "arrow"])
def test_add_expert_then_round_trip(tmp_path, case):
    model, signals = _build(case)
    if case == "timestep":  # the interval layout does not grow
        with pytest.raises(Exception):
            model.add_expert("new")
        return
    model.add_expert("new", rank=3)
    if case == "retrieval":
        model.shared_router.fit_keys(E, torch.randn(4, CTX, generator=_gen(4)))
    _randomize(model, seed=12)
    if case == "task":
        signals = {"task_ids": [0, 4, 2]}
    loaded = round_trip(model, signals, tmp_path)
    assert loaded.num_experts == E + 1 and loaded.expert_names[-1] == "new"


def test_merged_model_loads_merged(tmp_path):
    model, _ = _build("soft")
    routed = _out(model, {})
    model.merge([0.5, 0.25, -0.5, 1.0])
    merged = _out(model, {})
    assert not torch.equal(merged, routed)
    loaded = round_trip(model, {}, tmp_path)
    assert loaded.merged and torch.equal(_out(loaded, {}), merged)
    base = tiny_bert()
    for name, layer in loaded.routed_layers().items():  # bit-equal merged base weights
        assert torch.equal(layer.base_layer.weight, model.routed_layers()[name].base_layer.weight)
        assert not torch.equal(layer.base_layer.weight, base.get_submodule(name).weight)
    loaded.unmerge()
    assert torch.equal(_out(loaded, {}), routed)
    # the merged base itself is refused (it already holds the mixture)
    with pytest.raises(CheckpointError, match="already has the checkpoint's merged mixture"):
        MoLoRAModel.from_pretrained(model.unload(), str(tmp_path / "a"))


# ---------------------------------------------------------------------- X-LoRA style
@pytest.mark.parametrize("hidden", [0, 8])
def test_xlora_style_round_trip(tmp_path, hidden):
    model, _ = _build("soft")
    clf = attach_xlora_style(model, hidden=hidden, temperature=0.7)
    _randomize(model, seed=13)
    assert any(p.abs().sum() > 0 for p in clf.parameters())
    loaded = round_trip(model, {}, tmp_path)
    routers = [layer.router for layer in loaded.routed_layers().values()]
    assert all(type(r) is XLoRAStyleRouter for r in routers)
    assert len({id(r.classifier) for r in routers}) == 1 and type(routers[0].classifier) is XLoRAStyleClassifier
    assert [r.layer_index for r in routers] == list(range(4))
    loaded_clf = routers[0].classifier
    assert (loaded_clf.hidden, loaded_clf.temperature) == (hidden, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), loaded_clf.state_dict().values()))
    # the classifier is saved once per layer key and must agree under every key
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["xlora_style"] == {"d_in": D, "num_layers": 4, "num_experts": E, "hidden": hidden,
                                   "temperature": 0.7, "dtype": "float32"}


def test_xlora_style_with_per_layer_expert_subsets(tmp_path):
    model, _ = _build("soft-mola")
    attach_xlora_style(model, hidden=4)
    _randomize(model, seed=14)
    loaded = round_trip(model, {}, tmp_path)
    assert loaded.routed_layers()[LAYER].router.expert_ids == [0, 1]


def test_xlora_style_tampered_classifier_copies_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _build("soft")
    attach_xlora_style(model, hidden=0)
    _randomize(model, seed=15)
    model.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    path = tmp_path / meta["weights"]["file"]
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith(LAYER) and "classifier" in k)
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(path), metadata={"format": "molora"})
    blob = path.read_bytes()
    import hashlib

    meta["weights"].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="one shared tensor of the model but differ"):
        MoLoRAModel.from_pretrained(tiny_bert(), str(tmp_path))


# ---------------------------------------------------------------------- refusals
def _refused(model: MoLoRAModel, tmp_path, match: str) -> None:
    """save_pretrained refuses: into a new folder (not even created) and over an existing
    checkpoint (left byte for byte as it was)."""
    with pytest.raises(CheckpointError, match=match) as info:
        model.save_pretrained(str(tmp_path / "new"))
    assert "nothing was written" in str(info.value)
    assert not (tmp_path / "new").exists()
    good, _ = _build("soft")
    good.save_pretrained(str(tmp_path / "old"))
    before = {n: (tmp_path / "old" / n).read_bytes() for n in os.listdir(tmp_path / "old")}
    with pytest.raises(CheckpointError, match=match):
        model.save_pretrained(str(tmp_path / "old"))
    assert {n: (tmp_path / "old" / n).read_bytes() for n in os.listdir(tmp_path / "old")} == before


class UnregisteredRouter(SoftRouter):
    name = "my_soft"


class ImpostorRouter(SoftRouter):
    """Claims the name of a registered router but is another class."""


class TensorConfigRouter(SoftRouter):
    name = "tensor_config"

    def __init__(self, num_experts, d_in, table=None, **kw):
        super().__init__(num_experts, d_in, **kw)
        self.table = torch.zeros(num_experts) if table is None else table

    def get_config(self):
        return {**super().get_config(), "table": self.table}


class HiddenStateRouter(StaticRouter):
    """Its non-persistent weights come from an argument get_config() leaves out."""

    name = "hidden_state"

    def __init__(self, num_experts, d_in, scale: float = 1.0):
        super().__init__(num_experts, d_in, weights=[scale] * num_experts)

    def get_config(self):
        return {}


class ForgetfulRouter(SoftRouter):
    """Leaves its context width out of get_config(): a rebuilt one has another projection."""

    name = "forgetful"

    def get_config(self):
        return {"temperature": self.temperature}


def _per_layer(model, cls, **kw):
    model.set_layer_routers(lambda _, layer: cls(layer.bank.num_experts, layer.bank.d_in, **kw), cls.name)


def test_unregistered_router_is_refused(tmp_path):
    model, _ = _build("soft")
    _per_layer(model, UnregisteredRouter)
    _refused(model, tmp_path, r"UnregisteredRouter and no router is registered as 'my_soft'.*register_router")


def test_router_of_another_class_under_a_registered_name_is_refused(tmp_path):
    model, _ = _build("soft")
    _per_layer(model, ImpostorRouter)
    _refused(model, tmp_path, r"ImpostorRouter and the router registered as 'soft' is SoftRouter")


def test_registered_router_with_non_json_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(ROUTERS, TensorConfigRouter.name, TensorConfigRouter)
    model, _ = _build("soft")
    _per_layer(model, TensorConfigRouter)
    _refused(model, tmp_path, r"get_config\(\) is not JSON")


def test_registered_router_whose_config_does_not_rebuild_it_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(ROUTERS, HiddenStateRouter.name, HiddenStateRouter)
    model, _ = _build("soft")
    model.set_router(HiddenStateRouter(E, D, scale=2.0))
    _refused(model, tmp_path, r"unsaved buffers \['_w'\] differ")
    model.set_router(HiddenStateRouter(E, D, scale=1.0))  # the default: rebuilt exactly, so it saves
    round_trip(model, {}, tmp_path)


def test_registered_router_whose_config_misses_a_size_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(ROUTERS, ForgetfulRouter.name, ForgetfulRouter)
    model, _ = _build("soft")
    _per_layer(model, ForgetfulRouter, granularity="context", context_dim=CTX)
    _refused(model, tmp_path, r"whose tensors a rebuilt one would not hold .*proj.weight")


def test_saving_draws_no_random_numbers(tmp_path):
    model, _ = _build("timestep")  # parameters in the shared router and in no per-layer one
    install_router(model, "per_layer")
    state = torch.random.get_rng_state()
    model.save_pretrained(str(tmp_path))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_registered_custom_router_round_trips(tmp_path, monkeypatch):
    monkeypatch.setitem(ROUTERS, UnregisteredRouter.name, UnregisteredRouter)
    model, _ = _build("soft")
    _per_layer(model, UnregisteredRouter, temperature=0.5)
    _randomize(model, seed=16)
    round_trip(model, {}, tmp_path)


def test_xlora_style_with_two_classifiers_is_refused(tmp_path):
    model, _ = _build("soft")
    attach_xlora_style(model, hidden=4)
    layer = model.routed_layers()[LAYER]
    other = XLoRAStyleClassifier(D, 4, E, hidden=4)
    layer.router = XLoRAStyleRouter(E, D, other, 3)
    _refused(model, tmp_path, r"do not share one XLoRAStyleClassifier \(2 classifiers\)")


def test_xlora_style_classifier_subclass_is_refused(tmp_path):
    class MyClassifier(XLoRAStyleClassifier):
        pass

    model, _ = _build("soft")
    clf = MyClassifier(D, 4, E, hidden=0)
    layers = model.routed_layers()
    index = {p: i for i, p in enumerate(layers)}
    model.set_layer_routers(lambda p, layer: XLoRAStyleRouter(E, D, clf, index[p]), "xlora_style", {"hidden": 0})
    _refused(model, tmp_path, r"MyClassifier classifier, not an XLoRAStyleClassifier: save classifier.state_dict\(\)")
