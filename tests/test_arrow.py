"""Arrow routing (Ostapenko et al. 2024; PEFT ``create_arrow_model``): equal to PEFT on a tiny
LLaMA, prototypes equal to a float64 SVD of each delta, gates hand-computed on a two-feature
layer, prototypes refreshed when the experts change, checkpoints round-trip, bad values named."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import molora
from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.bank import ExpertBank
from molora.context import RoutingSignals
from molora.errors import AdapterError, MoLoRAError
from molora.genknowsub import subtract_general_knowledge
from molora.layer import build_routed_layer
from molora.routers import ArrowRouter

from helpers import assert_same_snapshot, make_peft_adapter, snapshot

peft = pytest.importorskip("peft")
pytest.importorskip("peft.tuners.lora.arrow")  # peft >= 0.17

E, RANK = 4, 4
TARGETS = ["q_proj", "v_proj", "down_proj"]
NONE = RoutingSignals()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Four PEFT adapters of rank 4 with different alphas. One rank component of each delta is six
    times the others, so the top singular value stands apart and PEFT's 15 power iterations
    converge to the exact singular vector (to ~(1/6)^30) that molora computes."""
    from peft import LoraConfig, get_peft_model

    base, root, paths = tiny_llama(), tmp_path_factory.mktemp("arrow"), []
    for i in range(E):
        torch.manual_seed(10 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=4 * (i + 1), target_modules=TARGETS,
                                                            init_lora_weights=False))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_A" in name:
                    p.normal_(0.0, p.shape[1] ** -0.5)
                elif "lora_B" in name:
                    p.normal_(0.0, 0.1 * p.shape[1] ** -0.5)
                    p[:, i % RANK] *= 6.0
        pm.save_pretrained(str(root / f"task{i}"))
        paths.append(str(root / f"task{i}"))
    return paths


@pytest.fixture(scope="module")
def general(tmp_path_factory):
    """Two general-knowledge adapters for GenKnowSub (same rank and modules as the task ones)."""
    base, root = tiny_llama(), tmp_path_factory.mktemp("general")
    return [str(make_peft_adapter(base, root / f"general{i}", seed=50 + i, r=RANK, alpha=8, target_modules=TARGETS))
            for i in range(2)]


def _peft_arrow(paths, top_k, temperature, general_paths=None):
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0, use_gks=general_paths is not None)
    return create_arrow_model(tiny_llama(), paths, cfg, general_adapter_paths=general_paths).eval()


