"""Block-wise LoRA (Li et al. 2024, arXiv 2403.07500) on the tiny diffusers UNet: per-block,
per-expert ranks and alphas (rank 0 = no expert there), checked against a hand-written table of
which blocks each expert owns (plain string prefixes, not molora's pattern matching)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import molora
from helpers import assert_same_snapshot, snapshot, tiny_unet
from molora import MoLoRAConfig, MoLoRAError, get_molora_model
from molora.layer import RoutedLoRALinear
from molora.routers import StaticRouter

pytest.importorskip("diffusers")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# expert 0 ("identity") owns the down blocks, expert 1 ("style") the second up block's last
# attention; both share the first attention of that up block; the mid block has no expert.
# The first matching pattern wins, so the specific up-block entry comes before "up_blocks".
RANKS = {"down_blocks": [4, 0], "up_blocks.1.attentions.1": [0, 8], "mid_block": 0, "up_blocks": [2, 6]}
ALPHAS = {"down_blocks": [8.0, 1.0], "up_blocks.1.attentions.1": [3.0, 4.0]}
ALPHA = 16.0
# The same layout by hand: block prefix -> {expert: (rank, alpha)} (absent experts left out).
HAND = [("down_blocks.", {0: (4, 8.0)}), ("up_blocks.1.attentions.1.", {1: (8, 4.0)}), ("mid_block.", {}),
        ("up_blocks.", {0: (2, ALPHA), 1: (6, ALPHA)})]


def hand_layout(path: str) -> dict[int, tuple[int, float]]:
    return next(experts for prefix, experts in HAND if path.startswith(prefix))


def target_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in TARGETS)]


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 16, generator=g)


def run(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x, t, text = inputs(seed)
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=text).sample


def blockwise(base: nn.Module, router: str = "static", ranks=None, **kw) -> molora.MoLoRAModel:
    cfg = MoLoRAConfig(target_modules=TARGETS, num_experts=2, rank=4, alpha=ALPHA, router=router,
                       expert_names=["identity", "style"], block_ranks=RANKS if ranks is None else ranks,
                       block_alphas=kw.pop("block_alphas", ALPHAS), **kw)
    return get_molora_model(base, cfg)


def randomize(model: molora.MoLoRAModel, seed: int = 1) -> None:
    """Non-zero B (LoRA starts at B = 0, which would hide every difference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for B in layer.bank.B:
                B.copy_(torch.randn(B.shape, generator=g) * 0.5)


def record_io(model: nn.Module, paths: list[str]) -> tuple[dict, list]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        return lambda m, args, out: seen.__setitem__(name, (args[0].detach().clone(), out.detach().clone()))

    return seen, [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def test_block_ranks_and_alphas_land_in_the_banks(unet):
    base = copy.deepcopy(unet)
    originals = {p: base.get_submodule(p) for p in target_paths(base)}
    model = blockwise(base)
    layers = model.routed_layers()
    assert set(layers) == {p for p in originals if hand_layout(p)}  # mid block: not wrapped
    for path, original in originals.items():
        experts = hand_layout(path)
        module = model.base_model.get_submodule(path)
        d_in, d_out = original.in_features, original.out_features
        base_params = sum(p.numel() for p in original.parameters())
        if not experts:
            assert module is original and type(module) is nn.Linear, path
            assert sum(p.numel() for p in module.parameters()) == base_params  # no parameter created there
            continue
        bank = module.bank
        assert module.expert_ids == sorted(experts), path
        assert bank.ranks == [experts[e][0] for e in sorted(experts)], path
        assert [tuple(a.shape) for a in bank.A] == [(experts[e][0], d_in) for e in sorted(experts)]
        assert [tuple(b.shape) for b in bank.B] == [(d_out, experts[e][0]) for e in sorted(experts)]
        expected = torch.tensor([experts[e][1] / experts[e][0] for e in sorted(experts)], dtype=torch.float32)
        assert torch.equal(bank.scaling, expected), (path, bank.scaling, expected)
        # the shared static router has no per-layer parameters: what the module adds is its experts
        added = sum(p.numel() for p in module.parameters()) - base_params
        assert added == sum(r * (d_in + d_out) for r, _ in experts.values()), path
    # per-expert lists in the config (an int is given to every expert), as they are saved
    assert model.molora_config.block_ranks == {"down_blocks": [4, 0], "up_blocks.1.attentions.1": [0, 8],
                                               "mid_block": [0, 0], "up_blocks": [2, 6]}
    assert MoLoRAConfig.from_dict(model.molora_config.to_dict()) == model.molora_config


def test_rank_zero_blocks_are_the_base_bit_for_bit(unet):
    """With the down blocks (first in the forward) at rank 0 and live experts further on, every
    down-block target module outputs exactly the base model's, while the output changes."""
    ref = copy.deepcopy(unet)
    model = blockwise(copy.deepcopy(unet), ranks={"down_blocks": 0, "up_blocks": [3, 2]}, block_alphas={})
    randomize(model)
    down = [p for p in target_paths(ref) if p.startswith("down_blocks.")]
    assert down and not any(p.startswith("down_blocks.") for p in model.routed_layers())
    got, hooks_a = record_io(model.base_model, down)
    want, hooks_b = record_io(ref, down)
    out, base_out = run(model), run(ref)
    for h in hooks_a + hooks_b:
        h.remove()
    for p in down:
        assert torch.equal(got[p][1], want[p][1]), p
    assert (out - base_out).abs().max() > 1e-3  # the live up-block experts do change the output


@pytest.mark.parametrize("expert", [0, 1])
def test_routing_to_one_expert_changes_only_the_blocks_it_owns(unet, expert):
    """Disjoint ownership (identity: down blocks, style: mid and up blocks), a static router on
    one expert: each routed layer's output minus its base output equals the float64 sum over the
    layer's live experts, ``g_e s_e B_e A_e x``, which is exactly 0 in the other expert's blocks."""
    owned = {"down_blocks": [4, 0], "mid_block": [0, 3], "up_blocks": [0, 5]}
    model = blockwise(copy.deepcopy(unet), ranks=owned, block_alphas={"mid_block": [1.0, 6.0]})
    randomize(model)
    weights = [1.0 if e == expert else 0.0 for e in range(2)]
    model.set_router(StaticRouter(2, 32, weights=weights))
    layers = model.routed_layers()
    assert {p: layer.expert_ids for p, layer in layers.items()} == {
        p: [0] if p.startswith("down_blocks.") else [1] for p in target_paths(unet)}
    seen, hooks = record_io(model.base_model, list(layers))
    run(model)
    for h in hooks:
        h.remove()
    changed = set()
    for path, layer in layers.items():
        x, y = seen[path]
        base = layer.base_layer(x)
        x64 = x.double().reshape(-1, x.shape[-1])
        delta = torch.zeros(x64.shape[0], layer.bank.d_out, dtype=torch.float64)
        for local, g in enumerate(layer.expert_ids):
            r, alpha = layer.bank.ranks[local], layer.bank.alphas[local]
            A, B = layer.bank.A[local].double(), layer.bank.B[local].double()
            delta += weights[g] * (alpha / r) * (x64 @ A.T @ B.T)
        torch.testing.assert_close((y - base).double().reshape(delta.shape), delta, atol=1e-5, rtol=1e-4)
        if delta.abs().max() > 0:
            changed.add(path)
    owns = [p for p in layers if (p.startswith("down_blocks.") == (expert == 0))]
    assert changed == set(owns) and owns


def test_gradient_reaches_live_experts_only(unet):
    """A top-k router (k = 2, clamped to 1 where a layer holds one expert) and one backward: the
    trainable parameters are the live experts' factors and the per-layer routers, all of them
    get a non-zero gradient, the base none."""
    model = blockwise(copy.deepcopy(unet), router="topk", top_k=2)
    randomize(model)
    layers = model.routed_layers()
    for path, layer in layers.items():
        assert layer.router.top_k == min(2, len(hand_layout(path))), path
    expert_params = {id(p) for layer in layers.values() for p in [*layer.bank.A, *layer.bank.B]}
    router_params = {id(p) for layer in layers.values() for p in layer.router.parameters()}
    trainable = model.trainable_parameters()
    assert {id(p) for p in trainable} == expert_params | router_params
    hand_count = sum(r * (model.base_model.get_submodule(p).in_features + model.base_model.get_submodule(p).out_features)
                     for p in layers for r, _ in hand_layout(p).values())
    assert sum(p.numel() for p in trainable if id(p) in expert_params) == hand_count
    x, t, text = inputs()
    model(x, t, encoder_hidden_states=text).sample.pow(2).mean().backward()
    for path, layer in layers.items():
        for local, (A, B) in enumerate(zip(layer.bank.A, layer.bank.B)):
            assert A.grad is not None and A.grad.abs().max() > 0, (path, local)
            assert B.grad is not None and B.grad.abs().max() > 0, (path, local)
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if not p.requires_grad)


def test_save_load_round_trip_and_added_expert(unet, tmp_path):
    """save_pretrained -> from_pretrained rebuilds the same layers (experts, ranks, scalings) and
    outputs; an expert added later joins the blocks that have experts (the config's per-expert
    lists grow with it) and the checkpoint still loads."""
    model = blockwise(copy.deepcopy(unet))
    randomize(model)
    model.add_expert("extra", rank=3, alpha=6.0)
    assert model.molora_config.block_ranks == {"down_blocks": [4, 0, 3], "up_blocks.1.attentions.1": [0, 8, 3],
                                               "mid_block": [0, 0, 0], "up_blocks": [2, 6, 3]}
    assert model.molora_config.block_alphas == {"down_blocks": [8.0, 1.0, 6.0], "up_blocks.1.attentions.1": [3.0, 4.0, 6.0]}
    assert not any(p.startswith("mid_block.") for p in model.routed_layers())
    model.save_pretrained(str(tmp_path / "ckpt"))
    restored = molora.MoLoRAModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "ckpt"))
    assert restored.molora_config == model.molora_config
    a, b = model.routed_layers(), restored.routed_layers()
    assert set(a) == set(b)
    for path in a:
        assert a[path].expert_ids == b[path].expert_ids and a[path].bank.ranks == b[path].bank.ranks, path
        assert torch.equal(a[path].bank.scaling, b[path].bank.scaling), path
    assert torch.equal(run(model), run(restored))


