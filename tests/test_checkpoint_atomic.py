"""Checkpoints commit once: a save interrupted at any moment (exception, os._exit, SIGKILL) leaves
the old checkpoint or the new one loadable and whole, readers racing writers always get a whole
checkpoint, and killed writers' leftovers are cleaned up.

The commit protocol is in molora/persistence.py; ``persistence._checkpoint_step`` marks each
window of it, and the tests below crash a save there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora import persistence
from molora.continual import OLoRAManager, load_manager
from molora.errors import CheckpointError
from molora.persistence import CONFIG_NAME, WEIGHTS_PATTERN

from helpers import tiny_bert

STATE_NAME = "continual_state.json"


# ---------------------------------------------------------------------- two versions, A and B
def make_model_pair() -> tuple[MoLoRAModel, MoLoRAModel]:
    """Two routed models of one layout with different weights (A and B)."""
    out = []
    for seed in (1, 2):
        model = get_molora_model(tiny_bert(), MoLoRAConfig(target_modules=["query", "value"], num_experts=2, router="topk", top_k=1))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        out.append(model)
    return out[0], out[1]


def make_manager_pair() -> tuple[OLoRAManager, OLoRAManager]:
    """Two O-LoRA managers: A after one task, B after two (another layout, other weights)."""
    out = []
    for n_tasks, seed in ((1, 10), (2, 20)):
        m = OLoRAManager(tiny_bert(), target_modules=["query"], rank=2, alpha=4)
        for t in range(n_tasks):
            m.begin_task(f"task{t}")
            g = torch.Generator().manual_seed(seed + t)
            with torch.no_grad():
                for p in m.trainable_parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            m.end_task()
        out.append(m)
    return out[0], out[1]


def state_of(obj) -> tuple:
    """What must round-trip exactly: tasks (managers) and every adapter tensor."""
    model = obj.model if isinstance(obj, OLoRAManager) else obj
    tasks = tuple(obj.tasks) if isinstance(obj, OLoRAManager) else ()
    return tasks, {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def which(loaded: tuple, refs: dict[str, tuple]) -> str | None:
    return next((name for name, ref in refs.items() if same(loaded, ref)), None)


def load_model(folder: Path) -> tuple:
    return state_of(MoLoRAModel.from_pretrained(tiny_bert(), folder))


def load_mgr(folder: Path) -> tuple:
    return state_of(load_manager(tiny_bert(), folder))


@pytest.fixture(scope="module")
def models():
    return make_model_pair()


@pytest.fixture(scope="module")
def managers():
    return make_manager_pair()


def visible(folder: Path) -> list[str]:
    """The folder's files without temporary ones."""
    return sorted(n for n in os.listdir(folder) if not n.endswith(".tmp"))


# ---------------------------------------------------------------------- (b) each window
class SimulatedCrash(BaseException):
    """Not an Exception: nothing in the save path may swallow it."""


def interrupt(mode: str, step: str, save, monkeypatch) -> None:
    """Run ``save`` and stop it at ``step``: by an exception (``raise``: clean-up handlers run)
    or by ``os._exit`` in a forked child (``exit``: nothing runs, as under kill -9)."""
    if mode == "raise":
        def hook(s: str) -> None:
            if s == step:
                raise SimulatedCrash(s)
        monkeypatch.setattr(persistence, "_checkpoint_step", hook)
        with pytest.raises(SimulatedCrash):
            save()
        return
    pid = os.fork()
    if pid == 0:  # the child: exit at the step, without clean-up or atexit handlers
        try:
            persistence._checkpoint_step = lambda s: os._exit(0) if s == step else None
            save()
        finally:
            os._exit(3)  # the step was never reached
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked save did not reach {step!r} in 60 s")
        time.sleep(0.005)
    assert os.waitstatus_to_exitcode(status) == 0, f"the save never reached {step!r}"


