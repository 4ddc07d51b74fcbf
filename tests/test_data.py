"""Task records, the task-folder loader (on real clbench slices) and the synthetic tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molora.apps.data import (
    SYNTHETIC_TASK_NAMES,
    TextTask,
    load_task_folder,
    make_synthetic_tasks,
    task_from_records,
)

CLBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "clbench"
needs_clbench = pytest.mark.skipif(not (CLBENCH / "tasks.json").is_file(),
                                   reason=f"clbench data not found at {CLBENCH}")


def _raw(name: str, split: str) -> dict[str, str]:
    rows = [json.loads(line) for line in (CLBENCH / name / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    return {r["text"]: r["label"] for r in rows}


@needs_clbench
def test_load_clbench_slices_match_raw_files():
    tasks = load_task_folder(CLBENCH, ["cb", "agnews"], train_limit=20, test_limit=10, seed=3)
    meta = json.loads((CLBENCH / "tasks.json").read_text())
    assert [t.name for t in tasks] == ["cb", "agnews"]
    for t in tasks:
        assert t.labels == meta[t.name]["labels"] and t.instruction == meta[t.name]["instruction"]
        assert (len(t.train), len(t.test)) == (20, 10)
        for split in ("train", "test"):
            raw = _raw(t.name, split)
            for text, y in getattr(t, split):
                assert raw[text] == t.labels[y]  # the index points at the file's label string


@needs_clbench
def test_load_full_split_sizes_and_seeded_subsampling():
    (full,) = load_task_folder(CLBENCH, ["copa"])
    assert len(full.test) == 50 and len(full.train) == 400  # README/tasks.json sizes
    a = full.with_limits(train=15, test=5, seed=1)
    b = full.with_limits(train=15, test=5, seed=1)
    c = full.with_limits(train=15, test=5, seed=2)
    assert a.train == b.train and a.test == b.test
    assert a.train != c.train
    assert set(a.train) <= set(full.train)
    assert full.with_limits(train=10_000).train == full.train


def _write_folder(root: Path, rows: list[dict], labels=("yes", "no")) -> Path:
    (root / "t1").mkdir(parents=True)
    (root / "tasks.json").write_text(json.dumps({"t1": {"instruction": "Answer.", "labels": list(labels)}}))
    for split in ("train", "test"):
        (root / "t1" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_loader_on_a_custom_folder(tmp_path):
    root = _write_folder(tmp_path / "bench", [{"text": "a", "label": "no"}, {"text": "b", "label": "yes"}])
    (t,) = load_task_folder(root)
    assert t.train == [("a", 1), ("b", 0)] and t.labels == ["yes", "no"]


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_task_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tasks.json"):
        load_task_folder(tmp_path)
    root = _write_folder(tmp_path / "bad", [{"text": "a", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"unknown task.*'zzz'.*available: \['t1'\]"):
        load_task_folder(root, ["zzz"])
    with pytest.raises(ValueError, match=r"task 't1' train row 0: label 'maybe' is not in .*\['yes', 'no'\]"):
        load_task_folder(root)
    (root / "t1" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"'t1'.*test.jsonl"):
        load_task_folder(root)


def test_task_from_records_accepts_indices_and_checks_them():
    t = task_from_records("x", "i", ["a", "b"], [{"text": "u", "label": 1}], [{"text": "v", "label": "a"}])
    assert t.train == [("u", 1)] and t.test == [("v", 0)]
    with pytest.raises(ValueError, match="out of range"):
        task_from_records("x", "i", ["a", "b"], [{"text": "u", "label": 2}], [])
    with pytest.raises(ValueError, match="duplicate labels"):
        TextTask("x", "i", ["a", "a"], [], [])


def test_synthetic_tasks_deterministic_and_seed_dependent():
    a = make_synthetic_tasks(seed=0, n_train=30, n_test=12)
    b = make_synthetic_tasks(seed=0, n_train=30, n_test=12)
    c = make_synthetic_tasks(seed=1, n_train=30, n_test=12)
    assert a == b
    assert [t.train for t in a] != [t.train for t in c]


def test_synthetic_tasks_well_formed():
    tasks = make_synthetic_tasks(seed=0)
    assert len(tasks) >= 5 and tuple(t.name for t in tasks) == SYNTHETIC_TASK_NAMES
    assert len({tuple(t.labels) for t in tasks}) == len(tasks)  # distinct label sets
    assert len({t.instruction for t in tasks}) == len(tasks)
    for t in tasks:
        assert 2 <= len(t.labels) <= 4
        assert (len(t.train), len(t.test)) == (240, 120)
        counts = t.label_counts("train")
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced
        train_texts = [x for x, _ in t.train]
        test_texts = [x for x, _ in t.test]
        assert len(set(train_texts)) == len(train_texts) and len(set(test_texts)) == len(test_texts)
        assert not set(train_texts) & set(test_texts)  # test texts are unseen
        assert all(isinstance(x, str) and len(x) > 10 for x in train_texts + test_texts)


def test_synthetic_subset_and_errors():
    (t,) = make_synthetic_tasks(names=["tickets"], n_train=6, n_test=3)
    assert t.name == "tickets" and len(t.train) == 6
    with pytest.raises(ValueError, match="available"):
        make_synthetic_tasks(names=["weather"])
