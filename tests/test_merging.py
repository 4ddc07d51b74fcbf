"""export_peft's combination types (molora/merging.py) against a float64 re-implementation written
here, against PEFT's own add_weighted_adapter on the same adapters, and PEFT reloading the export."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import molora
from molora.errors import MoLoRAError
from molora.merging import dare_drop, disjoint_mean, elect_sign, magnitude_prune, merge_tensors, svd_factors

from helpers import make_peft_adapter, model_inputs, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")

TARGETS = ["query", "value"]
# b has another rank and targets only "query": the equal-rank rules leave it out (weight 0).
W_EQ = {"a": 0.7, "c": -0.4}
W_ALL = {"a": 0.7, "b": 0.5, "c": -0.4}
SVD_FORMS = ("svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")
CASES = {
    "cat": ("cat", {}),
    "linear": ("linear", {}),
    "svd": ("svd", {"svd_rank": 3}),
    "svd-default-rank": ("svd", {}),
    "svd-clamp": ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    "ties": ("ties", {"density": 0.5}),
    "ties-frequency": ("ties", {"density": 0.4, "majority_sign_method": "frequency"}),
    "dare_linear": ("dare_linear", {"density": 0.6, "seed": 3}),
    "dare_ties": ("dare_ties", {"density": 0.6, "seed": 4}),
    "magnitude_prune": ("magnitude_prune", {"density": 0.3}),
    "ties_svd": ("ties_svd", {"density": 0.5, "svd_rank": 3}),
    "dare_ties_svd": ("dare_ties_svd", {"density": 0.5, "svd_rank": 5, "seed": 1}),
    "dare_linear_svd": ("dare_linear_svd", {"density": 0.7, "svd_rank": 4, "seed": 2}),
    "magnitude_prune_svd": ("magnitude_prune_svd", {"density": 0.5, "svd_rank": 3, "majority_sign_method": "frequency"}),
}


# ---------------------------------------------------------------------- the float64 reference
def read_adapter(folder):
    """{module: (A, B, scaling)} in float64, straight from PEFT's files (not through molora)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            B = tensors[key.replace("lora_A", "lora_B")]
            r = A.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
            out[module] = (A.double(), B.double(), s)
    return out


def ref_prune(t, density):
    if density >= 1:
        return t.clone()
    k = int(density * t.numel())
    order = torch.argsort(t.abs().flatten(), descending=True, stable=True)
    keep = torch.zeros(t.numel(), dtype=torch.float64)
    keep[order[:k]] = 1.0
    return t * keep.reshape(t.shape)


def ref_rule(ts, ws, rule, density, method, draw):
    """One merged tensor by a loop over the tasks: linear / ties / dare_* / magnitude_prune."""
    if rule in ("ties", "magnitude_prune"):
        ts = [ref_prune(t, density) for t in ts]
    elif rule.startswith("dare"):
        ts = [t * draw(t.shape) / density for t in ts]
    if not rule.endswith("ties"):
        return sum(w * t for w, t in zip(ws, ts))
    votes = sum(t for t in ts) if method == "total" else sum(torch.sign(t) for t in ts)
    gamma = torch.where(votes >= 0, 1.0, -1.0).double()
    total, count = torch.zeros_like(ts[0]), torch.zeros_like(ts[0])
    for w, t in zip(ws, ts):
        agree = ((t != 0) & (torch.sign(t) == gamma)).double()
        total += w * t * agree
        count += agree
    return total / torch.clamp(count, min=1.0)


def ref_svd(delta, rank, clamp):
    import numpy as np

    U, S, Vh = np.linalg.svd(delta.numpy())
    r = min(rank, *delta.shape)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    for k in range(r):  # the documented sign convention: the largest |entry| of u_k is positive
        if U[np.argmax(np.abs(U[:, k])), k] < 0:
            U[:, k], Vh[k] = -U[:, k], -Vh[k]
    B, A = U * np.sqrt(S), np.sqrt(S)[:, None] * Vh
    if clamp is not None:
        h = np.quantile(np.concatenate([B.ravel(), A.ravel()]), clamp)
        B, A = np.clip(B, -h, h), np.clip(A, -h, h)
    return torch.from_numpy(A), torch.from_numpy(B)


