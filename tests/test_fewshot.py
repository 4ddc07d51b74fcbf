"""Few-shot composition: router training, LoRAHub CMA-ES, X-LoRA-style gates, top-1 retrieval.

References are independent of molora's routing: base weights patched by hand with the
hand-computed deltas (read straight from the PEFT safetensors files), PEFT's own outputs, and
closed-form gates.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import molora
from molora.errors import MoLoRAError
from molora.expert_retrieval import retrieve_expert, route_to_expert
from molora.train_router import router_parameters
from molora.lorahub import LORAHUB_EXPERT, cma_minimize, lorahub
from molora.xlora_style import XLoRAStyleClassifier, attach_xlora_style

from helpers import make_peft_adapter, model_inputs, peft_output, tiny_bert

pytest.importorskip("peft")
pytest.importorskip("cma")

TARGETS = ["query", "value"]


@pytest.fixture
def setup(tmp_path):
    base = tiny_bert()
    dirs = {n: make_peft_adapter(base, tmp_path / n, seed=s, r=4, alpha=8, target_modules=TARGETS)
            for n, s in (("a", 1), ("b", 2), ("c", 3))}
    return base, dirs


def _inputs(n: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _targets(base, dirs, inputs, expert: str) -> torch.Tensor:
    """Mean-pooled outputs of the model with one adapter (PEFT), the regression target."""
    return peft_output(base, dirs[expert], inputs).mean(1)


def _regression_loss(inputs, targets):
    def loss_fn(model, batch):
        idx = torch.tensor(batch)
        out = model(input_ids=inputs["input_ids"][idx], attention_mask=inputs["attention_mask"][idx]).last_hidden_state
        return F.mse_loss(out.mean(1), targets[idx]) * 100
    return loss_fn


def _hand_delta_model(base, deltas: dict[str, torch.Tensor]):
    """A copy of ``base`` with W += delta for each module path: the independent reference."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, d in deltas.items():
            ref.get_submodule(path).weight += d
    return ref


def _factors(dirs, name):
    st = load_file(str(dirs[name] / "adapter_model.safetensors"))
    out = {}
    for key, value in st.items():
        path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        out.setdefault(path, {})["A" if ".lora_A." in key else "B"] = value
    return out


# ---------------------------------------------------------------------------------------------- train_router
@pytest.mark.parametrize("router", ["per_layer", "shared", "weights"])
@pytest.mark.parametrize("n", [5, 64])
def test_router_training_learns_the_right_expert(setup, router, n):
    base, dirs = setup
    inputs = _inputs(n)
    targets = _targets(base, dirs, inputs, "b")
    model = molora.compose(copy.deepcopy(base), dirs)
    loss_fn = _regression_loss(inputs, targets)
    with torch.no_grad():
        before = float(loss_fn(model, list(range(n))))
    res = molora.train_router(model, list(range(n)), loss_fn=loss_fn, router=router, steps=40, lr=0.05, patience=40, seed=0,
                             folds=5 if n < 32 else None)
    with torch.no_grad():
        after = float(loss_fn(model, list(range(n))))
    if n < 32:  # few shots: 5-fold step selection asked for, then all shots train
        assert res.folds == 5 and res.num_train == n and res.num_val == 0
    else:
        assert res.folds == 1 and res.num_val == max(1, round(0.25 * n)) and res.num_train == n - res.num_val
    assert after < 0.7 * before, (before, after)
    # Experts stayed frozen and exactly as loaded.
    assert all(not p.requires_grad for layer in model.routed_layers().values() for p in layer.bank.parameters())
    if router == "weights":
        w = model.shared_router.weights().detach()
        assert int(w.argmax()) == 1 and float(w[1]) > 0.5


def test_router_training_is_deterministic_under_seed(setup):
    base, dirs = setup
    inputs = _inputs(16)
    loss_fn = _regression_loss(inputs, _targets(base, dirs, inputs, "c"))

    def run(seed):
        model = molora.compose(copy.deepcopy(base), dirs)
        res = molora.train_router(model, list(range(16)), loss_fn=loss_fn, steps=8, lr=0.05, seed=seed)
        return res, torch.cat([p.detach().flatten() for p in router_parameters(model)])

    (r1, p1), (r2, p2), (r3, _) = run(3), run(3), run(4)
    assert r1.train_losses == r2.train_losses and r1.val_losses == r2.val_losses
    assert torch.equal(p1, p2)
    assert r1.val_losses != r3.val_losses  # another seed: other folds


