"""Every number, tensor and name that enters molora is validated with an error naming it (issue 13).

The shared validators of molora.checks, then each entry point: MoLoRAConfig (and from_dict),
compose's adapter names, export_peft, the retrieval routers and managers, the timestep routers,
LoRAHub's weights, and a batch of size 0 through the per-example routers. Adapter folders are in
test_peft_interop.py, the command line in test_cli.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import molora
from molora.checks import finite_number, finite_tensor, mixture_weights, positive_int, unique_names
from molora.errors import AdapterError, CheckpointError, MoLoRAError, RoutingError

from helpers import make_peft_adapter, tiny_bert

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------- molora.checks
@pytest.mark.parametrize("value", [NAN, INF, -INF, True, None, "1.0", [1.0], torch.tensor([1.0, 2.0]), np.float64("nan")])
def test_finite_number_refuses(value):
    with pytest.raises(MoLoRAError, match=r"^where: temperature must be"):
        finite_number(value, "where", "temperature")


def test_finite_number_accepts_and_bounds():
    assert finite_number(2, "w", "f") == 2.0 and isinstance(finite_number(2, "w", "f"), float)
    assert finite_number(np.float32(0.5), "w", "f") == 0.5
    assert finite_number(torch.tensor(3.0), "w", "f") == 3.0
    with pytest.raises(MoLoRAError, match="f must be > 0"):
        finite_number(0.0, "w", "f", low=0.0, low_open=True)
    with pytest.raises(MoLoRAError, match="f must be < 1"):
        finite_number(1.0, "w", "f", high=1.0, high_open=True)
    with pytest.raises(RoutingError):  # the caller's narrower error class
        finite_number(NAN, "w", "f", error=RoutingError)


@pytest.mark.parametrize("value", [0, -1, True, 8.0, "8", None])
def test_positive_int_refuses(value):
    with pytest.raises(MoLoRAError, match="rank must be a positive int"):
        positive_int(value, "w", "rank")


def test_finite_tensor():
    t = torch.ones(2, 3)
    assert finite_tensor(t, "w", "keys") is t
    assert finite_tensor([[1, 2]], "w", "keys").shape == (1, 2)
    assert finite_tensor(torch.arange(3), "w", "ids").dtype == torch.long  # integers are always finite
    t[0, 1], t[1, 2] = NAN, INF
    with pytest.raises(MoLoRAError, match=r"w: keys contains NaN or inf \(1 NaN, 1 inf of 6 entries, shape \(2, 3\)\)"):
        finite_tensor(t, "w", "keys")
    with pytest.raises(MoLoRAError, match="keys must be a numeric tensor"):
        finite_tensor(torch.ones(2, dtype=torch.bool), "w", "keys")
    with pytest.raises(MoLoRAError, match="keys must be a numeric tensor"):
        finite_tensor("abc", "w", "keys")


def test_mixture_weights():
    names = ["a", "b", "c"]
    assert mixture_weights({"b": 2}, names, "w") == [0.0, 2.0, 0.0]
    assert mixture_weights([1, 2, 3], names, "w") == [1.0, 2.0, 3.0]
    assert mixture_weights(torch.tensor([1.0, 0.0, 0.5]), names, "w") == [1.0, 0.0, 0.5]
    assert mixture_weights(np.array([1.0, 0.0, 0.5]), names, "w") == [1.0, 0.0, 0.5]
    with pytest.raises(MoLoRAError, match=r"merge: weight of expert 'b' must be a finite number; got nan"):
        mixture_weights({"a": 1.0, "b": NAN}, names, "merge")
    with pytest.raises(MoLoRAError, match=r"weight of expert 'c' must be a finite number; got inf"):
        mixture_weights([0, 1, INF], names, "merge")
    with pytest.raises(MoLoRAError, match=r"unknown experts \['z'\]; experts are \['a', 'b', 'c'\]"):
        mixture_weights({"a": 1.0, "z": 1.0}, names, "merge")
    with pytest.raises(MoLoRAError, match="expected 3 weights"):
        mixture_weights([1.0, 2.0], names, "merge")
    with pytest.raises(MoLoRAError, match="weight of expert 'a' must be a number"):
        mixture_weights({"a": True}, names, "merge")
    with pytest.raises(MoLoRAError, match="weights must map expert names"):
        mixture_weights("abc", names, "merge")


def test_unique_names():
    assert unique_names(("a", "b"), "w") == ["a", "b"]
    with pytest.raises(MoLoRAError, match=r"w: names must be distinct; duplicated: 'a' x3, 'b' x2"):
        unique_names(["a", "b", "a", "b", "a", "c"], "w")
    with pytest.raises(MoLoRAError, match="must be non-empty strings"):
        unique_names(["a", ""], "w")
    with pytest.raises(MoLoRAError, match="must be non-empty strings"):
        unique_names(["a", 3], "w")
    with pytest.raises(MoLoRAError, match="not one string"):
        unique_names("ab", "w")


# ---------------------------------------------------------------------- MoLoRAConfig
@pytest.mark.parametrize("field, value, message", [
    ("alpha", NAN, "alpha must be a finite number"),
    ("alpha", INF, "alpha must be a finite number"),
    ("alpha", "16", "alpha must be a number"),
    ("dropout", NAN, "dropout must be a finite number"),
    ("dropout", 1.0, "dropout must be < 1"),
    ("rank", NAN, "rank must be a positive int"),
    ("rank", 8.0, "rank must be a positive int"),
    ("rank", True, "rank must be a positive int"),
    ("num_experts", "4", "num_experts must be a positive int"),
    ("top_k", True, "top_k must be a positive int"),
    ("aux_loss_coef", NAN, "aux_loss_coef must be a finite number"),
    ("z_loss_coef", -INF, "z_loss_coef must be a finite number"),
    ("localized_alpha", NAN, "localized_alpha must be a finite number"),
    ("router_kwargs", {"temperature": NAN}, r"router_kwargs\['temperature'\] must be a finite number"),
    ("router_kwargs", {"weights": [1.0, INF]}, r"router_kwargs\['weights'\]\[1\] must be a finite number"),
    ("router_kwargs", ["temperature"], "router_kwargs must be a dict"),
    ("layer_overrides", {"query": {"alpha": NAN}}, r"layer_overrides\['query'\]: alpha must be a finite number"),
    ("layer_overrides", {"query": {"rank": INF}}, r"layer_overrides\['query'\]: rank must be a positive int"),
    ("layer_overrides", {"query": [4]}, "layer_overrides must map patterns to dicts"),
    ("expert_names", ["a", "a", "b", "c"], r"expert_names must be distinct; duplicated: 'a' x2"),
    ("expert_names", ["a", "", "b", "c"], "expert_names must be non-empty strings"),
    ("use_rslora", "yes", "use_rslora must be true or false"),
    ("init", "xavier", "init must be one of"),
    ("adapter_dtype", 32, "adapter_dtype must be a dtype name"),
])
def test_config_refuses_bad_numbers_naming_the_field(field, value, message):
    with pytest.raises(MoLoRAError, match=rf"^MoLoRAConfig: .*{message}"):
        molora.MoLoRAConfig(target_modules=["query"], **{field: value})


def test_config_from_dict_names_bad_fields():
    good = molora.MoLoRAConfig(target_modules=["query"], router="topk", top_k=2).to_dict()
    assert molora.MoLoRAConfig.from_dict(copy.deepcopy(good)) == molora.MoLoRAConfig.from_dict(good)
    with pytest.raises(MoLoRAError, match=r"unknown fields \['rnak'\]"):
        molora.MoLoRAConfig.from_dict({**good, "rnak": 4})
    missing = dict(good)
    del missing["target_modules"]
    with pytest.raises(MoLoRAError, match=r"missing fields \['target_modules'\]"):
        molora.MoLoRAConfig.from_dict(missing)
    with pytest.raises(MoLoRAError, match="rank must be a positive int; got '8'"):
        molora.MoLoRAConfig.from_dict({**good, "rank": "8"})
    with pytest.raises(MoLoRAError, match="alpha must be a number; got None"):
        molora.MoLoRAConfig.from_dict({**good, "alpha": None})
    with pytest.raises(MoLoRAError, match="layer_overrides must map patterns to dicts"):
        molora.MoLoRAConfig.from_dict({**good, "layer_overrides": [["query", 4]]})
    with pytest.raises(MoLoRAError, match="must be a JSON object"):
        molora.MoLoRAConfig.from_dict([good])


# ---------------------------------------------------------------------- compose: adapter names
@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two different adapters in folders with the same last component (``x/lora``, ``y/lora``)."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("names")
    base = tiny_bert()
    return base, make_peft_adapter(base, root / "x" / "lora", seed=1, target_modules=["query"]), \
        make_peft_adapter(base, root / "y" / "lora", seed=2, target_modules=["query"])


def test_compose_refuses_repeated_folder_names(two_adapters):
    base, a, b = two_adapters
    names_before = [n for n, _ in base.named_modules()]
    with pytest.raises(AdapterError, match=rf"names repeat: 'lora': \['{a}', '{b}'\]; pass {{name: folder}}"):
        molora.compose(base, [a, b])
    with pytest.raises(AdapterError, match="names repeat: 'lora'"):
        molora.compose(base, [a, a])  # the same folder twice
    assert [n for n, _ in base.named_modules()] == names_before  # nothing changed
    model = molora.compose(copy.deepcopy(base), {"x": a, "y": b}, router="task")  # named: both are kept
    assert model.expert_names == ["x", "y"] and model.num_experts == 2


@pytest.mark.parametrize("adapters, message", [
    ({"": "x"}, "adapter names must be non-empty strings"),
    ({3: "x"}, "adapter names must be non-empty strings"),
    ("some/folder", "got one path"),
    ([], "needs at least one adapter"),
    ([3], "adapter folders must be paths"),
    (["/"], "cannot name the adapter folder"),
])
def test_compose_refuses_bad_names(adapters, message):
    with pytest.raises(MoLoRAError, match=message):
        molora.compose(tiny_bert(), adapters)


def test_compose_refuses_nan_settings(two_adapters):
    base, a, _ = two_adapters
    with pytest.raises(MoLoRAError, match=r"router_kwargs\['temperature'\] must be a finite number"):
        molora.compose(copy.deepcopy(base), {"a": a}, router="soft", temperature=NAN)
    with pytest.raises(MoLoRAError, match="dropout must be a finite number"):
        molora.compose(copy.deepcopy(base), {"a": a}, dropout=NAN)


# ---------------------------------------------------------------------- export_peft
@pytest.fixture
def composed(two_adapters):
    base, a, b = two_adapters
    return molora.compose(copy.deepcopy(base), {"a": a, "b": b}, router="task")


@pytest.mark.parametrize("weights, message", [
    ({"a": NAN}, r"weight of expert 'a' must be a finite number; got nan"),
    ({"a": 1.0, "b": INF}, r"weight of expert 'b' must be a finite number; got inf"),
    ([1.0, -INF], r"weight of expert 'b' must be a finite number"),
    ({"a": 1.0, "zz": 1.0}, r"unknown experts \['zz'\]; experts are \['a', 'b'\]"),
    ([1.0], "expected 2 weights"),
    ({"a": "1"}, "weight of expert 'a' must be a number"),
])
def test_export_refuses_bad_weights(composed, tmp_path, weights, message):
    with pytest.raises(MoLoRAError, match=rf"^export_peft: {message}"):
        composed.export_peft(str(tmp_path / "mix"), weights)
    assert not (tmp_path / "mix").exists()


def test_export_refuses_to_write_nan_factors(composed, tmp_path):
    layer = next(iter(composed.routed_layers().values()))
    with torch.no_grad():
        layer.bank.B[1][0, 0] = NAN
    composed.export_peft(str(tmp_path / "ok"), {"a": 1.0})  # expert b is not in the mix
    with pytest.raises(MoLoRAError, match=rf"export_peft: module '{layer.name}': lora_B .*contains NaN or inf"):
        composed.export_peft(str(tmp_path / "mix"), {"a": 0.5, "b": 0.5})
    assert not (tmp_path / "mix").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(MoLoRAError, match="exists and is not a folder"):
        composed.export_peft(str(tmp_path / "file"), {"a": 1.0})


# ---------------------------------------------------------------------- retrieval
def retrieval_router(**kw):
    from molora.routers import RetrievalRouter

    return RetrievalRouter(3, 4, top_k=1, **kw)


def test_retrieval_router_refuses_nan_keys_and_examples():
    from molora.context import RoutingSignals

    r = retrieval_router()
    bad = torch.randn(5, 4)
    bad[2, 1] = NAN
    with pytest.raises(RoutingError, match=r"fit_keys\(expert=1\): embeddings contains NaN or inf \(1 NaN"):
        r.fit_keys(1, bad)
    assert not bool(r.fitted[1])  # nothing stored
    keys = torch.randn(3, 4)
    keys[0, 0] = INF
    with pytest.raises(RoutingError, match="set_keys: keys contains NaN or inf"):
        r.set_keys(keys)
    m = retrieval_router(metric="mahalanobis")
    cov = torch.eye(4)
    cov[1, 1] = NAN
    with pytest.raises(RoutingError, match="set_keys: covariance contains NaN or inf"):
        m.set_keys(torch.randn(3, 4), covariance=cov, count=5)
    r.set_keys(torch.randn(3, 4))
    query = torch.randn(2, 4)
    query[1, 3] = NAN
    with pytest.raises(RoutingError, match="the routing signal embeddings contains NaN or inf"):
        r(torch.randn(2, 5, 4), RoutingSignals(embeddings=query))


def test_retrieval_router_refuses_nan_keys_from_a_checkpoint():
    r = retrieval_router()
    r.set_keys(torch.randn(3, 4))
    state = r.state_dict()
    state["keys"][1, 2] = NAN
    fresh = retrieval_router()
    with pytest.raises(CheckpointError, match="checkpoint tensor 'keys' contains NaN or inf"):
        fresh.load_state_dict(state)
    assert not bool(fresh.fitted.any())


@pytest.mark.parametrize("kw, message", [({"temperature": INF}, "temperature must be a finite number"),
                                         ({"temperature": NAN}, "temperature must be a finite number"),
                                         ({"shrinkage": NAN}, "shrinkage must be in")])
def test_retrieval_router_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        retrieval_router(**kw)


def test_retrieval_manager_refuses_nan_examples():
    from molora.continual import ContinualError, RetrievalExpertsManager

    bad = torch.randn(4, 8)
    bad[0, 0] = NAN
    m = RetrievalExpertsManager(tiny_bert(), target_modules=["query"], key_dim=8, embed_fn=lambda texts: bad)
    with pytest.raises(ContinualError, match=r"RetrievalExpertsManager: query embeddings contains NaN or inf"):
        m.begin_task("t", examples=bad)
    with pytest.raises(ContinualError, match=r"query embed_fn\(texts\) contains NaN or inf"):
        m.begin_task("t", examples=["a text"])
    assert m.tasks == [] and m.current is None
    for kw, message in [({"temperature": NAN}, "temperature must be a finite number"),
                        ({"key_dim": 8.0}, "key_dim must be a positive int"), ({"top_k": True}, "top_k must be a positive int")]:
        with pytest.raises(ContinualError, match=message):
            RetrievalExpertsManager(tiny_bert(), target_modules=["query"], **kw)


def test_retrieve_expert_refuses_nan():
    from molora.expert_retrieval import retrieve_expert

    keys, shots = torch.randn(3, 4), torch.randn(5, 4)
    assert 0 <= retrieve_expert(keys, shots)[0] < 3
    shots[1, 1] = NAN
    with pytest.raises(MoLoRAError, match="retrieve_expert: shot_embeddings contains NaN or inf"):
        retrieve_expert(keys, shots)
    keys[0, 0] = INF
    with pytest.raises(MoLoRAError, match="retrieve_expert: keys contains NaN or inf"):
        retrieve_expert(keys, torch.randn(5, 4))


# ---------------------------------------------------------------------- timestep routers
@pytest.mark.parametrize("router, kw, message", [
    ("timestep", {"num_timesteps": NAN}, "num_timesteps must be an int"),
    ("timestep", {"num_timesteps": 1000.0}, "num_timesteps must be an int"),
    ("timestep", {"num_timesteps": True}, "num_timesteps must be an int"),
    ("timestep", {"intervals": [2, NAN]}, r"intervals\[1\] must be an int"),
    ("timestep", {"intervals": 3}, "intervals must be a list of ints"),
    ("timestep", {"intervals": [3], "gate_context": "no"}, "gate_context must be true or false"),
    ("tlora", {"num_timesteps": INF}, "num_timesteps must be an int"),
    ("tlora", {"exponent": INF}, "exponent must be a finite number"),
    ("tlora", {"exponent": NAN}, "exponent must be a finite number"),
    ("tlora", {"min_rank": 1.5}, "min_rank must be an int"),
])
def test_timestep_router_settings(router, kw, message):
    from molora.routers import build_router

    with pytest.raises(ValueError, match=message):
        build_router(router, num_experts=3, d_in=4, **kw)


@pytest.mark.parametrize("router", ["timestep", "tlora"])
def test_timestep_routers_refuse_nan_timesteps(router):
    from molora.context import RoutingSignals
    from molora.routers import build_router

    r = build_router(router, num_experts=3, d_in=4, **({"intervals": [1, 2]} if router == "timestep" else {}))
    with pytest.raises(RoutingError, match=rf"router '{router}': timesteps contains NaN or inf \(1 NaN"):
        r(torch.randn(2, 5, 4), RoutingSignals(timesteps=torch.tensor([10.0, NAN])))


# ---------------------------------------------------------------------- LoRAHub
def test_lorahub_weights_are_checked(composed):
    from molora.lorahub import cma_minimize, elementwise_factors, lorahub

    with pytest.raises(MoLoRAError, match=r"molora.lorahub: weight of expert 'b' must be a finite number"):
        elementwise_factors(composed, [1.0, NAN])
    with pytest.raises(MoLoRAError, match="expected 2 weights"):
        elementwise_factors(composed, [1.0])
    f = lambda x: float((x ** 2).sum())  # noqa: E731
    for kw, message in [({"x0": [0.0, NAN]}, r"x0\[1\] must be a finite number"), ({"x0": [0.0]}, "x0 must have 2 entries"),
                        ({"bounds": (-INF, 1.0)}, r"bounds\[0\] must be a finite number"),
                        ({"bounds": (1.0, -1.0)}, "low < high"), ({"budget": True}, "budget must be a positive int"),
                        ({"sigma0": NAN}, "sigma0 must be a finite number")]:
        with pytest.raises(MoLoRAError, match=message):
            cma_minimize(f, 2, **{"budget": 4, "bounds": (-1.0, 1.0), **kw})
    names = list(composed.expert_names)
    for kw, message in [({"x0": [NAN, 0.0]}, r"x0\[0\] must be a finite number"), ({"l1": NAN}, "l1 must be a finite number")]:
        with pytest.raises(MoLoRAError, match=message):
            lorahub(composed, lambda m, batch: torch.tensor(0.0), ["x"], budget=2, **kw)
        assert composed.expert_names == names  # refused before the lorahub expert is added


# ---------------------------------------------------------------------- an empty batch
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


EMPTY_BATCH_ROUTERS = {
    "soft-sequence": (dict(router="soft", router_kwargs={"granularity": "sequence"}), {}),
    "topk-sequence": (dict(router="topk", top_k=1, router_kwargs={"granularity": "sequence"}), {}),
    "task": (dict(router="task"), {"task_ids": torch.zeros(0, dtype=torch.long)}),
    "retrieval": (dict(router="retrieval", router_kwargs={"key_dim": 8}), {"embeddings": torch.zeros(0, 8)}),
    "retrieval-hidden": (dict(router="retrieval", router_kwargs={"source": "hidden"}), {"attention_mask": torch.ones(0, 5)}),
    "timestep": (dict(router="timestep", router_kwargs={"intervals": [1, 1]}), {"timesteps": torch.zeros(0)}),
}


def test_pooling_an_empty_batch():
    from molora.routers.pooling import pool_sequence

    assert pool_sequence(torch.zeros(0, 5, 8), None).shape == (0, 8)
    assert pool_sequence(torch.zeros(0, 5, 8), torch.ones(0, 5)).shape == (0, 8)


@pytest.mark.parametrize("case", sorted(EMPTY_BATCH_ROUTERS))
@pytest.mark.parametrize("shape", [(0, 5, 8), (0, 8)])
def test_a_batch_of_size_0_gives_an_empty_output(case, shape):
    """Per-example routers on a batch of 0 examples: an empty output, no ZeroDivisionError
    (RoutedLoRALinear._broadcast divided the tokens by the batch size)."""
    config, signals = EMPTY_BATCH_ROUTERS[case]
    if len(shape) == 2 and "attention_mask" in signals:
        signals = {}
    torch.manual_seed(0)
    model = molora.get_molora_model(_Toy(), molora.MoLoRAConfig(target_modules=["proj", "out"], num_experts=2, **config))
    if config["router"] == "retrieval":
        model.shared_router.set_keys(torch.randn(2, model.shared_router.key_dim))
    with torch.no_grad(), model.routing(**signals):
        y = model(torch.zeros(shape))
    assert y.shape == (*shape[:-1], 4) and y.numel() == 0
