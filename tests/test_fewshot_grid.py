"""The few-shot grid's bookkeeping (benchmarks/fewshot.py): method variants, tables recomputed from
cells (so runs split over processes merge), and issue 16's criteria on like-for-like pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
fewshot = pytest.importorskip("fewshot")


def test_method_variants_parse_and_refuse():
    assert fewshot.parse_method("gradient_router:prior=0.1:folds=5") == ("gradient_router", {"prior": 0.1, "folds": 5})
    assert fewshot.parse_method("uniform") == ("uniform", {})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fewshot.parse_method("nope")
    with pytest.raises(ValueError, match="options are"):
        fewshot.parse_method("gradient_router:beta=1")
    with pytest.raises(ValueError, match="lorahub takes no options"):
        fewshot.parse_method("lorahub:prior=1")


def cell(k, target, seed, method, acc):
    return {"k": k, "target": target, "seed": seed, "method": method, "accuracy": acc}


def test_tables_and_criteria_from_cells(tmp_path):
    acc = {  # (target, seed) -> method -> accuracy
        ("a", 0): {"uniform": 0.5, "auto": 0.6, "gradient_router": 0.7, "lorahub": 0.4, "oracle": 0.9},
        ("a", 1): {"uniform": 0.5, "auto": 0.4, "gradient_router": 0.5, "lorahub": 0.6, "oracle": 0.9},
        ("b", 0): {"uniform": 0.2, "auto": 0.3, "gradient_router": 0.1, "lorahub": 0.2, "oracle": 0.4},
        ("b", 1): {"uniform": 0.2, "auto": 0.3, "gradient_router": 0.3},  # oracle, lorahub missing: pair left out
    }
    cells = [cell(16, t, s, m, v) for (t, s), by in acc.items() for m, v in by.items()]
    results, per_task = fewshot.summarise(cells)
    # auto: seeds 0 and 1 on both targets: per seed (0.6 + 0.3) / 2 and (0.4 + 0.3) / 2
    assert results["16"]["auto"]["mean"] == pytest.approx(0.4) and results["16"]["auto"]["std"] == pytest.approx(0.05)
    assert results["16"]["oracle"]["seeds"] == 1  # only seed 0 has every target
    assert per_task["16"]["auto"]["a"]["runs"] == [0.6, 0.4]
    check = fewshot.check_targets(cells, 16)
    assert check["pairs"] == 3 and check["targets"] == ["a", "b"]
    # per target over its complete pairs, then over targets: auto = ((0.6 + 0.4) / 2 + 0.3) / 2 = 0.4
    assert check["average"]["auto"] == pytest.approx(40.0)
    assert check["average"]["gradient_router"] == pytest.approx(((0.7 + 0.5) / 2 + 0.1) / 2 * 100)
    assert check["auto_minus_best_other"] == pytest.approx(40.0 - 35.0)
    assert check["auto_at_least_uniform_on"] == 2
    assert check["gradient_minus_lorahub"] == pytest.approx(35.0 - 35.0)
    assert check["best_composition"] == "auto" and check["oracle_minus_best"] == pytest.approx(65.0 - 40.0)

    # merge: a finished run's JSON plus a progress file; later files win a duplicate cell
    run = {"setup": {"seeds": 2, "tasks": ["a"]}, "results": {}, "per_task": {}, "cells": cells[:5], "seconds": 1.0}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "more.cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells[5:]))
    out = fewshot.merge([str(tmp_path / "run.json"), str(tmp_path / "more.cells.jsonl")], str(tmp_path / "out.json"))
    assert len(out["cells"]) == len(cells) and out["setup"]["tasks"] == ["a", "b"]
    assert out["results"]["16"]["auto"]["mean"] == pytest.approx(0.4)


def test_replay_scores_each_choice_with_the_standalone_method():
    folds = {"uniform": [1.0, 1.0, 1.0, 1.0], "weights": [0.8, 0.9, 0.85, 0.95], "lorahub": [0.1, 0.1, 0.1, 2.5]}
    cells = [cell(16, "a", 0, m, v) for m, v in (("uniform", 0.5), ("gradient_weights", 0.6), ("lorahub_output", 0.7))]
    cells.append({**cell(16, "a", 0, "auto", 0.5), "fold_losses": folds})
    (one,) = fewshot.replay_auto(cells, "one_se")
    assert one["chosen"] == "uniform" and one["accuracy"] == 0.5 and one["method"] == "auto:rule=one_se (replayed)"
    (paired,) = fewshot.replay_auto(cells, "paired")
    assert paired["chosen"] == "weights" and paired["accuracy"] == 0.6
    (only,) = fewshot.replay_auto(cells, "paired", ["weights", "lorahub"])  # no uniform: the least mean loss
    assert only["chosen"] == "lorahub" and only["accuracy"] == 0.7
    assert only["method"] == "auto:rule=paired:candidates=weights+lorahub (replayed)"
