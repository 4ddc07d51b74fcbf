"""Many threads running forwards and backwards on one model give exactly the sequential results.

Every router kind (per-request mixtures and retrieval, exact and HNSW, included), fused (router
logits in the base GEMM) and unfused, token- and sequence-level,
with different inputs and routing signals per call; outputs, input and parameter gradients, and
the aux loss each thread reads after its own forward, all against the same calls run one after
another. A barrier starts the threads together so that their forwards interleave.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from molora import MoLoRAConfig, get_molora_model


class _Tiny(nn.Module):
    """Two linears over ``[batch, seq, d]`` with the transformers-style ``attention_mask`` keyword."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(d, 24)
        self.down = nn.Linear(24, d)

    def forward(self, x, attention_mask=None):
        return self.down(torch.tanh(self.up(x)))


ROUTERS = {
    "topk1-fused": dict(router="topk", top_k=1),
    "topk2-fused": dict(router="topk", top_k=2),
    "topk2-unfused": dict(router="topk", top_k=2, dropout=0.0, router_kwargs={"granularity": "sequence"}),
    "soft-token": dict(router="soft"),
    "soft-sequence": dict(router="soft", router_kwargs={"granularity": "sequence"}),
    "task": dict(router="task"),
    "switch": dict(router="switch"),
    "mixture": dict(router="mixture"),
    "retrieval": dict(router="retrieval", router_kwargs={"top_k": 2, "key_dim": 8}),
    "retrieval-hnsw": dict(router="retrieval", router_kwargs={"top_k": 2, "key_dim": 8, "search": "hnsw"}),
    # a mixed bank (molora.kinds.mixed): the parts' stacks and DoRA's base-output factor per call
    "topk2-mixed-kinds": dict(router="topk", top_k=2, expert_kind=["lora", "dora", "qr_lora", "moslora"]),
}


def _model(kind: str):
    torch.manual_seed(0)
    cfg = MoLoRAConfig(target_modules=["up", "down"], num_experts=4, rank=4, aux_loss_coef=0.01, z_loss_coef=0.001,
                       **ROUTERS[kind])
    if kind == "retrieval-hnsw":
        pytest.importorskip("faiss")
    model = get_molora_model(_Tiny(), cfg)
    with torch.no_grad():  # B = 0 at init: give the experts (and routers) values that matter
        for p in model.trainable_parameters():
            p.normal_(0, 0.5)
    if kind.startswith("retrieval"):
        model.shared_router.set_keys(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)))
    return model


def _calls(n: int):
    g = torch.Generator().manual_seed(1)
    calls = []
    for i in range(n):
        batch = 1 + i % 3
        x = torch.randn(batch, 5, 16, generator=g)
        mask = torch.ones(batch, 5, dtype=torch.long)
        mask[0, 5 - i % 3:] = 0
        weights = torch.randn(batch, 4, generator=g) * (torch.rand(batch, 4, generator=g) < 0.5)  # sparse mixtures
        calls.append((x, mask, {"task_ids": torch.randint(0, 4, (batch,), generator=g), "expert_weights": weights,
                                "embeddings": torch.randn(batch, 8, generator=g)}))
    return calls


def _run(model, call):
    x, mask, signals = call
    x = x.clone().requires_grad_()
    with model.routing(**signals):
        y = model(x, attention_mask=mask)
    aux = model.aux_loss()
    params = model.trainable_parameters()
    grads = torch.autograd.grad((y * y).sum() + aux, [x, *params], allow_unused=True)
    return [y.detach(), aux.detach()] + [g for g in grads if g is not None]


