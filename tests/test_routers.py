"""Routers against hand-computed small examples, and their input validation."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from molora.context import RoutingSignals
from molora.errors import RoutingError
from molora.routers import (
    ROUTERS, ClusterRouter, RetrievalRouter, SoftRouter, SwitchRouter, TaskRouter, TimeStepRouter,
    TLoRARouter, TopKRouter, TopPRouter, build_router,
)
from molora.routers.pooling import pool_sequence
from molora.routers.switch import apply_capacity
from molora.routers.timestep import interval_index, tlora_rank

NONE = RoutingSignals()
LN4, LN2 = math.log(4.0), math.log(2.0)


def _with_weight(router, weight):
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor(weight))
    return router.eval()


# W = [[1, 0], [0, 1], [0, 0]] turns x = (ln 4, ln 2) into logits (ln 4, ln 2, 0), so
# p = softmax = (4, 2, 1) / 7 = (0.5714, 0.2857, 0.1429); x = (0, 0) gives p = (1/3, 1/3, 1/3).
W3 = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
X2 = torch.tensor([[LN4, LN2], [0.0, 0.0]])


def test_registry_lists_every_router():
    assert {"soft", "topk", "topp", "switch", "task", "retrieval", "timestep", "tlora", "cluster"} <= set(ROUTERS)
    for name, cls in ROUTERS.items():
        assert cls.name == name and cls.__module__.startswith("molora.routers.") and cls.__doc__
        assert "\n" in (__import__(cls.__module__, fromlist=["x"]).__doc__ or "")  # module docstring with the formula


def test_soft_router_hand_computed():
    d = _with_weight(SoftRouter(3, 2), W3)(X2, NONE)
    assert torch.allclose(d.gates[0], torch.tensor([4.0, 2.0, 1.0]) / 7)
    assert torch.allclose(d.gates[1], torch.full((3,), 1 / 3))
    # temperature 2 halves the logits: softmax(ln 4 / 2, ln 2 / 2, 0) = (2, sqrt 2, 1) / (3 + sqrt 2)
    d = _with_weight(SoftRouter(3, 2, temperature=2.0), W3)(X2, NONE)
    assert torch.allclose(d.gates[0], torch.tensor([2.0, math.sqrt(2), 1.0]) / (3 + math.sqrt(2)))


def test_topk_hand_computed():
    r = _with_weight(TopKRouter(3, 2, top_k=2), W3)
    d = r(X2[:1], NONE)
    assert d.indices.tolist() == [[0, 1]]
    assert torch.allclose(d.gates, torch.tensor([[2 / 3, 1 / 3]]))  # (4/7, 2/7) renormalised
    r = _with_weight(TopKRouter(3, 2, top_k=2, renormalize=False), W3)
    assert torch.allclose(r(X2[:1], NONE).gates, torch.tensor([[4 / 7, 2 / 7]]))


def test_topk_noise_and_jitter_only_in_training():
    r = _with_weight(TopKRouter(3, 2, top_k=1, noise_std=10.0, jitter=0.5), W3)
    x = X2[:1].repeat(200, 1)
    assert (r(x, NONE).indices == 0).all()  # eval: deterministic
    r.train()
    torch.manual_seed(0)
    picks = r(x, NONE).indices.flatten()
    assert len(picks.unique()) == 3  # std-10 noise on logits 1.4 apart: every expert gets picked
    assert torch.equal(r.eval()(x, NONE).indices.flatten(), torch.zeros(200, dtype=torch.long))


def test_topp_hand_computed():
    r = _with_weight(TopPRouter(3, 2, top_p=0.5), W3)
    d = r(X2, NONE)
    # row 0: c_0 = 0 <= .5 keeps expert 0; c_1 = 4/7 > .5 stops -> {0}
    # row 1: (1/3 each) c = 0, 1/3 <= .5 keep two; 2/3 > .5 stops -> two experts, gates 1/2
    assert d.indices.shape == (2, 2)
    assert d.indices[0].tolist() == [0, -1] and torch.allclose(d.gates[0], torch.tensor([1.0, 0.0]))
    assert sorted(d.indices[1].tolist()) == [0, 1] and torch.allclose(d.gates[1], torch.tensor([0.5, 0.5]))
    # p = 0.6: row 0 keeps {0, 1} (4/7 = .571 <= .6), gates (4/7, 2/7) renormalised = (2/3, 1/3)
    d = _with_weight(TopPRouter(3, 2, top_p=0.6), W3)(X2[:1], NONE)
    assert d.indices.tolist() == [[0, 1]] and torch.allclose(d.gates, torch.tensor([[2 / 3, 1 / 3]]))
    # p = 1 keeps everything; max_k caps
    assert _with_weight(TopPRouter(3, 2, top_p=1.0), W3)(X2[:1], NONE).indices.tolist() == [[0, 1, 2]]
    assert _with_weight(TopPRouter(3, 2, top_p=1.0, max_k=2), W3)(X2[:1], NONE).indices.tolist() == [[0, 1]]


def test_topp_exact_tie_keeps_one_more():
    # probs (0.5, 0.25, 0.25), p = 0.5: c_1 = 0.5 does not *exceed* 0.5, so expert 2 joins
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    from molora.routers.topp import top_p_select

    gates, idx = top_p_select(probs, 0.5)
    assert idx[0, 0].item() == 0 and (idx[0] >= 0).sum() == 2


def test_switch_capacity_and_dropped_tokens():
    # W = I, x -> logits x: three tokens prefer expert 0, one prefers expert 1.
    r = _with_weight(SwitchRouter(2, 2, capacity_factor=1.0), [[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[2.0, 0.0]] * 3 + [[0.0, 2.0]])
    d = r(x, NONE)
    # capacity C = ceil(1.0 * 4 / 2) = 2: tokens 0, 1 keep expert 0, token 2 is dropped
    assert d.indices.flatten().tolist() == [0, 0, -1, 1]
    assert int(d.dropped) == 1
    p = math.exp(2) / (math.exp(2) + 1)  # 0.8808: the gate is the top probability
    assert torch.allclose(d.gates.flatten(), torch.tensor([p, p, 0.0, p]))
    # padding: N = 3 real tokens, C = ceil(1.5) = 2; the padded token 3 uses no capacity
    d = r(x.unsqueeze(0), RoutingSignals(attention_mask=torch.tensor([[1, 1, 1, 0]])))
    assert d.indices.flatten().tolist() == [0, 0, -1, -1] and int(d.dropped) == 1
    # no capacity: plain top-1
    d = _with_weight(SwitchRouter(2, 2), [[1.0, 0.0], [0.0, 1.0]])(x, NONE)
    assert d.indices.flatten().tolist() == [0, 0, 0, 1] and d.dropped is None


def test_apply_capacity_order():
    idx, dropped = apply_capacity(torch.tensor([1, 1, 1, 0, 1]), 2, capacity=2)
    assert idx.tolist() == [1, 1, -1, 0, -1] and int(dropped) == 2


def test_task_router_many_to_one_fallback_and_errors():
    r = TaskRouter(2, 4, mapping=[1, 1, 0])
    d = r(torch.zeros(3, 5, 4), RoutingSignals(task_ids=torch.tensor([0, 2, 1])))
    assert d.indices.flatten().tolist() == [1, 0, 1] and d.per_example and torch.equal(d.gates, torch.ones(3, 1))
    with pytest.raises(RoutingError, match=r"task ids \[3\] outside \[0, 3\)"):
        r(torch.zeros(1, 4), RoutingSignals(task_ids=torch.tensor([3])))
    fb = TaskRouter(2, 4, mapping=[1, 1, 0], fallback=0)
    assert fb(torch.zeros(2, 4), RoutingSignals(task_ids=torch.tensor([7, 0]))).indices.flatten().tolist() == [0, 1]
    with pytest.raises(RoutingError, match="needs task_ids"):
        r(torch.zeros(1, 4), NONE)
    with pytest.raises(ValueError, match="mapping"):
        TaskRouter(2, 4, mapping=[2])
    with pytest.raises(ValueError, match="fallback"):
        TaskRouter(2, 4, fallback=5)


def _retrieval(top_k=2, temperature=0.1):
    r = RetrievalRouter(3, 8, top_k=top_k, temperature=temperature, key_dim=2)
    r.fit_keys(0, torch.tensor([[1.0, 0.0], [2.0, 0.0]]))  # normalised (1,0),(1,0): key (1, 0)
    r.fit_keys(1, torch.tensor([[0.0, 3.0]]))  # key (0, 1)
    r.fit_keys(2, torch.tensor([[-1.0, 0.0]]))  # key (-1, 0)
    return r


def test_retrieval_hand_computed():
    r = _retrieval()
    # q = (3, 4) / 5: cos with keys = (0.6, 0.8, -0.6); top-2 = experts (1, 0) with (0.8, 0.6);
    # gates = softmax((0.8, 0.6) / 0.1) = (1, e^-2) / (1 + e^-2) = (0.8808, 0.1192)
    d = r(torch.zeros(1, 4, 8), RoutingSignals(embeddings=torch.tensor([[3.0, 4.0]])))
    assert d.per_example and d.indices.tolist() == [[1, 0]]
    assert torch.allclose(d.gates, torch.tensor([[1 / (1 + math.exp(-2)), 1 - 1 / (1 + math.exp(-2))]]), atol=1e-6)
    assert torch.allclose(r.keys[0], torch.tensor([1.0, 0.0]))


def test_retrieval_thousand_keys_returns_the_right_experts():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1000, 384, generator=g), dim=-1)
    r = RetrievalRouter(1000, 32, top_k=3, key_dim=384)
    r.set_keys(keys)
    target = torch.randint(0, 1000, (64,), generator=g)
    queries = keys[target] + 0.02 * torch.randn(64, 384, generator=g)
    d = r(torch.zeros(64, 2, 32), RoutingSignals(embeddings=queries))
    assert torch.equal(d.indices[:, 0], target)
    assert d.gates.shape == (64, 3) and torch.allclose(d.gates.sum(-1), torch.ones(64))
    assert (d.gates[:, 0] >= d.gates[:, 1]).all()


def test_retrieval_key_changes_reach_the_routing():
    """The normalised keys are cached: refitting, set_keys and loading a state dict must all be seen."""
    r = RetrievalRouter(2, 2, top_k=1, key_dim=2)
    r.set_keys(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    signals = RoutingSignals(embeddings=torch.tensor([[1.0, 0.1]]))
    assert r(torch.zeros(1, 2), signals).indices.tolist() == [[0]]
    r.fit_keys(1, torch.tensor([[1.0, 0.2]]))  # expert 1 now sits closer to the query
    assert r(torch.zeros(1, 2), signals).indices.tolist() == [[1]]
    r.set_keys(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert r(torch.zeros(1, 2), signals).indices.tolist() == [[0]]
    other = RetrievalRouter(2, 2, top_k=1, key_dim=2)
    other.set_keys(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    r.load_state_dict(other.state_dict())
    assert r(torch.zeros(1, 2), signals).indices.tolist() == [[1]]


def _lda_data(seed=0, n=40, E=3, D=6):
    """Per expert n embeddings: a large shared spread along dim 0 (style, length...) and a small
    expert offset along dim 1..E: cosine to the means is dominated by the shared direction."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in range(E):
        x = 0.15 * torch.randn(n, D, generator=g, dtype=torch.float64)
        x[:, 0] = 1.0 + 3.0 * torch.randn(n, generator=g, dtype=torch.float64)
        x[:, 1 + e] += 0.6
        out.append(x)
    return out