def test_early_stopping_restores_the_best_router(setup):
    """Training pushes theta_0 up; the held-out loss is theta_0^2, so step 0 stays best."""
    base, dirs = setup
    model = molora.compose(copy.deepcopy(base), dirs)

    def loss_fn(m, batch):
        theta = m.shared_router.theta
        return -theta[0] if torch.is_grad_enabled() else theta[0] ** 2

    res = molora.train_router(model, list(range(12)), loss_fn=loss_fn, router="weights", steps=100, patience=3, lr=0.1,
                               folds=1)
    assert res.stopped_early and res.steps == 3 and res.best_step == 0
    assert [s for s, _ in res.val_losses] == [0, 1, 2, 3]
    assert torch.equal(model.shared_router.theta.detach(), torch.zeros(3))


def test_kfold_selects_the_step_by_mean_held_out_loss_then_trains_on_all(setup):
    """The held-out loss is theta_0^2 while training pushes theta_0 up: every fold's curve is
    least at step 0, so k-fold keeps the fresh (uniform) router and trains no step."""
    base, dirs = setup
    model = molora.compose(copy.deepcopy(base), dirs)

    def loss_fn(m, batch):
        theta = m.shared_router.theta
        return -theta[0] if torch.is_grad_enabled() else theta[0] ** 2

    res = molora.train_router(model, list(range(12)), loss_fn=loss_fn, router="weights", steps=20, patience=3,
                              lr=0.1, folds=4, prior=0.0)
    assert res.folds == 4 and res.best_step == 0 and res.steps == 0 and res.num_train == 12
    assert res.val_losses[0] == (0, 0.0) and all(v > 0 for s, v in res.val_losses[1:])
    assert torch.equal(model.shared_router.theta.detach(), torch.zeros(3))


def _toy_weights_model(base, dirs):
    return molora.compose(copy.deepcopy(base), dirs)


def test_uniform_prior_penalty_equals_hand_computed_kl(setup):
    base, dirs = setup
    model = _toy_weights_model(base, dirs)
    from molora.train_router import install_router, uniform_prior_penalty
    install_router(model, "weights")
    theta = torch.tensor([0.3, -1.2, 0.8])
    with torch.no_grad():
        model.shared_router.theta.copy_(theta)
    inputs = _inputs(2)
    model(**inputs)
    m = np.exp(theta.double().numpy()) / np.exp(theta.double().numpy()).sum()
    kl = float(np.sum((1 / 3) * np.log((1 / 3) / m)))  # KL(u || m), the prior's definition
    assert abs(float(uniform_prior_penalty(model).detach()) - kl) < 1e-5
    with torch.no_grad():
        model.shared_router.theta.zero_()
    model(**inputs)
    assert abs(float(uniform_prior_penalty(model))) < 1e-7  # zero at the uniform start


def test_large_prior_keeps_uniform_and_zero_prior_is_plain_adamw(setup):
    base, dirs = setup
    n = 8
    inputs = _inputs(n)
    loss_fn = _regression_loss(inputs, _targets(base, dirs, inputs, "b"))
    shots = list(range(n))
    for router in ("weights", "per_layer"):
        near = []
        for prior in (1e4, 0.0):
            model = molora.compose(copy.deepcopy(base), dirs)
            molora.train_router(model, shots, loss_fn=loss_fn, router=router, steps=30, folds=1, val_fraction=0.0,
                                prior=prior)
            model(**inputs)
            near.append(all(torch.allclose(r.decision.gates, torch.full_like(r.decision.gates, 1 / 3), atol=0.02)
                            for r in model.last_routing().values()))
        assert near == [True, False], (router, near)  # the prior holds uniform; without it training moves away
    # prior=0: exactly AdamW on the task loss alone (all shots in one batch, clipped at 1)
    model = molora.compose(copy.deepcopy(base), dirs)
    molora.train_router(model, shots, loss_fn=loss_fn, router="weights", steps=10, lr=0.05, folds=1, val_fraction=0.0,
                        prior=0.0)
    ref = molora.compose(copy.deepcopy(base), dirs)
    from molora.train_router import install_router
    install_router(ref, "weights")
    ref.set_experts_trainable(False)
    ref.eval()
    theta = ref.shared_router.theta
    theta.requires_grad_(True)
    opt = torch.optim.AdamW([theta], lr=0.05, weight_decay=0.0)
    for _ in range(10):
        opt.zero_grad()
        loss_fn(ref, shots).backward()
        torch.nn.utils.clip_grad_norm_([theta], 1.0)
        opt.step()
    assert torch.allclose(model.shared_router.theta.detach(), theta.detach(), atol=1e-5)