def _svd_prototype(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The reference: top right singular vector of the full float64 delta."""
    return torch.linalg.svd(B.double() @ A.double()).Vh[0]


def _same_up_to_sign(p: torch.Tensor, v: torch.Tensor, atol: float) -> bool:
    p, v = p.double(), v.double()
    return bool(torch.allclose(p, v, atol=atol) or torch.allclose(p, -v, atol=atol))


# ---------------------------------------------------------------------- PEFT's create_arrow_model
@pytest.mark.parametrize("top_k, temperature", [(3, 1.0), (2, 0.5), (1, 1.0), (4, 2.0)])
def test_equals_peft_create_arrow_model(adapters, top_k, temperature):
    ref = _peft_arrow(adapters, top_k, temperature)
    model = molora.compose(tiny_llama(), adapters, router="arrow", top_k=top_k, temperature=temperature).eval()
    base = tiny_llama()
    with torch.no_grad():
        want, got, plain = ref(input_ids=_ids()).logits, model(input_ids=_ids()).logits, base(input_ids=_ids()).logits
    assert (want - plain).abs().max() > 0.1  # the experts visibly change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and the prototypes are PEFT's (built lazily by its first forward), up to sign
    for path, layer in model.routed_layers().items():
        theirs = ref.base_model.model.get_submodule(path).lora_arrow["arrow_router"].prototypes
        for e in range(E):
            assert _same_up_to_sign(layer.router.prototypes[e], theirs[e], atol=1e-5), (path, e)


def test_default_is_three_experts_per_token(adapters):
    model = molora.compose(tiny_llama(), adapters, router="arrow")
    routers = [layer.router for layer in model.routed_layers().values()]
    assert all(isinstance(r, ArrowRouter) and r.top_k == 3 and r.temperature == 1.0 for r in routers)
    assert len({id(r) for r in routers}) == len(routers)  # one router per layer, from its own experts
    ref = _peft_arrow(adapters, 3, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- GenKnowSub
def test_genknowsub_equals_peft_use_gks(adapters, general):
    ref = _peft_arrow(adapters, 2, 0.5, general)
    model = molora.compose(tiny_llama(), adapters, router="arrow", top_k=2, temperature=0.5, general_adapters=general)
    plain = molora.compose(tiny_llama(), adapters, router="arrow", top_k=2, temperature=0.5)
    with torch.no_grad():
        want, got = ref(input_ids=_ids()).logits, model(input_ids=_ids()).logits
        assert (got - plain(input_ids=_ids()).logits).abs().max() > 1e-2  # the subtraction matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert model.expert_names == [f"task{i}" for i in range(E)]  # the general adapters are not experts


def test_genknowsub_subtracts_the_mean_factors(adapters, general):
    from safetensors.torch import load_file

    def factors(path):
        return {k: v.double() for k, v in load_file(f"{path}/adapter_model.safetensors").items()}

    task, gen = factors(adapters[1]), [factors(g) for g in general]
    model = molora.compose(tiny_llama(), adapters, general_adapters={"g0": general[0], "g1": general[1]})
    layer = model.routed_layers()["model.layers.1.mlp.down_proj"]
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_{}.weight"
    for ab, got in (("A", layer.bank.A[1]), ("B", layer.bank.B[1])):
        want = task[key.format(ab)] - (gen[0][key.format(ab)] + gen[1][key.format(ab)]) / 2
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_genknowsub_refuses_other_ranks_and_missing_modules(adapters, tmp_path):
    from molora.peft_io import load_peft_adapter

    base = tiny_llama()
    other_rank = make_peft_adapter(base, tmp_path / "r2", seed=60, r=2, target_modules=TARGETS)
    fewer = make_peft_adapter(base, tmp_path / "q", seed=61, r=RANK, target_modules=["q_proj"])
    tasks = [load_peft_adapter(adapters[0], "t0")]
    with pytest.raises(AdapterError, match=r"task adapter 't0' has lora_A \[4, 48\].*module 'model.layers.0.mlp.down_proj'.*have \[2, 48\].*same rank"):
        subtract_general_knowledge(tasks, [load_peft_adapter(other_rank, "r2")])
    with pytest.raises(AdapterError, match=r"general adapters \['q'\] do not target module 'model.layers.0.mlp.down_proj'"):
        subtract_general_knowledge(tasks, [load_peft_adapter(fewer, "q")])
    before = snapshot(base)
    with pytest.raises(AdapterError, match="same rank"):
        molora.compose(base, adapters, router="arrow", general_adapters=[str(other_rank)])
    assert_same_snapshot(before, snapshot(base))


# ---------------------------------------------------------------------- prototypes
def test_prototypes_equal_float64_svd_of_each_layers_experts(adapters):
    model = molora.compose(tiny_llama(), adapters, router="arrow")
    for path, layer in model.routed_layers().items():
        protos = layer.router.prototypes
        assert protos.shape == (E, layer.bank.d_in) and not protos.requires_grad
        for e in range(E):
            v = _svd_prototype(layer.bank.A[e], layer.bank.B[e])
            assert _same_up_to_sign(protos[e], v, atol=1e-6), (path, e)
    assert not any("prototypes" in n for n, _ in model.named_parameters())  # buffers, never trained
    assert not any("prototypes" in n for n, p in model.named_buffers() if p.requires_grad)


def test_prototypes_of_mixed_ranks_shared_a_and_a_zero_expert():
    g = torch.Generator().manual_seed(3)
    bank = ExpertBank(6, 5)
    for r in (1, 3, 2):
        bank.add_expert(r, 1.0, A=torch.randn(r, 6, generator=g), B=torch.randn(5, r, generator=g))
    bank.add_expert(2, 1.0, A=torch.randn(2, 6, generator=g))  # B = 0: no direction
    router = ArrowRouter(4, 6)
    router.update_prototypes(bank)
    for e in range(3):
        assert _same_up_to_sign(router.prototypes[e], _svd_prototype(bank.A[e], bank.B[e]), atol=1e-6)
    assert torch.equal(router.prototypes[3], torch.zeros(6))
    hydra = ExpertBank(6, 5, shared_a=True, shared_rank=3)
    for _ in range(2):
        hydra.add_expert(3, 1.0, B=torch.randn(5, 3, generator=g))
    router = ArrowRouter(2, 6)
    router.update_prototypes(hydra)
    for e in range(2):
        assert _same_up_to_sign(router.prototypes[e], _svd_prototype(hydra.A_shared, hydra.B[e]), atol=1e-6)


def test_prototypes_follow_the_experts(adapters):
    """Recomputed when the factors change in place (an optimizer step), when an expert is added,
    and on request; left alone otherwise."""
    model = molora.compose(tiny_llama(), adapters, router="arrow", trainable_experts=True)
    path, layer = next(iter(model.routed_layers().items()))
    before = layer.router.prototypes.clone()
    model(input_ids=_ids())
    assert torch.equal(layer.router.prototypes, before)  # nothing changed: nothing recomputed
    opt = torch.optim.SGD(model.trainable_parameters(), lr=50.0)
    model(input_ids=_ids()).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        model(input_ids=_ids())
    assert not torch.allclose(layer.router.prototypes, before, atol=1e-4)
    for e in range(E):
        assert _same_up_to_sign(layer.router.prototypes[e], _svd_prototype(layer.bank.A[e], layer.bank.B[e]), atol=1e-6)
    new = model.add_expert("fresh", rank=2)
    with torch.no_grad():
        layer.bank.B[new].normal_()
        model(input_ids=_ids())
    assert layer.router.prototypes.shape == (E + 1, layer.bank.d_in)
    assert _same_up_to_sign(layer.router.prototypes[new], _svd_prototype(layer.bank.A[new], layer.bank.B[new]), atol=1e-6)
    layer.router.prototypes.zero_()
    layer.router.update_prototypes(layer.bank)  # on request
    assert _same_up_to_sign(layer.router.prototypes[0], _svd_prototype(layer.bank.A[0], layer.bank.B[0]), atol=1e-6)


# ---------------------------------------------------------------------- gates by hand
def _hand_layer(top_k: int, temperature: float):
    """d_in = 2, d_out = 1, zero base; rank-1 experts (scale 1) with deltas
    [1, 0] (v = e1), [0, 2] (v = e2) and [1, 1] (v = (e1 + e2) / sqrt 2)."""
    bank = ExpertBank(2, 1)
    for a, b in (([1.0, 0.0], 1.0), ([0.0, 1.0], 2.0), ([1.0, 1.0], 1.0)):
        bank.add_expert(1, 1.0, A=torch.tensor([a]), B=torch.tensor([[b]]))
    base = nn.Linear(2, 1)
    nn.init.zeros_(base.weight), nn.init.zeros_(base.bias)
    router = {"name": "arrow", "config": {"top_k": top_k, "temperature": temperature}}
    return build_routed_layer(base, name="hand", bank=bank, router=router, expert_ids=range(3), num_global_experts=3)


def _softmax2(a: float, b: float, t: float) -> tuple[float, float]:
    ea, eb = math.exp(a / t), math.exp(b / t)
    return ea / (ea + eb), eb / (ea + eb)


def test_hand_computed_gates_and_output():
    layer = _hand_layer(top_k=2, temperature=1.0)
    r2 = 1 / math.sqrt(2)
    assert torch.allclose(layer.router.prototypes, torch.tensor([[1.0, 0.0], [0.0, 1.0], [r2, r2]]))
    # x = (3, 1): scores |3|, |1|, 4/sqrt 2 = 2.83 -> experts 0 and 2
    # x = (-1, 2): scores 1, 2, 1/sqrt 2 -> experts 1 and 0; x = (-3, -1): the sign does not matter
    x = torch.tensor([[3.0, 1.0], [-1.0, 2.0], [-3.0, -1.0]])
    d = layer.router(x, NONE)
    assert d.indices.tolist() == [[0, 2], [1, 0], [0, 2]]
    g0, g2 = _softmax2(3.0, 4 * r2, 1.0)
    g1, g0b = _softmax2(2.0, 1.0, 1.0)
    torch.testing.assert_close(d.gates, torch.tensor([[g0, g2], [g1, g0b], [g0, g2]]))
    # delta_e x: [x1], [2 x2], [x1 + x2]
    want = torch.tensor([[g0 * 3 + g2 * 4], [g1 * 4 + g0b * -1], [g0 * -3 + g2 * -4]])
    torch.testing.assert_close(layer(x), want)


def test_temperature_and_top_k_by_hand():
    x = torch.tensor([[3.0, 1.0]])
    r2 = 1 / math.sqrt(2)
    g0, g2 = _softmax2(3.0, 4 * r2, 0.25)  # a low temperature sharpens toward the best expert
    d = _hand_layer(top_k=2, temperature=0.25).router(x, NONE)
    torch.testing.assert_close(d.gates, torch.tensor([[g0, g2]]))
    assert g0 > 0.66 > _softmax2(3.0, 4 * r2, 1.0)[0]
    d = _hand_layer(top_k=1, temperature=1.0).router(x, NONE)
    assert d.indices.tolist() == [[0]] and d.gates.tolist() == [[1.0]]
    d = _hand_layer(top_k=3, temperature=1.0).router(x, NONE)  # every expert: softmax of all three scores
    z = [math.exp(3.0), math.exp(1.0), math.exp(4 * r2)]
    gates = dict(zip(d.indices[0].tolist(), d.gates[0].tolist()))
    assert gates == pytest.approx({e: z[e] / sum(z) for e in range(3)})


# ---------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(adapters, tmp_path):
    model = molora.compose(tiny_llama(), adapters, router="arrow", top_k=2, temperature=0.7).eval()
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
    state = model.adapter_state_dict()
    keys = [k for k in state if k.endswith("router.prototypes")]
    assert len(keys) == len(model.routed_layers())  # saved with the model
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), str(tmp_path / "ckpt")).eval()
    assert {k: v for k, v in loaded.adapter_state_dict().items() if k in keys}.keys() == set(keys)
    for k in keys:
        assert torch.equal(loaded.adapter_state_dict()[k], state[k])
    for layer in loaded.routed_layers().values():
        assert isinstance(layer.router, ArrowRouter) and layer.router.get_config() == {"top_k": 2, "temperature": 0.7}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, want)


def test_fresh_model_from_config_round_trips(tmp_path):
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=TARGETS, num_experts=3, rank=2, router="arrow",
                                                        top_k=2))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0.0, 0.3)
        want = model(input_ids=_ids()).logits
    model.save_pretrained(str(tmp_path / "c"))
    loaded = MoLoRAModel.from_pretrained(tiny_llama(), str(tmp_path / "c"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, want)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 5}, r"top_k must be an int in \[1, num_experts=4\]; got 5"),
        ({"top_k": 0}, r"top_k .*got 0"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0; got 0.0"),
        ({"temperature": -1.0}, r"temperature .*got -1.0"),
    ],
)
def test_bad_router_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArrowRouter(4, 8, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"top_k": 5}, r"top_k must be in \[1, num_experts=4\]; got 5"), ({"temperature": 0}, r"temperature .*got 0"),
     ({"use_gks": True}, r"no use_gks flag; GenKnowSub runs when general_adapters")],
)
def test_compose_refuses_bad_values_and_changes_nothing(adapters, kwargs, match):
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match=match):
        molora.compose(base, adapters, router="arrow", **kwargs)
    assert_same_snapshot(before, snapshot(base))


def test_top_k_above_a_layers_experts_names_the_module():
    layer_bank = {"d_in": 2, "d_out": 1, "shared_a": False, "shared_rank": None, "init": "kaiming",
                  "ranks": [1, 1], "alphas": [1.0, 1.0], "rslora": [False, False]}
    with pytest.raises(MoLoRAError, match=r"module 'hand'.*top_k .*got 3"):
        build_routed_layer(nn.Linear(2, 1), name="hand", bank=layer_bank, router={"name": "arrow", "config": {"top_k": 3}},
                           expert_ids=range(2), num_global_experts=2)


def test_generate_equals_peft(adapters):
    """Per-token routing through decoding: every new token is routed on its own (KV cache on)."""
    ref = _peft_arrow(adapters, 2, 1.0)
    model = molora.compose(tiny_llama(), adapters, router="arrow", top_k=2).eval()
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = ref.generate(input_ids=_ids(), **kwargs)
        got = model.generate(input_ids=_ids(), **kwargs)
    assert got.shape == (2, 12) and torch.equal(got, want)
