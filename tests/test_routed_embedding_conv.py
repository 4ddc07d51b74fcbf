"""RoutedEmbedding and RoutedConv2d (molora/routed_embedding.py, molora/routed_conv.py): the routed
delta against float64 loops written from the formulas (embedding: ``s B A[:, id]``; conv: ``s B A``
applied to the unfolded patches), with a top-k router whose gates the test computes itself; the
gradients of the experts and the router against the same loops; merging and checkpoints; and the
errors for what they do not support (model untouched)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import molora
from molora.bank import ExpertBank
from molora.errors import AdapterError, MoLoRAError, RoutingError
from molora.layer import build_routed_layer
from molora.routed_conv import RoutedConv2d
from molora.routed_embedding import RoutedEmbedding

from helpers import assert_same_snapshot, make_peft_adapter, snapshot, tiny_llama

RANKS, ALPHAS = (2, 3, 1), (4.0, 3.0, 2.0)  # mixed ranks: the stack pads them


def bank_for(d_in, d_out, seed, dtype=torch.float64, trainable=False):
    g = torch.Generator().manual_seed(seed)
    bank = ExpertBank(d_in, d_out, dtype=dtype)
    for r, a in zip(RANKS, ALPHAS):
        bank.add_expert(r, a, A=torch.randn(r, d_in, generator=g, dtype=dtype),
                        B=torch.randn(d_out, r, generator=g, dtype=dtype), trainable=trainable)
    return bank


def routed(base, bank, top_k=2):
    layer = build_routed_layer(base, name="m", bank=bank, router={"name": "topk", "config": {"top_k": top_k}},
                               expert_ids=range(bank.num_experts), num_global_experts=bank.num_experts,
                               dtype=torch.float64)
    with torch.no_grad():  # a router that picks different experts per row
        layer.router.proj.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(7))
    return layer


def topk_gates(rows, weight, k):
    """Dense [T, E] gates of a top-k router (softmax, keep k, renormalise), from the formula."""
    p = torch.softmax(rows @ weight.T, dim=-1)
    keep = torch.zeros_like(p).scatter(1, p.topk(k, dim=-1).indices, 1.0)
    g = p * keep
    return g / g.sum(-1, keepdim=True)


def factors(bank):
    return [(bank.A[e], bank.B[e], a / r) for e, (r, a) in enumerate(zip(RANKS, ALPHAS))]


def embedding_reference(base, bank, weight, ids, k=2):
    W0 = base.weight
    rows = F.embedding(ids, W0)
    g = topk_gates(rows.reshape(-1, W0.shape[1]), weight, k)
    out = rows.reshape(-1, W0.shape[1]).clone()
    for e, (A, B, s) in enumerate(factors(bank)):
        h = F.embedding(ids.reshape(-1), A.T, padding_idx=base.padding_idx)  # PEFT's shrink
        out = out + g[:, e : e + 1] * s * (h @ B.T)
    return out.view(*ids.shape, -1)


def conv_reference(base, bank, weight, x, k=2):
    y0 = base(x)
    n, c_out, hh, ww = y0.shape
    patches = F.unfold(x, base.kernel_size, padding=base.padding, stride=base.stride)  # [N, c_in kh kw, H'W']
    rows = F.adaptive_avg_pool2d(x, (hh, ww)).flatten(2).transpose(1, 2).reshape(-1, x.shape[1])
    g = topk_gates(rows, weight, k).view(n, hh * ww, -1)
    out = y0.flatten(2)
    for e, (A, B, s) in enumerate(factors(bank)):
        out = out + g[:, :, e].unsqueeze(1) * s * (B @ (A @ patches))
    return out.view(n, c_out, hh, ww)


def tiny_embedding():
    torch.manual_seed(0)
    return nn.Embedding(11, 6, padding_idx=0).double()


def tiny_conv(stride=1, kernel=3, padding=1):
    torch.manual_seed(0)
    return nn.Conv2d(3, 5, kernel, stride=stride, padding=padding).double()


IDS = torch.tensor([[1, 4, 0, 10], [3, 3, 7, 0]])  # 0: the padding id


def test_embedding_delta_equals_float64_reference():
    base = tiny_embedding()
    layer = routed(base, bank_for(11, 6, seed=1)).eval()
    assert isinstance(layer, RoutedEmbedding) and layer.router.d_in == 6  # it scores the base embedding
    with torch.no_grad():
        out, ref = layer(IDS), embedding_reference(base, layer.bank, layer.router.proj.weight, IDS)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # top-2 of 3 per token, not the same pair everywhere: the routing is per token
    assert not torch.allclose(ref, embedding_reference(base, layer.bank, layer.router.proj.weight, IDS, k=3))
    assert (layer.num_embeddings, layer.embedding_dim, layer.padding_idx) == (11, 6, 0)


@pytest.mark.parametrize("stride, kernel, padding", [(1, 3, 1), (2, 3, 1), (1, 1, 0)])
def test_conv_delta_equals_float64_reference(stride, kernel, padding):
    base = tiny_conv(stride, kernel, padding)
    layer = routed(base, bank_for(3 * kernel * kernel, 5, seed=2)).eval()
    assert isinstance(layer, RoutedConv2d) and layer.router.d_in == 3  # it scores a pixel's input channels
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out, ref = layer(x), conv_reference(base, layer.bank, layer.router.proj.weight, x)
        single = layer(x[1])  # nn.Conv2d also takes an unbatched [c_in, H, W]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single, ref[1], rtol=1e-12, atol=1e-12)


def test_gradients_equal_float64_loop():
    """Experts and router trained through the routed layers: gradients of every A_e, B_e and the
    router weight equal those of the float64 loops (embedding: none into the padding row)."""
    cases = [(tiny_embedding(), IDS, embedding_reference, 11, 6),
             (tiny_conv(2), torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
              conv_reference, 27, 5)]
    for base, x, reference, d_in, d_out in cases:
        base.requires_grad_(False)  # as the model freezes it
        layer = routed(base, bank_for(d_in, d_out, seed=5, trainable=True)).train()
        ref_bank = copy.deepcopy(layer.bank)
        ref_weight = layer.router.proj.weight.detach().clone().requires_grad_(True)
        out = layer(x)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        (out * probe).sum().backward()
        (reference(base, ref_bank, ref_weight, x) * probe).sum().backward()
        for e in range(len(RANKS)):
            torch.testing.assert_close(layer.bank.A[e].grad, ref_bank.A[e].grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.bank.B[e].grad, ref_bank.B[e].grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.router.proj.weight.grad, ref_weight.grad, rtol=1e-10, atol=1e-12)
        if isinstance(layer, RoutedEmbedding):
            assert all(float(layer.bank.A[e].grad[:, 0].abs().max()) == 0.0 for e in range(len(RANKS)))
            assert float(layer.bank.A[0].grad[:, 3].abs().max()) > 0


def test_task_routing_merge_and_checkpoint(tmp_path):
    """get_molora_model on embedding + conv targets: per-example routing picks each expert; merge
    of a one-hot mix equals routing to that expert and unmerge restores the base bit-exactly; a
    checkpoint reloads the same outputs."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("emb", nn.Embedding(11, 12))
    base.add_module("conv", nn.Conv2d(1, 2, 3, padding=1))
    base.eval()

    def run(model, ids):
        e = model.base_model.emb(ids)  # [B, 4, 12] -> a [B, 1, 4, 12] image
        return model.base_model.conv(e.unsqueeze(1))

    cfg = molora.MoLoRAConfig(target_modules=["emb", "conv"], num_experts=2, rank=2, router="task")
    model = molora.get_molora_model(copy.deepcopy(base), cfg)
    layers = model.routed_layers()
    assert {n: type(m) for n, m in layers.items()} == {"emb": RoutedEmbedding, "conv": RoutedConv2d}
    with torch.no_grad():
        for layer in layers.values():
            for b in layer.bank.B:
                b.normal_()
    ids = IDS.clone()
    outs = []
    for t in (0, 1):
        with model.routing(task_ids=[t, t]), torch.no_grad():
            outs.append(run(model, ids))
    with model.routing(task_ids=[1, 0]), torch.no_grad():
        mixed = run(model, ids)
    torch.testing.assert_close(mixed, torch.stack([outs[1][0], outs[0][1]]))
    assert not torch.allclose(outs[0], outs[1])
    weights_before = {n: m.base_layer.weight.clone() for n, m in layers.items()}
    model.merge([0.0, 1.0])
    with torch.no_grad():
        merged = run(model, ids)
    torch.testing.assert_close(merged, outs[1], rtol=1e-5, atol=1e-5)
    model.unmerge()
    assert all(torch.equal(m.base_layer.weight, weights_before[n]) for n, m in layers.items())
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ckpt"))
    with loaded.routing(task_ids=[0, 0]), torch.no_grad():
        torch.testing.assert_close(run(loaded, ids), outs[0])


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Embedding(11, 6, max_norm=1.0), r"module 'm': nn.Embedding with max_norm=1.0"),
    (lambda: nn.Embedding(11, 6, scale_grad_by_freq=True), r"module 'm': nn.Embedding with scale_grad_by_freq=True"),
    (lambda: nn.Conv2d(4, 4, 3, groups=2), r"module 'm': molora routes LoRA on nn.Conv2d with groups=1.*groups=2"),
    (lambda: nn.Conv2d(3, 4, 3, dilation=2), r"this one has dilation=\(2, 2\)"),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), r"padding_mode='reflect'"),
])
def test_unsupported_base_layers_are_refused(make, match):
    base = make()
    d_in = molora.layer.base_features(base)[0]
    with pytest.raises(MoLoRAError, match=match):
        build_routed_layer(base, name="m", bank=ExpertBank(d_in, molora.layer.base_features(base)[1]), router=None,
                           expert_ids=[], num_global_experts=1)


