"""Trainable tokens (PEFT's trainable_token_indices, molora.routed_tokens): adapters that trained
embedding rows compose equal to PEFT (task routing and row-wise mixed batches, tied GPT-2 lm_head
and untied LLaMA, greedy generate, gradients of the rows), and keep it through checkpoints, merge
and the PEFT export; malformed files and impossible routes are refused untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import molora
from molora.errors import AdapterError, CheckpointError, MoLoRAError
from molora.routed_tokens import TiedTokenRows, TokenRows

from helpers import assert_same_snapshot, snapshot, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOKENS = {"a": [1, 5, 7], "b": [5, 9, 11, 12]}  # overlapping ids: each adapter has its own row 5
BASES = {"gpt2": (tiny_gpt2, ["c_attn"], "transformer.wte", "lm_head"),  # lm_head tied to wte
         "llama": (tiny_llama, ["q_proj", "v_proj"], "model.embed_tokens", None)}


def make_adapter(base, path, *, seed: int, ids: list[int], targets: list[str], as_dict: bool = False):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                     trainable_token_indices={"embed_tokens" if "embed_tokens" in str(base) else "wte": ids}
                     if as_dict else ids)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # rows well away from the base's
            elif "lora_A" in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.normal_(0.0, 0.1 * p.shape[1] ** -0.5)
    pm.save_pretrained(str(path))
    return path


@pytest.fixture(params=sorted(BASES))
def setup(request, tmp_path):
    make, targets, emb, head = BASES[request.param]
    base = make()
    folders = {n: make_adapter(base, tmp_path / n, seed=i, ids=ids, targets=targets)
               for i, (n, ids) in enumerate(TOKENS.items())}
    ids = torch.tensor([[1, 5, 7, 2, 9, 11], [12, 5, 3, 1, 4, 9], [7, 7, 11, 0, 5, 12]])
    return request.param, base, folders, ids, emb, head


def _peft(base, folder, ids, **kw):
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return pm(input_ids=ids, **kw).logits


def test_the_loader_reads_the_rows(setup):
    _, base, folders, _, emb, _ = setup
    adapter = molora.load_peft_adapter(folders["b"])
    ids, values = adapter.token_rows[emb]
    assert ids == TOKENS["b"] and tuple(values.shape) == (4, 32)
    assert not torch.allclose(values, base.get_submodule(emb).weight[TOKENS["b"]])


def test_task_routing_and_mixed_batch_equal_peft(setup):
    arch, base, folders, ids, emb, head = setup
    model = molora.compose(copy.deepcopy(base), folders, router="task")
    assert isinstance(model.base_model.get_submodule(emb).copies["0"], TokenRows)
    if head is not None:  # the tied output layer follows the rows
        assert isinstance(model.base_model.get_submodule(head).copies["0"], TiedTokenRows)
    refs = {n: _peft(base, f, ids) for n, f in folders.items()}
    for i, n in enumerate(folders):
        with torch.no_grad(), model.routing(task_ids=[i] * 3):
            torch.testing.assert_close(model(input_ids=ids).logits, refs[n], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.routing(task_ids=[1, 0, 1]):  # row-wise: each row its adapter's rows
        mixed = model(input_ids=ids).logits
    for row, n in enumerate(["b", "a", "b"]):
        torch.testing.assert_close(mixed[row], refs[n][row], atol=1e-5, rtol=1e-5)


def test_gradients_of_the_rows_equal_peft(setup):
    arch, base, folders, ids, emb, head = setup
    model = molora.compose(copy.deepcopy(base), folders, router="task", trainable_experts=True)
    with model.routing(task_ids=[1] * 3):
        model(input_ids=ids).logits.square().mean().backward()
    values = model.base_model.get_submodule(emb).copies["1"].values
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folders["b"]), is_trainable=True)
    pm(input_ids=ids).logits.square().mean().backward()
    delta = dict(pm.named_parameters())[f"base_model.model.{emb}.token_adapter.trainable_tokens_delta.default"]
    torch.testing.assert_close(values.grad, delta.grad, atol=1e-6, rtol=1e-5)  # tied: embedding + logits terms
    assert model.base_model.get_submodule(emb).copies["0"].values.grad is None


def test_generate_equals_peft(setup):
    arch, base, folders, ids, emb, head = setup
    model = molora.compose(copy.deepcopy(base), folders, router="task")
    prompt = ids[:, :4]
    with torch.no_grad(), model.routing(task_ids=[1, 0, 1]):
        out = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, n in enumerate(["b", "a", "b"]):
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[n])).eval()
        with torch.no_grad():
            want = pm.generate(input_ids=prompt[row:row + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], want[0])


def test_checkpoint_merge_and_export_round_trip(setup, tmp_path):
    arch, base, folders, ids, emb, head = setup
    model = molora.compose(copy.deepcopy(base), folders, router="task")
    with torch.no_grad(), model.routing(task_ids=[1, 0, 1]):
        ref = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "ck"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ck"))
    with torch.no_grad(), loaded.routing(task_ids=[1, 0, 1]):
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    if head is not None:  # still tied: the head reads the embedding copies' rows
        assert loaded.base_model.get_submodule(head).copies["1"].rows is loaded.base_model.get_submodule(emb).copies["1"]
    static = molora.compose(copy.deepcopy(base), folders, router="static", weights=[0.0, 1.0])
    with torch.no_grad():
        want = static(input_ids=ids).logits
        static.merge([0.0, 1.0])
        torch.testing.assert_close(static(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        static.unmerge()
    static.export_peft(str(tmp_path / "out"), {"b": 1.0})
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {emb: TOKENS["b"]}
    torch.testing.assert_close(_peft(base, tmp_path / "out", ids), _peft(base, folders["b"], ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(MoLoRAError, match="a blend of whole modules"):
        static.export_peft(str(tmp_path / "blend"), {"a": 0.5, "b": 0.5})
    assert not (tmp_path / "blend").exists()


def test_checkpoint_with_bad_token_records_is_refused(tmp_path):
    base = tiny_gpt2()
    folders = {n: make_adapter(base, tmp_path / n, seed=i, ids=ids, targets=["c_attn"])
               for i, (n, ids) in enumerate(TOKENS.items())}
    model = molora.compose(copy.deepcopy(base), folders, router="task")
    model.save_pretrained(str(tmp_path / "ck"))
    from molora.persistence import CONFIG_NAME

    path = tmp_path / "ck" / CONFIG_NAME
    good = json.loads(path.read_text())
    for change, match in [(lambda m: m["routed_copies"]["transformer.wte"]["tokens"].pop("1"), "must list the token ids"),
                          (lambda m: m["routed_copies"]["transformer.wte"]["tokens"].update({"1": []}), "lists no token id"),
                          (lambda m: m["routed_copies"]["transformer.wte"]["tokens"].update({"1": [1, 2, 500, 3]}),
                           "distinct ids in"),
                          (lambda m: m["routed_copies"]["lm_head"].update(tied_to="nope"), "tied_to")]:
        meta = copy.deepcopy(good)
        change(meta)
        path.write_text(json.dumps(meta))
        fresh = copy.deepcopy(base)
        before = snapshot(fresh)
        with pytest.raises(CheckpointError, match=match):
            molora.MoLoRAModel.from_pretrained(fresh, str(tmp_path / "ck"))
        assert_same_snapshot(before, snapshot(fresh))


def test_malformed_adapters_and_per_token_routers_are_refused_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    folder = make_adapter(base, tmp_path / "a", seed=0, ids=[1, 5, 7], targets=["q_proj"])
    st = folder / "adapter_model.safetensors"
    tensors = load_file(str(st))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    before = snapshot(base)
    cases = [({**cfg, "trainable_token_indices": [1, 5]}, tensors, "expected floating \\[2, dim\\]"),
             ({**cfg, "trainable_token_indices": [1, 5, 5]}, tensors, "distinct token ids"),
             ({**cfg, "trainable_token_indices": None}, tensors, "has no trainable_token_indices"),
             ({**cfg, "trainable_token_indices": {"nowhere": [1, 5, 7], "embed_tokens": [1, 5, 7]}}, tensors,
              "names \\['nowhere'\\]"),
             ({**cfg, "trainable_token_indices": [1, 5, 700]}, tensors, "different base model")]
    for i, (c, t, match) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps(c))
        save_file(t, str(bad / "adapter_model.safetensors"))
        with pytest.raises(AdapterError, match=match):
            molora.compose(base, {"x": bad}, router="task")
    with pytest.raises(AdapterError, match="trainable_token_indices.*model-level router"):
        molora.compose(base, {"x": folder}, router="soft")
    assert_same_snapshot(before, snapshot(base))
    assert key in tensors


def test_t5_shared_embedding_ties_both_stacks_through_a_checkpoint(tmp_path):
    from helpers import tiny_t5

    base = tiny_t5()
    folders = {}
    for i, (n, ids) in enumerate(TOKENS.items()):
        torch.manual_seed(i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q"], init_lora_weights=False,
                                                            trainable_token_indices={"shared": ids}))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "trainable_tokens_delta" in name or "lora_" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        pm.save_pretrained(str(tmp_path / n))
        folders[n] = tmp_path / n
    ids = torch.tensor([[1, 5, 7, 2], [12, 5, 9, 1]])
    dec = torch.tensor([[0, 5, 11], [0, 12, 1]])
    model = molora.compose(copy.deepcopy(base), folders, router="task")
    tied = {p: c.tied_to for p, c in model.routed_copies().items()}
    assert tied == {"shared": None, "encoder.embed_tokens": "shared", "decoder.embed_tokens": "shared"}
    for i, n in enumerate(folders):
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[n])).eval()
        with torch.no_grad(), model.routing(task_ids=[i] * 2):
            want = pm(input_ids=ids, decoder_input_ids=dec).last_hidden_state
            torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=dec).last_hidden_state, want,
                                       atol=1e-5, rtol=1e-5)
    model.save_pretrained(str(tmp_path / "ck"))
    loaded = molora.MoLoRAModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ck"))
    with torch.no_grad(), model.routing(task_ids=[1, 0]), loaded.routing(task_ids=[1, 0]):
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=dec).last_hidden_state,
                           model(input_ids=ids, decoder_input_ids=dec).last_hidden_state)
    rows = loaded.base_model.shared.copies["0"]
    assert loaded.base_model.encoder.embed_tokens.copies["0"].rows is rows


def test_pool_genknowsub_and_nan_rows_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from molora import MoLoRAConfig, get_molora_model
    from molora.adapter_pool import AdapterPool

    base = tiny_gpt2()
    a = make_adapter(base, tmp_path / "a", seed=0, ids=[1, 5], targets=["c_attn"])
    plain = tmp_path / "plain"
    get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(str(plain))
    model = get_molora_model(copy.deepcopy(base), MoLoRAConfig(target_modules=["c_attn"], num_experts=2, rank=4,
                                                               router="task"))
    pool = AdapterPool(model)
    pool.register("a", a)  # read when first needed
    with pytest.raises(AdapterError, match=r"trained tokens of \['transformer.wte'\].*a pool slot cannot hold"):
        with pool.routing(["a"]):
            pass
    target = copy.deepcopy(base)
    before = snapshot(target)
    with pytest.raises(AdapterError, match=r"general adapters \['a'\] saved whole modules or trained tokens"):
        molora.compose(target, {"p": plain}, router="task", general_adapters={"a": a})
    tensors = load_file(str(a / "adapter_model.safetensors"))
    key = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"
    tensors[key][1, 3] = float("nan")
    save_file(tensors, str(a / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN|non-finite|inf"):
        molora.compose(target, {"a": a}, router="task")
    assert_same_snapshot(before, snapshot(target))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_rows_in_a_checkpoint_are_refused_untouched(tmp_path, value):
    import hashlib

    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    folders = {"a": make_adapter(base, tmp_path / "a", seed=0, ids=[1, 5], targets=["q_proj"])}
    molora.compose(copy.deepcopy(base), folders, router="task").save_pretrained(str(tmp_path / "ck"))
    (weights,) = (tmp_path / "ck").glob("*.safetensors")
    tensors = load_file(str(weights))
    (key,) = [k for k in tensors if k.endswith(".values")]
    tensors[key][0, 0] = value
    save_file(tensors, str(weights))
    meta_path = tmp_path / "ck" / "molora_config.json"
    meta = json.loads(meta_path.read_text())  # a consistent checksum, so the value check is what refuses
    meta["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta["weights"]["bytes"] = weights.stat().st_size
    meta_path.write_text(json.dumps(meta))
    target = copy.deepcopy(base)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        molora.MoLoRAModel.from_pretrained(target, str(tmp_path / "ck"))
    assert_same_snapshot(before, snapshot(target))


def test_two_threads_routing_different_adapters_equal_sequential(tmp_path):
    import threading

    base = tiny_gpt2()
    folders = {n: make_adapter(base, tmp_path / n, seed=i, ids=ids, targets=["c_attn"])
               for i, (n, ids) in enumerate(TOKENS.items())}
    model = molora.compose(copy.deepcopy(base), folders, router="task")
    ids = torch.tensor([[1, 5, 7, 2, 9, 11], [12, 5, 3, 1, 4, 9]])
    calls = [[0, 1], [1, 1], [1, 0], [0, 0]] * 6

    def run(task_ids):
        with torch.no_grad(), model.routing(task_ids=task_ids):
            return model(input_ids=ids).logits

    want = [run(t) for t in calls]
    got, errors = {}, []

    def worker(w):
        try:
            for i in range(w, len(calls), 2):
                got[i] = run(calls[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i], w, atol=1e-6, rtol=1e-6, msg=f"call {i}")