def reference(adapters, order, weights, combination, opts):
    """{module: (A', B')} by the combination's written rule, float64, visiting modules in ``order``."""
    density, method = opts.get("density"), opts.get("majority_sign_method", "total")
    gen = torch.Generator().manual_seed(opts.get("seed", 0))

    def draw(shape):  # DARE's contract: one float32 Bernoulli draw per tensor, in visiting order
        if density >= 1:
            return torch.ones(shape, dtype=torch.float64)
        return torch.bernoulli(torch.full(tuple(shape), density, dtype=torch.float32), generator=gen).double()

    out = {}
    for module in order:
        names = [n for n in adapters if weights.get(n, 0) != 0 and module in adapters[n]]
        if not names:
            continue
        A = [adapters[n][module][0] for n in names]
        B = [adapters[n][module][1] for n in names]
        s = [adapters[n][module][2] for n in names]
        w = [weights[n] for n in names]
        if combination == "cat":
            out[module] = (torch.cat([wi * si * a for wi, si, a in zip(w, s, A)]), torch.cat(B, dim=1))
        elif combination in SVD_FORMS:
            rule = "linear" if combination == "svd" else combination[: -len("_svd")]
            delta = ref_rule([si * (b @ a) for a, b, si in zip(A, B, s)], w, rule, density, method, draw)
            out[module] = ref_svd(delta, opts.get("svd_rank") or max(a.shape[0] for a in A), opts.get("svd_clamp"))
        else:
            c = [wi * si for wi, si in zip(w, s)]
            wa = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in c]
            wb = [math.sqrt(abs(x)) for x in c]
            out[module] = (ref_rule(A, wa, combination, density, method, draw),
                           ref_rule(B, wb, combination, density, method, draw))
    return out