def test_retrieval_mahalanobis_equals_sklearn_lda():
    """Scores = scikit-learn's LDA decision function (lsqr, ShrunkCovariance, uniform priors) up to the
    log-prior constant; keys fitted one expert at a time give the pooled covariance."""
    from sklearn.covariance import ShrunkCovariance
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    train, test = _lda_data(0), _lda_data(1)
    r = RetrievalRouter(3, 4, top_k=1, key_dim=6, metric="mahalanobis", shrinkage=0.3).double()
    for e, x in enumerate(train):
        r.fit_keys(e, x)
    X = torch.nn.functional.normalize(torch.cat(train), dim=-1).numpy()
    y = np.repeat(np.arange(3), 40)
    lda = LinearDiscriminantAnalysis(solver="lsqr", covariance_estimator=ShrunkCovariance(shrinkage=0.3),
                                     priors=np.full(3, 1 / 3)).fit(X, y)
    q = torch.cat(test)
    ref = lda.decision_function(torch.nn.functional.normalize(q, dim=-1).numpy())
    ours = r.similarities(q).numpy() + math.log(1 / 3)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert int(r.cov_count) == 120
    # set_keys with the same statistics gives the same scores; refits are seen (cache by version)
    s = RetrievalRouter(3, 4, top_k=1, key_dim=6, metric="mahalanobis", shrinkage=0.3).double()
    s.set_keys(r.keys.clone(), covariance=r.covariance.clone(), count=120)
    assert torch.allclose(s.similarities(q), r.similarities(q))
    s.set_keys(r.keys.flip(0), covariance=r.covariance.clone(), count=120)
    assert torch.allclose(s.similarities(q), r.similarities(q).flip(-1))


