"""torch.compile(fullgraph=True) of a routed model: one graph, no break, for the static, task,
soft, top-k and Arrow routers (also top-k over many experts, where eager runs the grouped form), and
the compiled forward and backward equal eager."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from molora import MoLoRAConfig, get_molora_model


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


CASES = {
    "static": dict(router="static", num_experts=3),
    "task": dict(router="task", num_experts=3),
    "soft": dict(router="soft", num_experts=3),
    "topk": dict(router="topk", top_k=2, num_experts=4),
    "topk-many": dict(router="topk", top_k=2, num_experts=32),  # eager: the grouped form
    "arrow": dict(router="arrow", top_k=2, num_experts=4),
    # expert kinds: their materialisation (triu of the stacked dR, bmm of the mixers, the clamped
    # ARD gates times A) is in the graph
    "qr_lora": dict(router="topk", top_k=2, num_experts=4, expert_kind="qr_lora"),
    "moslora": dict(router="soft", num_experts=3, expert_kind="moslora"),
    "ard_lora": dict(router="task", num_experts=3, expert_kind="ard_lora"),
    "dora": dict(router="topk", top_k=2, num_experts=4, expert_kind="dora"),  # + the base-output rescaling
    "ortho_lora": dict(router="soft", num_experts=3, expert_kind="ortho_lora"),  # both terms stacked
    # a mixed bank: the parts' stacks padded, concatenated and permuted in the graph
    "mixed": dict(router="topk", top_k=2, num_experts=5, expert_kind=["lora", "dora", "qr_lora", "moslora", "lora"]),
}


class _Out(NamedTuple):
    logits: torch.Tensor


class _Tiny(torch.nn.Module):
    """An embedding and two linears, with a causal LM's calling convention (fast to trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(128, 32)
        self.q_proj = torch.nn.Linear(32, 48)
        self.v_proj = torch.nn.Linear(48, 128)

    def forward(self, input_ids):
        return _Out(self.v_proj(torch.tanh(self.q_proj(self.embed(input_ids)))))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_fullgraph_compile_equals_eager(kind):
    """fullgraph=True raises on any graph break; tiny LLaMA for the many-expert top-k case."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = _llama() if kind == "topk-many" else _Tiny()
    model = get_molora_model(base, MoLoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, **CASES[kind]))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    signals = {"task_ids": torch.tensor([2, 0])}
    params = model.trainable_parameters()

    def step(ids):
        logits = model(input_ids=ids).logits
        return logits, torch.autograd.grad(logits.square().mean(), params)

    compiled = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True, backend="aot_eager")
    with model.routing(**signals):
        want, want_grads = step(ids)
        got = compiled(ids)
        got_grads = torch.autograd.grad(got.square().mean(), params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if kind == "task":  # signals of another call reach the compiled graph (no stale constant)
        with model.routing(task_ids=torch.tensor([1, 1])):
            other = compiled(ids)
            want_other = model(input_ids=ids).logits
        torch.testing.assert_close(other, want_other, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(other, got)


def _grouped_case(shared: bool, masked: bool, dtype=torch.float64):
    torch.manual_seed(0)
    T, d, E, r, k = 24, 8, 5, 3, 2
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    A = torch.randn(*((r, d) if shared else (E, r, d)), dtype=dtype, requires_grad=True)
    B = torch.randn(E, d, r, dtype=dtype, requires_grad=True)
    gates, idx = torch.randn(T, E).softmax(-1).topk(k, -1)
    idx[3, 1] = -1  # an empty slot: the op's buffers keep a tail unused
    gates = gates.to(dtype).requires_grad_()
    mask = (torch.rand(E, r) > 0.3).to(dtype) if masked else None
    return x, A, B, gates, idx, torch.rand(E, dtype=dtype) + 0.5, mask


@pytest.mark.parametrize("shared,masked,with_out", [(False, False, True), (False, True, False), (True, False, True)])
def test_grouped_custom_op_passes_opcheck(shared, masked, with_out):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration and dispatch."""
    from molora.kernels.grouped import grouped_lora_op

    x, A, B, gates, idx, s, mask = _grouped_case(shared, masked)
    out = torch.randn(x.shape[0], B.shape[1], dtype=x.dtype, requires_grad=True) if with_out else None
    torch.library.opcheck(grouped_lora_op, (x, A, B, gates, idx, s, mask, out))


def test_compiled_grouped_form_is_one_op_equal_to_eager():
    """Under torch.compile the grouped form stays grouped (the custom op is in the graph, the dense
    form is not taken) and equals eager, forward and every gradient (float64, per-group rows too)."""
    from molora.kernels import grouped

    x, A, B, gates, idx, s, mask = _grouped_case(False, True)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    for group_rows in (1, 4):
        g, i = (gates, idx) if group_rows == 1 else (gates[::group_rows], idx[::group_rows])

        def f(x, g=g, i=i, group_rows=group_rows):
            return grouped.routed_lora_grouped(x, A, B, g, i, s, mask, gather=False, group_rows=group_rows)

        torch._dynamo.reset()
        want = f(x)
        got = torch.compile(f, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got.square().sum(), [x, A, B, gates]),
                        torch.autograd.grad(want.square().sum(), [x, A, B, gates])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert any("molora.grouped_lora" in t for t in targets), targets