def exported(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    mods = {k[len("base_model.model."):-len(".lora_A.weight")] for k in t if k.endswith("lora_A.weight")}
    return cfg, {m: (t[f"base_model.model.{m}.lora_A.weight"].double(), t[f"base_model.model.{m}.lora_B.weight"].double())
                 for m in mods}


def output_with_deltas(base, deltas, inputs, field="last_hidden_state"):
    """The base model with ``delta [d_out, d_in]`` added to each named weight (Linear or Conv1D)."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in deltas.items():
            mod = m.get_submodule(name)
            mod.weight += (delta.T if type(mod).__name__ == "Conv1D" else delta).to(mod.weight.dtype)
        return getattr(m(**inputs), field)


def peft_output_of(base, folder, inputs, field="last_hidden_state"):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return getattr(pm(**inputs), field)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merging")
    base = tiny_bert()
    dirs = {
        "a": make_peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=TARGETS),
        "b": make_peft_adapter(base, root / "b", seed=2, r=2, alpha=4, target_modules=["query"]),
        "c": make_peft_adapter(base, root / "c", seed=3, r=4, alpha=6, target_modules=TARGETS, use_rslora=True),
    }
    adapters = {n: read_adapter(d) for n, d in dirs.items()}
    order = [n for n, _ in base.named_modules() if n in adapters["a"]]
    model = molora.compose(copy.deepcopy(base), dirs, router="soft")
    return dict(root=root, base=base, dirs=dirs, adapters=adapters, order=order, model=model,
                inputs=model_inputs("bert"))


def weights_for(combination):
    return W_ALL if combination == "cat" or combination in SVD_FORMS else W_EQ


# ---------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("case", list(CASES))
def test_combination_equals_float64_reference_and_reloads_in_peft(setup, case, tmp_path):
    combination, opts = CASES[case]
    weights = weights_for(combination)
    setup["model"].export_peft(tmp_path / "mix", weights, combination, **opts)
    cfg, got = exported(tmp_path / "mix")
    ref = reference(setup["adapters"], setup["order"], weights, combination, opts)
    assert set(got) == set(ref) == set(setup["order"])
    for m, (A, B) in ref.items():
        gA, gB = got[m]
        assert gA.shape == A.shape and gB.shape == B.shape, m
        if combination in SVD_FORMS and opts.get("svd_clamp") is None:
            # The truncated delta is unique; the factors only up to the singular pairs' signs.
            torch.testing.assert_close(gB @ gA, B @ A, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(gB.T @ gB, gA @ gA.T, atol=2e-6, rtol=1e-5)  # S split evenly
        else:
            torch.testing.assert_close(gA, A, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(gB, B, atol=1e-6, rtol=1e-5)
        # rank and alpha per module, scaling 1 (no rsLoRA even though expert c used it)
        assert cfg["rank_pattern"][m.replace(".", r"\.")] == A.shape[0] == cfg["alpha_pattern"][m.replace(".", r"\.")]
    assert cfg["use_rslora"] is False and sorted(cfg["target_modules"]) == sorted(ref)
    if combination == "svd" and "svd_rank" not in opts:
        assert {a.shape[0] for a, _ in got.values()} == {4}  # the largest expert rank
    # PEFT reloading the folder applies exactly the reference delta.
    out = peft_output_of(setup["base"], tmp_path / "mix", setup["inputs"])
    want = output_with_deltas(setup["base"], {m: B @ A for m, (A, B) in ref.items()}, setup["inputs"])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_cat_and_svd_are_the_mixture_and_linear_is_not(setup, tmp_path):
    """cat is the exact mix; svd at full rank too; linear's cross terms make it something else."""
    model, w = setup["model"], W_EQ
    mix = {m: sum(w[n] * s * (B @ A) for n, ad in setup["adapters"].items() if n in w and m in ad
                  for A, B, s in [ad[m]]) for m in setup["order"]}
    for combination, opts in (("cat", {}), ("svd", {"svd_rank": 8})):
        model.export_peft(tmp_path / combination, w, combination, **opts)
        for m, (A, B) in exported(tmp_path / combination)[1].items():
            torch.testing.assert_close(B @ A, mix[m], atol=2e-6, rtol=1e-5)
    model.export_peft(tmp_path / "linear", w, "linear")
    m, (A, B) = next(iter(exported(tmp_path / "linear")[1].items()))
    assert (B @ A - mix[m]).abs().max() > 0.1 * mix[m].abs().max()


# ---------------------------------------------------------------------- against PEFT
def peft_merge(setup, monkeypatch, combination, opts):
    """PEFT's add_weighted_adapter over a and c (a first: the merged adapter copies a's use_rslora=False,
    so PEFT's merged output is right); its DARE draws from the global generator, re-seeded where PEFT
    starts merging (after it built the new adapter's layers, which draw their init)."""
    import peft.tuners.lora.model as lora_model
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(setup["base"]), str(setup["dirs"]["a"]), adapter_name="pa").eval()
    pm.load_adapter(str(setup["dirs"]["c"]), adapter_name="pc")
    freeze = lora_model._freeze_adapter

    def freeze_then_seed(model, name):
        freeze(model, name)
        torch.manual_seed(opts.get("seed", 0))

    monkeypatch.setattr(lora_model, "_freeze_adapter", freeze_then_seed)
    kw = {k: v for k, v in opts.items() if k in ("svd_rank", "density", "majority_sign_method")}
    pm.add_weighted_adapter(["pa", "pc"], [W_EQ["a"], W_EQ["c"]], "mix", combination_type=combination, **kw)
    pm.set_adapter("mix")
    return pm


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("svd-clamp", "svd-default-rank")])
def test_combination_equals_peft_add_weighted_adapter(setup, case, tmp_path, monkeypatch):
    combination, opts = CASES[case]
    setup["model"].export_peft(tmp_path / "mix", W_EQ, combination, **opts)
    _, got = exported(tmp_path / "mix")
    pm = peft_merge(setup, monkeypatch, combination, opts)
    for m, (A, B) in got.items():
        layer = pm.base_model.model.get_submodule(m)
        pA, pB = layer.lora_A["mix"].weight.double(), layer.lora_B["mix"].weight.double()
        if combination == "cat" or combination in SVD_FORMS:  # PEFT pads cat and splits S otherwise
            torch.testing.assert_close(B @ A, pB @ pA, atol=2e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(A, pA, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(B, pB, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        ref = pm(**setup["inputs"]).last_hidden_state
    torch.testing.assert_close(peft_output_of(setup["base"], tmp_path / "mix", setup["inputs"]), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination, opts", [("svd", {"svd_rank": 3}), ("ties", {"density": 0.5}),
                                               ("ties_svd", {"density": 0.5}), ("dare_linear", {"density": 0.5, "seed": 9})])
def test_gpt2_conv1d_equals_peft(combination, opts, tmp_path, monkeypatch):
    """GPT-2's Conv1D (fan_in_fan_out) layers: the export reloads in PEFT as PEFT's own merge."""
    base = tiny_gpt2()
    dirs = {n: make_peft_adapter(base, tmp_path / n, seed=s, r=4, alpha=8, target_modules=["c_attn", "c_fc"])
            for n, s in (("a", 1), ("c", 2))}
    model = molora.compose(copy.deepcopy(base), dirs, router="soft")
    model.export_peft(tmp_path / "mix", W_EQ, combination, **opts)
    pm = peft_merge({"base": base, "dirs": dirs}, monkeypatch, combination, opts)
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        ref = pm(**inputs).logits
    got = peft_output_of(base, tmp_path / "mix", inputs, field="logits")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_rslora_first_peft_scales_its_merge_wrongly_ours_does_not(setup, tmp_path):
    """PEFT's merged adapter copies the first adapter's use_rslora with lora_alpha = r, so with an
    rsLoRA adapter first its scaling is sqrt(r), not 1; the exported adapter is scaling 1."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(setup["base"]), str(setup["dirs"]["c"]), adapter_name="pc").eval()
    pm.load_adapter(str(setup["dirs"]["a"]), adapter_name="pa")
    pm.add_weighted_adapter(["pc", "pa"], [W_EQ["c"], W_EQ["a"]], "mix", combination_type="cat")
    layer = pm.base_model.model.get_submodule(setup["order"][0])
    assert layer.scaling["mix"] == pytest.approx(math.sqrt(8))  # PEFT's pitfall, kept visible here
    setup["model"].export_peft(tmp_path / "mix", W_EQ)
    _, got = exported(tmp_path / "mix")
    deltas = {m: B @ A for m, (A, B) in got.items()}
    pA, pB = layer.lora_A["mix"].weight.double(), layer.lora_B["mix"].weight.double()
    torch.testing.assert_close(deltas[setup["order"][0]], pB @ pA, atol=2e-6, rtol=1e-5)  # its factors are right
    out = peft_output_of(setup["base"], tmp_path / "mix", setup["inputs"])
    torch.testing.assert_close(out, output_with_deltas(setup["base"], deltas, setup["inputs"]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- DARE's seed
def test_dare_is_reproducible_from_its_seed(setup, tmp_path):
    model = setup["model"]
    state = torch.get_rng_state()
    for name, seed in (("one", 7), ("two", 7), ("other", 8)):
        model.export_peft(tmp_path / name, W_EQ, "dare_ties", density=0.5, seed=seed)
    assert torch.equal(torch.get_rng_state(), state), "the global generator must not be used"
    one, two, other = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("one", "two", "other"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = torch.randn(50, 40, dtype=torch.float64)
    torch.testing.assert_close(dare_drop(t, 0.3, g1), dare_drop(t, 0.3, g2), atol=0, rtol=0)


# ---------------------------------------------------------------------- the rules on hand-computed values
def test_rules_on_hand_computed_values():
    t = torch.tensor([[3.0, -1.0], [2.0, -4.0]], dtype=torch.float64)
    assert magnitude_prune(t, 0.5).tolist() == [[3.0, 0.0], [0.0, -4.0]]
    assert magnitude_prune(t, 0.3).tolist() == [[0.0, 0.0], [0.0, -4.0]]  # floor(0.3 * 4) = 1 entry
    assert torch.equal(magnitude_prune(t, 1.0), t)
    tasks = torch.tensor([[1.0, -2.0, 0.0], [-3.0, 1.0, 2.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    # total: sums -1, 0, 1 -> signs -, +, +; frequency: sign sums 1, 1, 0 -> +, +, +
    assert elect_sign(tasks, "total").tolist() == [[False, False, False], [True, True, True], [False, True, False]]
    assert elect_sign(tasks, "frequency")[:, 0].tolist() == [True, False, True]
    merged = disjoint_mean(tasks, elect_sign(tasks, "total"))
    assert merged.tolist() == [-3.0, 1.0, 2.0]
    w = [0.5, 2.0, 1.0]
    got = merge_tensors(list(tasks), w, "ties", density=1.0, majority_sign_method="frequency")
    assert got.tolist() == [(0.5 * 1 + 1 * 1) / 2, (2 * 1 + 1 * 1) / 2, 2 * 2 / 1]
    # DARE keeps an entry with probability density and rescales it: the mean is kept.
    big = torch.ones(200, 200, dtype=torch.float64)
    dropped = dare_drop(big, 0.25, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0.0, 4.0} and abs(dropped.mean().item() - 1.0) < 0.05
    # SVD: best rank-r factors with S split evenly.
    D = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A, B = svd_factors(D, 5)
    torch.testing.assert_close(B @ A, D)
    A2, B2 = svd_factors(D, 2)
    S = torch.linalg.svdvals(D)
    assert torch.linalg.matrix_norm(D - B2 @ A2).item() == pytest.approx(S[2:].norm().item())
    torch.testing.assert_close(B2.T @ B2, torch.diag(S[:2]))
    torch.testing.assert_close(A2 @ A2.T, torch.diag(S[:2]))
    assert svd_factors(D, 50)[0].shape == (5, 5)  # rank capped at min(d_out, d_in)


# ---------------------------------------------------------------------- errors
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("weights, combination, opts, message", [
    (W_EQ, "tis", {}, r"unknown combination 'tis'; combinations are \['cat', 'linear', .*'magnitude_prune_svd'\]"),
    (W_EQ, "ties", {}, r"combination 'ties' needs a density"),
    (W_EQ, "ties", {"density": 0.0}, r"density must be > 0; got 0.0"),
    (W_EQ, "dare_ties", {"density": 1.5}, r"density must be <= 1; got 1.5"),
    (W_EQ, "dare_linear_svd", {"density": NAN}, r"density must be a finite number; got nan"),
    (W_EQ, "cat", {"density": 0.5}, r"density is used by \['ties', .*\] only; got density=0.5 with combination 'cat'"),
    (W_EQ, "svd", {"svd_rank": 0}, r"svd_rank must be a positive int; got 0"),
    (W_EQ, "svd", {"svd_rank": 2.0}, r"svd_rank must be a positive int; got 2.0"),
    (W_EQ, "ties", {"density": 0.5, "svd_rank": 2}, r"svd_rank is used by \['svd', .*\] only"),
    (W_EQ, "svd", {"svd_clamp": 0.2}, r"svd_clamp must be > 0.5; got 0.2"),
    (W_EQ, "ties", {"density": 0.5, "majority_sign_method": "mean"}, r"majority_sign_method must be one of \['total', 'frequency'\]"),
    (W_EQ, "dare_ties", {"density": 0.5, "seed": -1}, r"seed must be an int >= 0"),
    ({"a": NAN, "c": 1.0}, "svd", {}, r"weight of expert 'a' must be a finite number; got nan"),
    ({"a": 1.0, "c": -INF}, "ties", {"density": 0.5}, r"weight of expert 'c' must be a finite number; got -inf"),
    (W_ALL, "linear", {}, r"module 'encoder\.layer\.0\.attention\.self\.query': combination 'linear' .* equal rank; "
                          r"got ranks \{'a': 4, 'b': 2, 'c': 4\}"),
    (W_ALL, "dare_ties", {"density": 0.5}, r"module .* needs experts of equal rank"),
])
def test_bad_input_is_refused_before_anything_is_written(setup, tmp_path, weights, combination, opts, message):
    with pytest.raises(MoLoRAError, match=rf"^export_peft: {message}"):
        setup["model"].export_peft(tmp_path / "mix", weights, combination, **opts)
    assert not (tmp_path / "mix").exists()


def test_nan_expert_is_refused_for_every_combination(tmp_path):
    base = tiny_bert()
    dirs = {n: make_peft_adapter(base, tmp_path / n, seed=s, target_modules=["query"]) for n, s in (("a", 1), ("c", 2))}
    model = molora.compose(copy.deepcopy(base), dirs)
    layer = next(iter(model.routed_layers().values()))
    with torch.no_grad():
        layer.bank.A[1][0, 0] = NAN
    for combination, opts in (("svd", {}), ("ties", {"density": 0.5}), ("dare_ties_svd", {"density": 0.5})):
        with pytest.raises(MoLoRAError, match=rf"module '{layer.name}': lora_A of expert 'c' contains NaN or inf"):
            model.export_peft(tmp_path / "mix", W_EQ, combination, **opts)
        assert not (tmp_path / "mix").exists()