def test_retrieval_mahalanobis_separates_what_cosine_confuses():
    train, test = _lda_data(0), _lda_data(1)
    truth = torch.arange(3).repeat_interleave(40)
    acc = {}
    for metric in ("cosine", "mahalanobis"):
        r = RetrievalRouter(3, 4, top_k=1, key_dim=6, metric=metric).double()
        for e, x in enumerate(train):
            r.fit_keys(e, x)
        d = r(torch.zeros(120, 4, dtype=torch.float64), RoutingSignals(embeddings=torch.cat(test)))
        acc[metric] = (d.indices[:, 0] == truth).double().mean().item()
    assert acc["mahalanobis"] > 0.95 and acc["mahalanobis"] > acc["cosine"] + 0.15, acc


def test_retrieval_mahalanobis_bad_input():
    with pytest.raises(ValueError, match="metric"):
        RetrievalRouter(2, 2, key_dim=2, metric="euclid")
    with pytest.raises(ValueError, match="shrinkage"):
        RetrievalRouter(2, 2, key_dim=2, metric="mahalanobis", shrinkage=0)
    r = RetrievalRouter(2, 2, key_dim=2, metric="mahalanobis")
    with pytest.raises(ValueError, match="covariance="):
        r.set_keys(torch.eye(2))
    with pytest.raises(ValueError, match=r"covariance must be \[2, 2\]"):
        r.set_keys(torch.eye(2), covariance=torch.eye(3), count=4)
    with pytest.raises(ValueError, match="only used with metric='mahalanobis'"):
        RetrievalRouter(2, 2, key_dim=2).set_keys(torch.eye(2), covariance=torch.eye(2), count=4)