@pytest.mark.parametrize("own_scope", [False, True], ids=["routing-block", "own-forward-scope"])
def test_prior_applies_when_the_loss_runs_the_modules_directly(setup, own_scope):
    """A loss that calls the wrapped model's modules itself (as a benchmark on cached inputs of the
    top layers does), not ``model(...)``, in a routing block or in a forward scope of its own:
    the prior still sees the routing decisions."""
    from molora import context

    base, dirs = setup
    n = 8
    inputs = _inputs(n)
    targets = _targets(base, dirs, inputs, "b")

    def direct_loss(model, batch):
        idx = torch.tensor(batch)
        mask = inputs["attention_mask"][idx]
        with context.forward_scope(attention_mask=mask) if own_scope else model.routing(attention_mask=mask):
            bert = model.base_model  # its encoder called directly: no forward of the model (or of its base) runs
            out = bert.encoder(bert.embeddings(input_ids=inputs["input_ids"][idx])).last_hidden_state
        return F.mse_loss(out.mean(1), targets[idx]) * 100

    near = []
    for prior in (1e4, 0.0):
        model = molora.compose(copy.deepcopy(base), dirs)
        molora.train_router(model, list(range(n)), loss_fn=direct_loss, router="weights", steps=30, folds=1,
                            val_fraction=0.0, prior=prior)
        near.append(bool(torch.allclose(torch.softmax(model.shared_router.theta.detach(), 0), torch.full((3,), 1 / 3),
                                        atol=0.02)))
    assert near == [True, False]


def test_train_router_rejects_bad_input(setup):
    base, dirs = setup
    model = molora.compose(copy.deepcopy(base), dirs)
    with pytest.raises(ValueError, match="loss_fn"):
        molora.train_router(model, [1, 2, 3])
    with pytest.raises(ValueError, match="router must be one of"):
        molora.train_router(model, [1], loss_fn=lambda m, b: torch.zeros(()), router="nope")
    with pytest.raises(ValueError, match="no examples"):
        molora.train_router(model, [], loss_fn=lambda m, b: torch.zeros(()))


# ---------------------------------------------------------------------------------------------- CMA-ES
@pytest.mark.parametrize("budget", [40, 23])
def test_cma_respects_bounds_and_budget_and_improves(budget):
    seen = []

    def f(x):
        seen.append(x.copy())
        return float(((x - np.array([2.0, -0.5, 0.3])) ** 2).sum())  # optimum outside the box in x_0

    best, fbest, history = cma_minimize(f, 3, budget=budget, bounds=(-1.5, 1.5), seed=0)
    assert len(seen) == len(history) == budget
    assert all(((-1.5 <= x) & (x <= 1.5)).all() for x in seen)
    assert fbest == min(history) and fbest < f(np.zeros(3)) - 1.0
    assert best[0] > 1.0  # pushed toward the bound nearest the optimum
    best2, _, history2 = cma_minimize(f, 3, budget=budget, bounds=(-1.5, 1.5), seed=0)
    assert history2 == history and np.array_equal(best, best2)