def test_unsupported_kinds_and_routers_are_refused_model_untouched():
    base = nn.Sequential()
    base.add_module("emb", nn.Embedding(11, 6))
    before = snapshot(base)
    with pytest.raises(MoLoRAError, match=r"module 'emb': a routed Embedding holds experts of kind 'lora'; got 'dora'"):
        molora.get_molora_model(base, molora.MoLoRAConfig(target_modules=["emb"], num_experts=2, expert_kind="dora"))
    with pytest.raises(MoLoRAError, match=r"module 'emb': router 'arrow' derives its state from"):
        molora.get_molora_model(base, molora.MoLoRAConfig(target_modules=["emb"], num_experts=2, router="arrow", top_k=1))
    assert_same_snapshot(before, snapshot(base))


def test_bad_inputs_name_the_problem():
    emb = routed(tiny_embedding(), bank_for(11, 6, seed=1))
    with pytest.raises(IndexError):  # the base embedding's own error for an id outside [0, V)
        emb(torch.tensor([[1, 11]]))
    conv = build_routed_layer(tiny_conv(), name="c", bank=bank_for(27, 5, seed=2), router=None, expert_ids=range(3),
                              num_global_experts=3, dtype=torch.float64)
    router = molora.routers.build_router("task", num_experts=3, d_in=3)
    conv.set_shared_router(router)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with molora.context.routing(task_ids=[0, 1, 2]), pytest.raises(RoutingError, match=r"module 'c': routing signals "
                                                                                      r"are for 3 examples"):
        conv(x)


