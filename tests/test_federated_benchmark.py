"""benchmarks/federated.py (issue 27): the selection on validation and where each run lives,
without training (the runs are stubbed)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(module: str = "federated"):
    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(module)


def test_a_schedule_other_than_the_configs_runs_in_its_own_folder():
    runs = _bench("_federated_runs")
    extra = {"federation": {"partition": "split"}, "train": {"lr": 0.02}}
    assert runs.scheduled(Path("w"), extra, "cosine") == (Path("w"), extra)
    work, changed = runs.scheduled(Path("w"), extra, "none")
    assert work == Path("w/sched-none")
    assert changed["train"] == {"lr": 0.02, "scheduler": "none"}
    assert changed["federation"] == extra["federation"]
    raw = runs.raw_config(changed, 0, Path("data"), Path("out"))  # merged into the config's train
    assert raw["train"]["scheduler"] == "none" and raw["train"]["lr"] == 0.02
    assert raw["train"]["batch_size"] == 64  # the config's, kept


def test_recipe_and_server_lr_are_chosen_by_validation_at_the_selection_seed(monkeypatch):
    fb = _bench()
    val = {("cosine", "mean"): 0.80, ("cosine", "local"): 0.84, ("none", "mean"): 0.83,
           ("none", "local"): 0.90}  # fmt: skip
    by_lr = {1.0: 0.0, 2.0: 0.02, 4.0: -0.01}  # an interior optimum at 2
    calls = []

    def arm(extra, lr, bn, seed, root, work, quiet, scheduler="cosine", nova=False):
        calls.append((lr, bn, seed, scheduler, nova))
        score = val[scheduler, bn] + (0.01 * (seed - 100) if nova else by_lr[lr])
        return {"final_val": [score, float("nan")], "seconds": 1.0}

    monkeypatch.setattr(fb, "arm_run", arm)
    recipe = fb._select_recipe({}, None, Path("w"), True)
    assert (recipe["scheduler"], recipe["batchnorm"]) == ("none", "local")
    assert recipe["val_accuracy"]["cosine/local"] == 0.84  # NaN experiences ignored
    lr = fb._select_server_lr({}, "local", "none", None, Path("w"), True)
    assert lr["chosen"] == 2.0 and not lr["at_edge"]
    seeds = set(fb.SELECTION_SEEDS)
    assert {c[2] for c in calls} == seeds and len(seeds) == 2 and not seeds & set(fb.SEEDS)
    assert all(c[3] == "none" for c in calls[8:])  # the server lr at the chosen schedule
    assert not any(c[4] for c in calls)
    del calls[:]
    nova = fb._select_fednova({}, "local", "none", 0.92, None, Path("w"), True)
    assert nova["val_accuracy"] == pytest.approx(0.905)  # the mean over both selection seeds
    assert nova["against"] == 0.92 and len(nova["seconds"]) == 2
    assert [c[1:] for c in calls] == [("local", s, "none", True) for s in fb.SELECTION_SEEDS]