# ---------------------------------------------------------------------------------------------- LoRAHub
def test_lorahub_elementwise_equals_hand_computed_ab_mix_and_exports(setup, tmp_path):
    base, dirs = setup
    inputs = _inputs(6)
    targets = _targets(base, dirs, inputs, "a")
    model = molora.compose(copy.deepcopy(base), dirs)
    res = lorahub(model, _regression_loss(inputs, targets), list(range(6)), budget=12, seed=1)
    assert res.evaluations == 12 and res.mode == "elementwise" and LORAHUB_EXPERT in model.expert_names
    w = res.weights
    assert all(-1.5 <= v <= 1.5 for v in w.values())
    f = {n: _factors(dirs, n) for n in dirs}
    s = 8 / 4
    deltas = {}
    for path in f["a"]:
        A = sum(w[n] * f[n][path]["A"] for n in dirs)
        B = sum(w[n] * f[n][path]["B"] for n in dirs)
        deltas[path] = s * B @ A
    x = model_inputs("bert")
    with torch.no_grad():
        expect = _hand_delta_model(base, deltas)(**x).last_hidden_state
        got = model(**x).last_hidden_state
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    # Not the output mixture: the cross terms matter.
    lin = {p: sum(w[n] * s * f[n][p]["B"] @ f[n][p]["A"] for n in dirs) for p in f["a"]}
    with torch.no_grad():
        assert not torch.allclose(_hand_delta_model(base, lin)(**x).last_hidden_state, expect, atol=1e-4)
    model.export_peft(tmp_path / "mix", res.export_weights)
    torch.testing.assert_close(peft_output(base, tmp_path / "mix", x), got, atol=1e-5, rtol=1e-5)
    # The objective at the best point: loss + 0.05 * mean |w|.
    assert res.objective == pytest.approx(res.loss + 0.05 * np.mean(np.abs(list(w.values()))))


def test_lorahub_output_mixture_equals_weighted_sum_of_deltas_and_exports(setup, tmp_path):
    base, dirs = setup
    inputs = _inputs(6)
    targets = _targets(base, dirs, inputs, "c")
    model = molora.compose(copy.deepcopy(base), dirs)
    loss_fn = _regression_loss(inputs, targets)
    with torch.no_grad():
        route_to_expert(model, "a")
        wrong = float(loss_fn(model, list(range(6))))
    res = lorahub(model, loss_fn, list(range(6)), mode="output", budget=30, seed=0)
    assert res.evaluations == 30 and res.loss < wrong
    w = res.weights
    f = {n: _factors(dirs, n) for n in dirs}
    deltas = {p: sum(w[n] * 2.0 * f[n][p]["B"] @ f[n][p]["A"] for n in dirs) for p in f["a"]}
    x = model_inputs("bert")
    with torch.no_grad():
        expect = _hand_delta_model(base, deltas)(**x).last_hidden_state
        got = model(**x).last_hidden_state
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    model.export_peft(tmp_path / "mix", res.export_weights)
    torch.testing.assert_close(peft_output(base, tmp_path / "mix", x), got, atol=1e-5, rtol=1e-5)


def test_lorahub_elementwise_needs_equal_ranks(tmp_path):
    base = tiny_bert()
    dirs = {"a": make_peft_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=TARGETS),
            "b": make_peft_adapter(base, tmp_path / "b", seed=2, r=2, target_modules=TARGETS)}
    model = molora.compose(copy.deepcopy(base), dirs)
    with pytest.raises(MoLoRAError, match="one rank"):
        lorahub(model, lambda m, b: torch.zeros(()), [0], budget=2)
    assert model.expert_names == ["a", "b"]  # nothing half-applied