def test_retrieval_unfitted_and_capture_and_hidden_source():
    r = RetrievalRouter(3, 2, top_k=1, key_dim=2)
    r.fit_keys(0, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(RoutingError, match=r"experts \[1, 2\] have no key"):
        r(torch.zeros(1, 2), RoutingSignals(embeddings=torch.ones(1, 2)))
    with pytest.raises(RoutingError, match="needs embeddings"):
        r(torch.zeros(1, 2), NONE)
    # hidden source: the query is the layer input pooled over the mask; capture() collects it
    h = RetrievalRouter(2, 2, top_k=1, source="hidden")
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    with h.capture() as queries:
        d = h(x, RoutingSignals(attention_mask=mask))
    assert torch.equal(d.gates, torch.zeros(1, 2)) and torch.allclose(queries[0], torch.tensor([[2.0, 0.0]]))
    h.fit_keys(0, queries[0])
    h.fit_keys(1, torch.tensor([[0.0, 1.0]]))
    assert h(x, RoutingSignals(attention_mask=mask)).indices.tolist() == [[0]]


def test_timestep_interval_experts_at_boundaries():
    # intervals (1, 2, 4) own experts 0 | 1-2 | 3-6; T = 1000; i = max(1, ceil(t n / T)), 1-based.
    r = TimeStepRouter(7, 4, intervals=[1, 2, 4], num_timesteps=1000)
    t = torch.tensor([0, 1, 250, 251, 500, 501, 750, 999])
    d = r(torch.zeros(8, 3, 4), RoutingSignals(timesteps=t))
    expected = [
        [0, 1, 3],  # t=0 joins the first interval of every granularity
        [0, 1, 3],  # t=1: ceil(0.002) = 1, ceil(0.004) = 1
        [0, 1, 3],  # t=250: n=4 ceil(1.0) = 1 -> a boundary belongs to the interval below
        [0, 1, 4],  # t=251: n=4 ceil(1.004) = 2
        [0, 1, 4],  # t=500: n=2 ceil(1.0) = 1; n=4 ceil(2.0) = 2
        [0, 2, 5],  # t=501: n=2 ceil(1.002) = 2; n=4 ceil(2.004) = 3
        [0, 2, 5],  # t=750: n=4 ceil(3.0) = 3
        [0, 2, 6],  # t=999: n=2 ceil(1.998) = 2; n=4 ceil(3.996) = 4
    ]
    assert d.indices.tolist() == expected and d.per_example
    assert torch.allclose(d.gates, torch.tensor([[1.0, 0.5, 0.5]] * 8))  # core ungated, context uniform at init
    # fractional t (T = 1): inside the intervals; on a boundary only integer t is exact
    assert interval_index(torch.tensor([0.3, 0.34, 0.6, 0.999]), 3, 1).tolist() == [0, 1, 1, 2]


def test_timestep_context_gates_learn_per_timestep():
    r = TimeStepRouter(3, 4, intervals=[1, 2], num_timesteps=10)  # one context granularity: gate 1
    d = r(torch.zeros(2, 4), RoutingSignals(timesteps=torch.tensor([0, 9])))
    assert torch.allclose(d.gates, torch.ones(2, 2))
    r = TimeStepRouter(7, 4, intervals=[1, 2, 4], num_timesteps=10)
    with torch.no_grad():
        r.time_embedding.weight[3] = torch.tensor([math.log(3.0), 0.0])  # t = 3 favours n=2 3:1
    d = r(torch.zeros(2, 4), RoutingSignals(timesteps=torch.tensor([3, 4])))
    assert torch.allclose(d.gates, torch.tensor([[1.0, 0.75, 0.25], [1.0, 0.5, 0.5]]))


def test_tlora_rank_schedule():
    # r(t) = floor(((T - t) / T)^a (r_max - r_min)) + r_min with T = 1000, r_max = 8, r_min = 2
    t = torch.tensor([0, 500, 999], dtype=torch.float64)
    assert tlora_rank(t, 1000, 8, 2, 1.0).tolist() == [8, 5, 2]  # floor(6)+2, floor(3)+2, floor(0.006)+2
    assert tlora_rank(t, 1000, 8, 2, 2.0).tolist() == [8, 3, 2]  # floor(1.5) + 2 at t = 500
    r = TLoRARouter(8, 4, num_timesteps=1000, min_rank=2)
    d = r(torch.zeros(3, 4), RoutingSignals(timesteps=t.float()))
    assert d.gates.sum(-1).tolist() == [8, 5, 2] and torch.equal(d.gates[1], torch.tensor([1.0] * 5 + [0.0] * 3))


def test_tlora_rank_is_the_papers_floor_at_every_integer_timestep():
    """``floor((r_max - r_min)(T - t) / T) + r_min`` exactly, in integers, for every t in [0, T)."""
    T = 1000
    t = torch.arange(T)
    for r_max, r_min in ((4, 1), (64, 32), (51, 1), (8, 0)):
        want = (r_max - r_min) * (T - t) // T + r_min
        assert torch.equal(tlora_rank(t, T, r_max, r_min, 1.0), want), (r_max, r_min)
    # computing (T - t) / T first, as the official code does, gives 28.999... + 1 here, not 30
    assert int(tlora_rank(torch.tensor([420]), T, 51, 1, 1.0)) == 30


def test_cluster_router_kmeans_and_universal_expert():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4)[:3] * 5  # three well separated directions
    emb = torch.cat([c + 0.1 * torch.randn(20, 4, generator=g) for c in centers])
    r = ClusterRouter(4, 8, universal_expert=3, key_dim=4)  # 3 clusters -> experts 0, 1, 2
    labels = r.fit(emb)
    assert len(labels[:20].unique()) == len(labels[20:40].unique()) == len(labels[40:].unique()) == 1
    d = r(torch.zeros(3, 8), RoutingSignals(embeddings=centers))
    assert d.indices[:, 1].tolist() == [3, 3, 3] and torch.equal(d.gates, torch.ones(3, 2))
    assert sorted(d.indices[:, 0].tolist()) == [0, 1, 2]  # each center gets its own cluster expert
    # the routed expert is the one of the query's nearest centroid
    assert d.indices[0, 0].item() == r.cluster_experts[labels[0]].item()
    with pytest.raises(RoutingError, match="not fitted"):
        ClusterRouter(2, 4)(torch.zeros(1, 4), RoutingSignals(embeddings=torch.ones(1, 4)))