def _threaded(model, calls, threads: int, repeats: int):
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(w: int) -> None:
        try:
            torch.set_num_threads(1)  # a new thread's intra-op pool has the default size
            barrier.wait()
            for _ in range(repeats):
                for i in range(w, len(calls), threads):
                    got = _run(model, calls[i])
                    if i in results:  # every repeat must give the same answer
                        for a, b in zip(got, results[i]):
                            if not torch.equal(a, b):
                                raise AssertionError(f"call {i}: repeat differs")
                    results[i] = got
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_threads_equal_sequential(kind, threads):
    torch.set_num_threads(1)  # one intra-op thread per Python thread: identical BLAS blocking
    try:
        model = _model(kind).train()
        if kind == "topk2-unfused":
            assert model.routed_layers()["up"]._fusable_router_weight(torch.float32) is None
        elif kind.endswith("fused") or kind in ("soft-token", "switch"):
            assert model.routed_layers()["up"]._fusable_router_weight(torch.float32) is not None
        calls = _calls(24)
        want = [_run(model, c) for c in calls]
        got = _threaded(model, calls, threads, repeats=6)  # 144 calls (forward + backward) per run
        for i, (a_list, b_list) in enumerate(zip((got[i] for i in range(len(calls))), want)):
            assert len(a_list) == len(b_list)
            for j, (a, b) in enumerate(zip(a_list, b_list)):
                assert torch.equal(a, b), f"{kind}: call {i}, output {j} differs from the sequential run"
    finally:
        torch.set_num_threads(2)


def test_many_threaded_forwards_top1_inference():
    """The case that went wrong before (a top-1 router, fused: 13 of 6000 outputs wrong): 4
    threads, 3000 inference forwards in all, each checked against its sequential output."""
    torch.set_num_threads(1)
    try:
        model = _model("topk1-fused").eval()
        calls = _calls(40)
        with torch.no_grad():
            want = []
            for x, mask, ids in calls:
                want.append(model(x, attention_mask=mask))
        errors: list[str] = []
        barrier = threading.Barrier(4)

        def worker(w: int) -> None:
            torch.set_num_threads(1)
            barrier.wait()
            with torch.no_grad():
                for rep in range(750 // 10):
                    for i in range(w * 10, w * 10 + 10):
                        x, mask, _ = calls[i]
                        if not torch.equal(model(x, attention_mask=mask), want[i]):
                            errors.append(f"thread {w} call {i} repeat {rep}")

        pool = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert not errors, errors[:5]
    finally:
        torch.set_num_threads(2)


def test_aux_loss_reads_this_threads_forward():
    """A thread's aux loss and routing stats are of its own last forward, not of another thread's."""
    model = _model("topk2-fused")
    calls = _calls(2)
    want = []
    for x, mask, _ in calls:
        model(x, attention_mask=mask)
        want.append((model.aux_loss().item(), model.routing_stats()["layers"]["up"]["token_fraction"]))
    barrier = threading.Barrier(2)
    got = {}

    def worker(i: int) -> None:
        x, mask, _ = calls[i]
        model(x, attention_mask=mask)
        barrier.wait()  # both forwards done before either reads
        got[i] = (model.aux_loss().item(), model.routing_stats()["layers"]["up"]["token_fraction"])

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert got == {0: want[0], 1: want[1]}
    assert model.last_routing() and not hasattr(model.routed_layers()["up"], "last_decision")


@pytest.mark.parametrize("router", ["task", "mixture", "topk"])
def test_two_threads_generating_at_once_equal_sequential(router):
    """Each generate call reads the bank stacks once and keeps per-example decisions in its own
    generation scope: two threads generating on one model at once (different prompts and signals,
    greedy and beam search) give each call's sequential result."""
    from helpers import tiny_llama

    torch.manual_seed(0)
    extra = {"top_k": 2} if router == "topk" else {}
    model = get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, rank=4,
                                                        router=router, **extra))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(2)
    calls = []
    for i in range(4):
        ids = torch.randint(1, 101, (2, 4 + i % 3), generator=g)
        signals = {"task_ids": torch.randint(0, 3, (2,), generator=g),
                   "expert_weights": torch.rand(2, 3, generator=g) * (torch.rand(2, 3, generator=g) < 0.7)}
        gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=1 + i % 2)
        calls.append((ids, signals, gen))

    def run(call):
        ids, signals, gen = call
        with torch.no_grad(), model.routing(**signals):
            return model.generate(ids, attention_mask=torch.ones_like(ids), **gen)

    want = [run(c) for c in calls]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(w: int) -> None:
        try:
            torch.set_num_threads(1)
            barrier.wait()
            for _ in range(2):
                for i in range(w, len(calls), 2):
                    out = run(calls[i])
                    if not torch.equal(out, want[i]):
                        raise AssertionError(f"call {i}: {out.tolist()} != {want[i].tolist()}")
                    got[i] = out
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    assert sorted(got) == list(range(len(calls)))
    assert len({tuple(w.flatten().tolist()) for w in want}) > 1  # the calls differ