MODES = ["raise", pytest.param("exit", marks=pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork"))]
MODEL_STEPS = [("weights-temp", "old"), ("weights-renamed", "old"), ("config-temp", "old"),
               ("config-renamed", "new"), ("cleanup", "new")]
MANAGER_STEPS = [("weights-temp", "old"), ("weights-renamed", "old"), ("config-temp", "old"),
                 ("config-renamed", "old"), ("state-temp", "old"), ("state-renamed", "new"), ("cleanup", "new")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step,expect", MODEL_STEPS)
def test_model_save_interrupted_in_each_window_leaves_old_or_new(models, tmp_path, monkeypatch, step, expect, mode):
    old, new = models
    folder = tmp_path / "c"
    old.save_pretrained(folder)
    interrupt(mode, step, lambda: new.save_pretrained(folder), monkeypatch)
    monkeypatch.setattr(persistence, "_checkpoint_step", lambda s: None)
    assert same(load_model(folder), state_of(old if expect == "old" else new))
    # The next save completes and leaves one checkpoint: the config and the weights it names
    # (a killed writer's temporary file is young, so it stays until it is stale).
    old.save_pretrained(folder)
    named = json.loads((folder / CONFIG_NAME).read_text())["weights"]["file"]
    assert visible(folder) == [CONFIG_NAME, named]
    if mode == "raise":
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    assert same(load_model(folder), state_of(old))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step,expect", MANAGER_STEPS)
def test_manager_save_interrupted_in_each_window_leaves_old_or_new(managers, tmp_path, monkeypatch, step, expect, mode):
    old, new = managers
    folder = tmp_path / "m"
    old.save(folder)
    interrupt(mode, step, lambda: new.save(folder), monkeypatch)
    monkeypatch.setattr(persistence, "_checkpoint_step", lambda s: None)
    assert same(load_mgr(folder), state_of(old if expect == "old" else new))
    # model/ on its own is a whole checkpoint too (the old one or the new one)
    loaded = load_model(folder / "model")
    assert same(((), loaded[1]), ((), state_of(old)[1])) or same(((), loaded[1]), ((), state_of(new)[1]))
    new.save(folder)
    assert same(load_mgr(folder), state_of(new))
    named = json.loads((folder / STATE_NAME).read_text())["model"]["weights"]["file"]
    assert visible(folder / "model") == [CONFIG_NAME, named]


def test_manager_state_is_one_commit_with_the_model(managers, tmp_path):
    """The state names the model's weights file and holds its whole config."""
    _, b = managers
    b.save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / STATE_NAME).read_text())
    model_cfg = json.loads((tmp_path / "m" / "model" / CONFIG_NAME).read_text())
    assert state["model"] == model_cfg and state["tasks"] == ["task0", "task1"]
    assert (tmp_path / "m" / "model" / state["model"]["weights"]["file"]).is_file()


# ---------------------------------------------------------------------- (c) readers racing writers
def test_reader_retries_when_a_writer_removes_the_weights_it_was_about_to_read(models, managers, tmp_path, monkeypatch):
    """Deterministic race: between the reader's config read and its weights read a writer
    commits B and removes A's weights; the reader re-reads the config and gets B, whole."""
    for objs, folder, save, load in [(models, tmp_path / "c", lambda o, f: o.save_pretrained(f), load_model),
                                     (managers, tmp_path / "m", lambda o, f: o.save(f), load_mgr)]:
        a, b = objs
        save(a, folder)
        real, raced = persistence.read_json, []

        def racing_read_json(*args, **kw):
            out = real(*args, **kw)
            if not raced:
                raced.append(True)
                save(b, folder)
            return out

        monkeypatch.setattr(persistence, "read_json", racing_read_json)
        assert same(load(folder), state_of(b)) and raced
        monkeypatch.setattr(persistence, "read_json", real)


def test_weights_that_stay_missing_fail_clearly(models, tmp_path):
    a, _ = models
    a.save_pretrained(tmp_path / "c")
    named = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())["weights"]["file"]
    os.unlink(tmp_path / "c" / named)
    with pytest.raises(CheckpointError, match=rf"{named} is missing: .*{CONFIG_NAME} names it"):
        MoLoRAModel.from_pretrained(tiny_bert(), tmp_path / "c")


def test_concurrent_writers_and_reader_every_load_is_whole(models, tmp_path):
    """Two writer threads (A and B, serialised by the folder lock) save for ~1.5 s while the test
    reads: every read succeeds and is exactly A or B."""
    a, b = models
    folder = tmp_path / "c"
    a.save_pretrained(folder)
    refs = {"A": state_of(a), "B": state_of(b)}
    stop, saves, errors = threading.Event(), [0, 0], []

    def writer(i, model):
        try:
            while not stop.is_set():
                model.save_pretrained(folder)
                saves[i] += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, m)) for i, m in enumerate((a, b))]
    for t in threads:
        t.start()
    seen = {"A": 0, "B": 0}
    try:
        deadline = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < deadline:
            if n % 8 == 7:  # now and then the full load, else the verified read alone (more reads)
                loaded = load_model(folder)
            else:
                meta, tensors = persistence.read_checkpoint(folder)
                loaded = ((), tensors)
            got = which(loaded, refs)
            assert got is not None, "a load returned neither A nor B"
            seen[got] += 1
            n += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert sum(seen.values()) >= 10 and min(saves) >= 2, (seen, saves)
    named = json.loads((folder / CONFIG_NAME).read_text())["weights"]["file"]
    assert visible(folder) == [CONFIG_NAME, named]