# ---------------------------------------------------------------------------------------------- X-LoRA style
def test_xlora_style_gates_one_classifier_call_one_forward(setup):
    base, dirs = setup
    model = molora.compose(copy.deepcopy(base), dirs)
    clf = attach_xlora_style(model, hidden=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_(0, 0.5)
    calls = {"clf": 0, "embeddings": 0}
    clf.register_forward_hook(lambda *a: calls.__setitem__("clf", calls["clf"] + 1))
    model.base_model.embeddings.register_forward_hook(lambda *a: calls.__setitem__("embeddings", calls["embeddings"] + 1))
    x = model_inputs("bert")
    with torch.no_grad():
        emb = base.embeddings(input_ids=x["input_ids"])  # the first routed layer's input
        model(**x)
    assert calls == {"clf": 1, "embeddings": 1}  # one classifier call and no second forward
    lin1, lin2 = clf.net[0], clf.net[2]
    z = (F.gelu(emb.reshape(-1, 32) @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias).view(-1, 4, 3)
    layers = list(model.routed_layers().values())
    assert len(layers) == 4
    records = list(model.last_routing().values())
    for i, record in enumerate(records):
        torch.testing.assert_close(record.decision.gates, torch.softmax(z[:, i], -1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(records[0].decision.gates, records[1].decision.gates)  # per-layer gates


def test_xlora_style_trains_with_train_router(setup):
    base, dirs = setup
    inputs = _inputs(16)
    model = molora.compose(copy.deepcopy(base), dirs)
    attach_xlora_style(model, hidden=16)
    loss_fn = _regression_loss(inputs, _targets(base, dirs, inputs, "a"))
    with torch.no_grad():
        before = float(loss_fn(model, list(range(16))))
    molora.train_router(model, list(range(16)), loss_fn=loss_fn, router="existing", steps=40, lr=0.02, patience=40)
    with torch.no_grad():
        assert float(loss_fn(model, list(range(16)))) < 0.7 * before


# ---------------------------------------------------------------------------------------------- retrieval top-1
def test_retrieve_expert_by_hand():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    shots = torch.tensor([[0.1, 3.0], [0.0, 1.0], [0.2, 0.5]])
    q = F.normalize(F.normalize(shots, dim=-1).mean(0), dim=0)
    expect = torch.tensor([q[0], q[1], (q[0] + q[1]) / 2**0.5])
    best, sims = retrieve_expert(keys, shots)
    assert best == 1
    torch.testing.assert_close(sims, expect)
    router = molora.routers.RetrievalRouter(3, 2, key_dim=2)
    router.set_keys(keys)
    assert retrieve_expert(router, shots)[0] == 1
    with pytest.raises(ValueError, match="keys must be"):
        retrieve_expert(keys, torch.zeros(2, 5))


def test_route_to_expert_equals_peft(setup):
    base, dirs = setup
    model = molora.compose(copy.deepcopy(base), dirs)
    route_to_expert(model, "b")
    x = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).last_hidden_state, peft_output(base, dirs["b"], x), atol=1e-5, rtol=1e-5)


def test_xlora_classifier_rejects_bad_width():
    clf = XLoRAStyleClassifier(8, 2, 3, hidden=0)
    with pytest.raises(ValueError, match="input must be"):
        clf(torch.zeros(4, 5))


def test_demo_rejects_too_many_experts():
    from molora.apps.demo import run_demo

    with pytest.raises(ValueError, match="num_experts must be in"):
        run_demo(num_experts=5, progress=False)


# ---------------------------------------------------------------------------------------------- method="auto"
def _auto(base, dirs, inputs, targets, seed=0, **kw):
    model = molora.compose(copy.deepcopy(base), dirs)
    res = molora.train_router(model, list(range(inputs["input_ids"].shape[0])), loss_fn=_regression_loss(inputs, targets),
                              method="auto", steps=10, lr=0.05, folds=3, seed=seed, **kw)
    return model, res


def test_auto_picks_a_fitted_composition_when_one_expert_is_right_and_is_deterministic(setup):
    base, dirs = setup
    inputs = _inputs(10)
    targets = _targets(base, dirs, inputs, "b")
    model, res = _auto(base, dirs, inputs, targets)
    assert set(res.scores) == {"uniform", "weights", "lorahub", "per_layer"} and res.folds == 3
    assert all(len(v) == 3 for v in res.fold_losses.values())
    assert res.method != "uniform" and res.scores[res.method] < res.scores["uniform"], res.scores
    # the paired rule (default): the winner beats uniform on the shared folds by more than one SE of the differences
    d = np.array(res.fold_losses["uniform"]) - np.array(res.fold_losses[res.method])
    assert d.mean() > d.std(ddof=1) / np.sqrt(len(d))
    _, one_se = _auto(base, dirs, inputs, targets, rule="one_se")  # the simplest within one SE of the best
    best = min(one_se.scores, key=one_se.scores.get)
    assert one_se.scores[one_se.method] <= one_se.scores[best] + one_se.std_errors[best] and one_se.method != "uniform"
    loss_fn = _regression_loss(inputs, targets)
    with torch.no_grad():
        applied = float(loss_fn(model, list(range(10))))
    uniform = molora.compose(copy.deepcopy(base), dirs)
    molora.train_router(uniform, list(range(10)), loss_fn=loss_fn, method="auto", candidates=["uniform"], folds=2)
    with torch.no_grad():
        assert applied < 0.7 * float(loss_fn(uniform, list(range(10))))  # the winner is what the model now runs
    _, again = _auto(base, dirs, inputs, targets)
    assert again.method == res.method and again.scores == res.scores


def test_auto_picks_uniform_when_the_experts_are_noise(setup):
    base, dirs = setup
    inputs = _inputs(10)
    scale = _targets(base, dirs, inputs, "b").std()
    # targets unrelated to any expert: each example gets its own random direction
    targets = torch.randn(10, 32, generator=torch.Generator().manual_seed(11)) * scale
    # the gradient routers find nothing to fit (early stopping keeps their uniform start): no consistent gain
    _, res = _auto(base, dirs, inputs, targets, candidates=["uniform", "weights", "per_layer"], rule="paired")
    assert res.method == "uniform", res.scores
    assert res.scores["weights"] == res.scores["uniform"] == res.scores["per_layer"]
    # the default rule keeps its anchor, the per-layer router, which stayed at its uniform start
    model, res = _auto(base, dirs, inputs, targets, candidates=["uniform", "weights", "per_layer"])
    assert res.method == "per_layer", res.scores


def test_auto_rejects_bad_input(setup):
    base, dirs = setup
    model = molora.compose(copy.deepcopy(base), dirs)
    loss_fn = lambda m, b: torch.zeros(())
    with pytest.raises(ValueError, match="retrieval"):
        molora.train_router(model, list(range(6)), loss_fn=loss_fn, method="auto", candidates=["retrieval"])
    with pytest.raises(ValueError, match="folds"):
        molora.train_router(model, [0], loss_fn=loss_fn, method="auto")
    with pytest.raises(ValueError, match="method"):
        molora.train_router(model, [0, 1], loss_fn=loss_fn, method="best")


def test_auto_that_fails_midway_leaves_the_routers_as_they_were(setup):
    base, dirs = setup
    inputs = _inputs(8)
    model = molora.compose(copy.deepcopy(base), dirs, router="soft")
    before = (model.shared_router, {n: l.router for n, l in model.routed_layers().items()}, model.molora_config.router)
    good = _regression_loss(inputs, _targets(base, dirs, inputs, "b"))
    calls = {"n": 0}

    def flaky(m, batch):  # fails after the first candidates have been installed
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("boom")
        return good(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        molora.train_router(model, list(range(8)), loss_fn=flaky, method="auto", folds=2, steps=3, seed=0)
    after = (model.shared_router, {n: l.router for n, l in model.routed_layers().items()}, model.molora_config.router)
    assert after[0] is before[0] and after[2] == before[2]
    assert all(after[1][n] is r for n, r in before[1].items())


def test_auto_selection_rules_on_hand_computed_fold_losses():
    from molora.auto_router import choose

    folds = {"uniform": [1.0, 1.0, 1.0, 1.0], "weights": [0.8, 0.9, 0.85, 0.95], "per_layer": [0.2, 1.9, 1.0, 1.0]}
    # weights: paired gains [.2, .1, .15, .05], mean .125 > SE .0323; per_layer: mean gain -.025
    assert choose(folds, "paired") == "weights" and choose(folds, "one_se") == "weights"
    # lorahub: the best mean (.7) from three lucky folds, SE .6 -> one_se's bar 1.3 takes the simplest
    # within it, uniform; its paired gain .3 is below its SE .6, so paired keeps weights
    folds["lorahub"] = [0.1, 0.1, 0.1, 2.5]
    assert choose(folds, "one_se") == "uniform" and choose(folds, "paired") == "weights"
    assert choose(folds, "paired", z=0.0) == "lorahub"  # no significance asked: the largest mean gain
    assert choose({"weights": [1.0, 2.0], "lorahub": [0.5, 2.0]}, "paired") == "lorahub"  # no uniform: least mean
    # "gradient": anchored at per_layer, z = 2. Paired gains over it: uniform [-.8, .9, 0, 0] (mean .025,
    # SE .347), weights [-.6, 1, .15, .05] (mean .15, 2 SE .657), lorahub [.1, 1.8, .9, -1.5] (mean .325,
    # SE .69): none passes, per_layer is kept although weights has the lower mean
    assert choose(folds, "gradient") == "per_layer"
    assert choose(folds, "gradient", z=0.0) == "lorahub"
    # a consistent gain passes: weights beats per_layer by [.5, .45, .55, .5] (mean .5, SE .0204)
    clear = {"per_layer": [1.0, 1.0, 1.0, 1.0], "weights": [0.5, 0.55, 0.45, 0.5], "uniform": [0.9, 0.2, 1.5, 1.0]}
    assert choose(clear, "gradient") == "weights"
    with pytest.raises(ValueError, match="rule must be one of"):
        choose(folds, "best")