def test_pool_sequence_masked_mean():
    x = torch.tensor([[[1.0], [3.0], [8.0]]])
    assert pool_sequence(x, torch.tensor([[1, 1, 0]])).item() == 2.0  # (1 + 3) / 2
    assert pool_sequence(x, None).item() == 4.0


def test_context_granularity_uses_embeddings():
    r = _with_weight(SoftRouter(3, 8, granularity="context", context_dim=2), W3)
    d = r(torch.zeros(1, 5, 8), RoutingSignals(embeddings=X2[:1]))
    assert d.per_example and torch.allclose(d.gates[0], torch.tensor([4.0, 2.0, 1.0]) / 7)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TopKRouter(4, 8, top_k=5), "top_k"),
        (lambda: TopKRouter(4, 8, top_k=0), "top_k"),
        (lambda: TopPRouter(4, 8, top_p=0.0), "top_p"),
        (lambda: TopPRouter(4, 8, top_p=1.5), "top_p"),
        (lambda: SoftRouter(4, 8, temperature=0.0), "temperature"),
        (lambda: TopKRouter(4, 8, temperature=-1.0), "temperature"),
        (lambda: RetrievalRouter(4, 8, temperature=0), "temperature"),
        (lambda: RetrievalRouter(4, 8, top_k=9), "top_k"),
        (lambda: SwitchRouter(4, 8, capacity_factor=0), "capacity_factor"),
        (lambda: SoftRouter(4, 8, granularity="word"), "granularity"),
        (lambda: TimeStepRouter(4, 8, intervals=[1, 2]), "intervals"),
        (lambda: TLoRARouter(4, 8, min_rank=5), "min_rank"),
        (lambda: ClusterRouter(4, 8, universal_expert=4), "universal_expert"),
        (lambda: build_router("topk", num_experts=4, d_in=8, top_q=3), "bad arguments"),
        (lambda: build_router("nope", num_experts=4, d_in=8), "unknown router"),
    ],
)
def test_bad_construction_names_the_parameter(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "router, signals, match",
    [
        (TimeStepRouter(3, 4, intervals=[1, 2], num_timesteps=10), RoutingSignals(timesteps=torch.tensor([10])), "timesteps"),
        (TimeStepRouter(3, 4, intervals=[1, 2], num_timesteps=10), RoutingSignals(timesteps=torch.tensor([-0.5])), "timesteps"),
        (TLoRARouter(4, 4, num_timesteps=10), RoutingSignals(timesteps=torch.tensor([12.0])), "timesteps"),
        (_retrieval(), RoutingSignals(embeddings=torch.ones(1, 3)), r"embeddings must be \[batch, 2\]"),
        (TaskRouter(2, 4), RoutingSignals(task_ids=torch.tensor([-1])), "task ids"),
        (SoftRouter(3, 8, granularity="context", context_dim=2), RoutingSignals(embeddings=torch.ones(1, 5)), "embeddings"),
    ],
)
def test_bad_signals_raise_value_errors_naming_them(router, signals, match):
    with pytest.raises(ValueError, match=match):
        router(torch.zeros(1, 4), signals)


def test_fit_keys_validates():
    r = RetrievalRouter(2, 4, key_dim=3)
    with pytest.raises(ValueError, match=r"embeddings must be \[batch, 3\]"):
        r.fit_keys(0, torch.ones(2, 4))
    with pytest.raises(ValueError, match="expert"):
        r.fit_keys(2, torch.ones(2, 3))