# ---------------------------------------------------------------------- (d) stale temporary files
def test_stale_temps_and_unreferenced_weights_are_cleaned(models, managers, tmp_path):
    a, _ = models
    folder = tmp_path / "c"
    a.save_pretrained(folder)
    old = time.time() - 3600
    stale = [".molora_model-0123456789abcdef.safetensors.k1ll3d.tmp", ".molora_config.json.k1ll3d.tmp",
             ".molora_model.safetensors.v1w.tmp"]
    young = ".molora_config.json.l1ve.tmp"  # a live writer's, perhaps: not ours to take
    foreign = ".notes.txt.x.tmp"            # not a molora name: never touched
    for name in [*stale, young, foreign]:
        (folder / name).write_bytes(b"partial")
    for name in [*stale, foreign]:
        os.utime(folder / name, (old, old))
    (folder / "molora_model-fedcba9876543210.safetensors").write_bytes(b"orphan")  # a killed writer's renamed weights
    a.save_pretrained(folder)
    left = sorted(os.listdir(folder))
    named = json.loads((folder / CONFIG_NAME).read_text())["weights"]["file"]
    assert left == sorted([CONFIG_NAME, named, young, foreign])
    assert same(load_model(folder), state_of(a))

    m, _ = managers
    mfolder = tmp_path / "m"
    m.save(mfolder)
    for f in (mfolder / ".continual_state.json.k1ll3d.tmp", mfolder / "model" / ".molora_config.json.k1ll3d.tmp"):
        f.write_bytes(b"partial")
        os.utime(f, (old, old))
    m.save(mfolder)
    assert not [n for n in os.listdir(mfolder) if n.endswith(".tmp")]
    assert not [n for n in os.listdir(mfolder / "model") if n.endswith(".tmp")]


# ---------------------------------------------------------------------- (a) kill -9, many times
ZYGOTE = r"""
import os, random, signal, sys, time
import torch
torch.set_num_threads(1)  # before any op: no thread pool exists, so fork() below is safe
sys.path.insert(0, sys.argv[3])
from test_checkpoint_atomic import make_manager_pair, make_model_pair

kind, root = sys.argv[1], sys.argv[2]
a, b = make_model_pair() if kind == "model" else make_manager_pair()
save = (lambda o, p: o.save_pretrained(p)) if kind == "model" else (lambda o, p: o.save(p))
save(a, os.path.join(root, "refA")); save(b, os.path.join(root, "refB"))
target = os.path.join(root, "ckpt")
save(a, target)
t0 = time.perf_counter()
for o in (b, a, b, a):
    save(o, target)
print("ready", (time.perf_counter() - t0) / 4, flush=True)
for line in sys.stdin:
    delay, first = line.split()
    order = (a, b) if first == "A" else (b, a)
    pid = os.fork()
    if pid == 0:  # the writer: save A, B, A, B, ... until killed
        while True:
            for o in order:
                save(o, target)
    time.sleep(float(delay))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("killed", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "manager"])
def test_kill_minus_9_at_random_moments_never_loses_the_checkpoint(kind, tmp_path, capsys):
    """A writer saves A and B alternately into one folder and is SIGKILLed at random moments
    (>= 50 times); after every kill the folder loads and equals exactly A or B.

    A helper process imports molora once and forks one writer per kill (a fresh interpreter
    per kill would spend most of the time importing torch); it kills its writer with SIGKILL
    after the delay this test draws, then this test loads and compares."""
    kills = 50
    load = load_model if kind == "model" else load_mgr
    start = time.perf_counter()
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, kind, str(tmp_path), str(Path(__file__).parent)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = zygote.stdout.readline().split()
        assert ready and ready[0] == "ready", f"helper failed to start: {ready}"
        save_s = float(ready[1])
        refs = {"A": load(tmp_path / "refA"), "B": load(tmp_path / "refB")}
        rng = random.Random(1234)
        seen, mid = {"A": 0, "B": 0}, 0
        model_dir = tmp_path / "ckpt" / ("model" if kind == "manager" else "")
        for i in range(kills):
            before = set(os.listdir(model_dir))
            zygote.stdin.write(f"{rng.uniform(0, 4 * save_s):.6f} {rng.choice('AB')}\n")
            zygote.stdin.flush()
            assert zygote.stdout.readline().strip() == "killed"
            names = set(os.listdir(model_dir))
            # evidence this kill landed inside a save: a new temp file, or a second weights file
            mid += any(n.endswith(".tmp") for n in names - before) or sum(bool(WEIGHTS_PATTERN.fullmatch(n)) for n in names) > 1
            got = which(load(tmp_path / "ckpt"), refs)
            assert got is not None, f"kill {i}: the checkpoint loads as neither A nor B"
            seen[got] += 1
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[{kind}] {kills} SIGKILLs in {elapsed:.1f} s (one save {1000 * save_s:.1f} ms): loaded A {seen['A']}x, "
              f"B {seen['B']}x, never anything else; {mid} kills left new files of an unfinished save (killed mid-save)")
    assert seen["A"] and seen["B"]
