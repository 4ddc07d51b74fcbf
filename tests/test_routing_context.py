"""Routing signals: validation, shared routers deciding once per forward, thread isolation."""

from __future__ import annotations

import threading

import pytest
import torch

import molora
from molora import MoLoRAConfig, get_molora_model
from molora.errors import RoutingError

from helpers import model_inputs


def test_shared_router_decides_once_per_forward(bert):
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query", "value", "key"], num_experts=3, router="task"))
    calls = []
    router = model.shared_router
    original = router.forward
    router.forward = lambda x, s: calls.append(1) or original(x, s)
    with torch.no_grad(), model.routing(task_ids=[0, 1, 2]):
        model(**model_inputs("bert"))
        assert len(calls) == 1  # 6 routed layers, one decision
        model(**model_inputs("bert"))
        assert len(calls) == 2


@pytest.mark.parametrize(
    "signals, match",
    [
        ({"task_ids": [[0, 1]]}, r"task_ids.*\[batch\]"),
        ({"task_ids": [0.5, 1.0]}, "integers"),
        ({"embeddings": [1.0, 2.0]}, r"embeddings.*\[batch, dim\]"),
        ({"timesteps": [float("nan")]}, "NaN"),
        ({"task_ids": [0, 1], "timesteps": [1, 2, 3]}, "batch size"),
    ],
)
def test_malformed_signals(signals, match):
    with pytest.raises(RoutingError, match=match):
        with molora.routing(**signals):
            pass


def test_task_ids_out_of_range_and_missing(bert):
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query"], num_experts=2, router="task"))
    inputs = model_inputs("bert")
    with pytest.raises(RoutingError, match=r"task ids \[5\] outside \[0, 2\)"):
        with model.routing(task_ids=[0, 5, 1]):
            model(**inputs)
    with pytest.raises(RoutingError, match="needs task_ids"):
        model(**inputs)
    with pytest.raises(RoutingError, match="batch size 3"):
        with model.routing(task_ids=[0, 1]):
            model(**inputs)
    with pytest.raises(RoutingError, match="unknown task name 'zzz'"):
        model.routing(task_ids=["expert_0", "zzz"])


def test_signals_are_thread_local():
    seen = {}

    def worker(i):
        with molora.routing(task_ids=[i]):
            barrier.wait()
            seen[i] = molora.context.current_signals().task_ids.item()

    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0: 0, 1: 1, 2: 2, 3: 3}
    assert molora.context.current_signals().task_ids is None


def test_forward_attention_mask_reaches_the_routers(bert):
    model = get_molora_model(bert, MoLoRAConfig(target_modules=["query"], num_experts=2, router="soft",
                                                router_kwargs={"granularity": "sequence"}))
    inputs = model_inputs("bert")
    seen = []
    layer = model.routed_layers()["encoder.layer.0.attention.self.query"]
    original = layer.router.forward
    layer.router.forward = lambda x, s: seen.append(s.attention_mask) or original(x, s)
    model(**inputs)
    assert torch.equal(seen[0], inputs["attention_mask"])


def test_signals_are_checked_for_one_batch_size_and_kept_uncopied():
    from molora.context import make_signals

    with pytest.raises(RoutingError, match=r"disagree on the batch size: \{'task_ids': 2, 'embeddings': 3\}"):
        make_signals(task_ids=[0, 1], embeddings=torch.zeros(3, 4))
    emb = torch.randn(2, 4)
    with molora.routing(embeddings=emb, task_ids=[0, 1]) as signals:
        assert signals.embeddings is emb  # validated in place, never copied per routing block