def test_peft_grouped_conv_and_changed_saved_embedding_are_adapter_errors(tmp_path):
    """A PEFT Conv2d LoRA on a grouped conv (lora_B [c_out, r/groups, 1, 1]) and an Embedding LoRA
    whose saved base embedding is not the base model's are AdapterErrors; the model is untouched."""
    torch.manual_seed(0)
    grouped = nn.Sequential()
    grouped.add_module("conv", nn.Conv2d(4, 4, 3, padding=1, groups=2))
    a = make_peft_adapter(grouped, tmp_path / "g", seed=1, r=2, target_modules=["conv"])
    with pytest.raises(AdapterError, match=r"module 'conv' is a Conv2d LoRA with lora_A \[2, 4, 3, 3\] and lora_B "
                                           r"\[4, 1, 1, 1\].*groups > 1"):
        molora.compose(grouped, [a], router="task")
    llama = tiny_llama()
    e = make_peft_adapter(llama, tmp_path / "e", seed=1, r=2, target_modules=["embed_tokens"])
    with torch.no_grad():
        llama.model.embed_tokens.weight[5] += 1.0  # the base the adapter saved its embedding on, changed
    before = snapshot(llama)
    with pytest.raises(AdapterError, match=r"module 'model.embed_tokens': the adapter saved a base embedding \[101, 32\]"):
        molora.compose(llama, [e], router="task")
    assert_same_snapshot(before, snapshot(llama))