def test_export_of_a_static_mix_uses_per_module_ranks(unet, tmp_path):
    """export_peft writes each module's rank (the ranks of its weighted experts, concatenated) in
    rank_pattern, leaves expert-less modules out, and PEFT's model equals molora's static mix."""
    from peft import PeftModel

    model = blockwise(copy.deepcopy(unet))
    randomize(model)
    w = [0.7, 0.3]
    model.export_peft(str(tmp_path / "mix"), w)
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    for path in target_paths(unet):
        rank = sum(r for r, _ in hand_layout(path).values())
        key = path.replace(".", r"\.")
        assert cfg["rank_pattern"].get(key) == (rank or None), path
        assert (path in cfg["target_modules"]) == (rank > 0), path
    model.set_router(StaticRouter(2, 32, weights=w))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "mix")).eval()
    torch.testing.assert_close(run(peft_model.base_model.model), run(model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kw", "match"), [
    ({"block_ranks": {"down_blocks": -1}},
     r"block_ranks\['down_blocks'\] \(rank; 0 = no expert there\) must be an int >= 0; got -1"),
    ({"block_ranks": {"up_blocks": [4, 2.5]}}, r"block_ranks\['up_blocks'\]\[1\] .* must be an int >= 0; got 2.5"),
    ({"block_ranks": {"mid_block": [4]}}, r"block_ranks\['mid_block'\] must give one value for all experts or a "
                                          r"list of 2 \(one per expert\); got 1: \[4\]"),
    ({"block_alphas": {"up_blocks": [1.0, float("nan")]}}, r"block_alphas\['up_blocks'\]\[1\] must be a finite number"),
    ({"block_ranks": {"(down": 4}}, r"block_ranks\['\(down'\]: invalid regex"),
    ({"block_ranks": ["down_blocks", 4]}, "block_ranks must map block patterns"),
    ({"block_ranks": {"down_blocks": 2}, "layer_overrides": {"to_q": {"rank": 2}}},
     r"layer_overrides \{'to_q': \['rank'\]\} set experts or ranks per layer and block_ranks is set"),
    ({"block_ranks": {"down_blocks": [2, 4]}, "shared_a": True},
     r"block_ranks\['down_blocks'\]: experts with a shared factor .* one rank per layer; got ranks \[2, 4\]"),
])
def test_bad_block_settings_are_refused_by_the_config(kw, match):
    with pytest.raises(MoLoRAError, match=match):
        MoLoRAConfig(target_modules=TARGETS, num_experts=2, **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"block_ranks": {"down_block.0": 4}}, r"block_ranks patterns \['down_block.0'\] match no target module"),
    ({"block_alphas": {"attn3": 2.0}}, r"block_alphas patterns \['attn3'\] match no target module"),
    ({"block_ranks": {"time_embedding": 4}}, r"block_ranks patterns \['time_embedding'\] match no target module"),
    ({"block_ranks": {".*": 0}}, "give every expert rank 0 in every target module: nothing to wrap"),
])
def test_bad_block_patterns_name_the_pattern_and_leave_the_model_untouched(unet, kw, match):
    base = copy.deepcopy(unet)
    before = snapshot(base)
    cfg = MoLoRAConfig(target_modules=TARGETS, num_experts=2, **kw)
    with pytest.raises(MoLoRAError, match=match):
        get_molora_model(base, cfg)
    assert_same_snapshot(before, snapshot(base))
    assert not any(isinstance(m, RoutedLoRALinear) for m in base.modules())