def test_per_layer_routers_checkpoint(tmp_path):
    """Per-layer top-k routers take the layers' router widths (embedding_dim, in_channels, not the
    banks' d_in) and a checkpoint of them reloads the same outputs."""
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("emb", nn.Embedding(11, 12))
    base.add_module("conv", nn.Conv2d(1, 2, 3, padding=1))
    base.eval()
    model = molora.get_molora_model(copy.deepcopy(base), molora.MoLoRAConfig(
        target_modules=["emb", "conv"], num_experts=3, rank=2, router="topk", top_k=2))
    layers = model.routed_layers()
    assert {n: (m.bank.d_in, m.router.d_in) for n, m in layers.items()} == {"emb": (11, 12), "conv": (9, 1)}
    with torch.no_grad():
        for layer in layers.values():
            for b in layer.bank.B:
                b.normal_()

    def run(model):
        with torch.no_grad():
            return model.base_model.conv(model.base_model.emb(IDS).unsqueeze(1))

    out = run(model)
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ckpt"))
    torch.testing.assert_close(run(loaded), out)
    with model.disable_adapters():
        assert not torch.allclose(run(model), out)


def test_generate_with_embedding_experts_equals_peft(tmp_path):
    """Beam search with a per-example task routing on embed_tokens (+ q_proj): the new tokens'
    embeddings follow each row's adapter through the KV-cached decoding, as PEFT's adapter_names=."""
    from peft import PeftModel

    base = tiny_llama()
    folders = {n: make_peft_adapter(base, tmp_path / n, seed=s, r=4, target_modules=["embed_tokens", "q_proj"])
               for n, s in (("a", 1), ("b", 2))}
    model = molora.compose(copy.deepcopy(base), folders, router="task").eval()
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folders["a"]), adapter_name="a").eval()
    pm.load_adapter(str(folders["b"]), adapter_name="b")
    ids = torch.randint(3, 101, (2, 5), generator=torch.Generator().manual_seed(3))
    gen = {"max_new_tokens": 5, "pad_token_id": 0, "eos_token_id": None, "num_beams": 2, "do_sample": False,
           "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        with model.routing(task_ids=["b", "a"]):
            ours = model.generate(input_ids=ids, **gen)
        ref = pm.generate(input_ids=ids, adapter_names=["b", "a"], **gen)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_conv1d_lora_and_a_layout_for_another_layer_type_are_adapter_errors(tmp_path):
    """Conv1d LoRA stays refused; an Embedding LoRA on a module that is an nn.Linear of the same
    shapes (another base model) is refused, not composed as a linear LoRA."""
    torch.manual_seed(0)
    c1 = nn.Sequential()
    c1.add_module("conv", nn.Conv1d(3, 4, 3))
    a = make_peft_adapter(c1, tmp_path / "c1", seed=1, r=2, target_modules=["conv"])
    with pytest.raises(AdapterError, match=r"module 'conv' is a Conv1d LoRA \(tensor .* is \[2, 3, 3\]\)"):
        molora.load_peft_adapter(a)
    emb = nn.Sequential()
    emb.add_module("e", nn.Embedding(7, 5))
    e = make_peft_adapter(emb, tmp_path / "e", seed=1, r=2, target_modules=["e"])
    lin = nn.Sequential()
    lin.add_module("e", nn.Linear(7, 5))  # lora_embedding_A [2, 7], _B [5, 2] would fit its shapes
    before = snapshot(lin)
    with pytest.raises(AdapterError, match=r"adapter 'e', module 'e': the adapter holds embedding LoRA factors, but "
                                           r"the base model's module is Linear"):
        molora.compose(lin, [e], router="task")
    assert_same_snapshot(before, snapshot(lin))


def test_bfloat16_base_is_bit_exact_with_peft(tmp_path):
    """A bf16 base with float32 experts: the delta is added in float32 and the sum cast back, as
    PEFT does, so the outputs are PEFT's bit for bit (embedding and strided conv)."""
    from peft import PeftModel

    from helpers import tiny_bert

    bert = tiny_bert()
    torch.manual_seed(0)
    conv = nn.Sequential()
    conv.add_module("conv", nn.Conv2d(3, 5, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 8, 8).bfloat16()
    ids = torch.randint(3, 101, (2, 5), generator=torch.Generator().manual_seed(1))
    for base, target, run in ((bert, "word_embeddings", lambda m: m(input_ids=ids).last_hidden_state),
                              (conv.eval(), "conv", lambda m: m(x))):
        a = make_peft_adapter(base, tmp_path / target, seed=1, r=2, target_modules=[target])
        b16 = copy.deepcopy(base).to(torch.bfloat16)
        pm = PeftModel.from_pretrained(copy.deepcopy(b16), str(a)).eval()
        model = molora.compose(copy.deepcopy(b16), [a], router="task")
        with torch.no_grad(), model.routing(task_ids=[0, 0]):
            out, ref = run(model), run(pm)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
        with torch.no_grad():
            assert not torch.equal(ref, run(b16))
