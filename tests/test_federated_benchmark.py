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


@pytest.mark.parametrize("by", ["accuracy", "balanced"])
def test_recipe_and_server_lr_are_chosen_by_validation_at_the_selection_seed(monkeypatch, by):
    """Each choice follows ``--select-by``'s score; the other criterion's scores are kept
    beside it. The stub's balanced scores disagree with its accuracies on the recipe."""
    fb = _bench()
    val = {("cosine", "mean"): 0.80, ("cosine", "local"): 0.84, ("none", "mean"): 0.83,
           ("none", "local"): 0.90}  # fmt: skip
    balanced = {("cosine", "mean"): 0.70, ("cosine", "local"): 0.78, ("none", "mean"): 0.72,
                ("none", "local"): 0.75}  # fmt: skip
    by_lr = {1.0: 0.0, 2.0: 0.02, 4.0: -0.01}  # an interior optimum at 2
    calls = []

    def arm(extra, lr, bn, seed, root, work, quiet, scheduler="cosine", nova=False):
        calls.append((lr, bn, seed, scheduler, nova))
        shift = 0.01 * (seed - 100) if nova else by_lr[lr]
        return {"final_val": [val[scheduler, bn] + shift, float("nan")],
                "final_val_balanced": [balanced[scheduler, bn] + shift, float("nan")],
                "seconds": 1.0}  # fmt: skip

    monkeypatch.setattr(fb, "arm_run", arm)
    recipe = fb._select_recipe({}, None, Path("w"), True, by)
    want = {"accuracy": ("none", "local"), "balanced": ("cosine", "local")}[by]
    assert (recipe["scheduler"], recipe["batchnorm"]) == want
    assert recipe["val"]["accuracy"]["cosine/local"] == 0.84  # NaN experiences ignored
    assert recipe["val"]["balanced"]["none/local"] == 0.75
    sched = want[0]
    lr = fb._select_server_lr({}, "local", sched, None, Path("w"), True, by)
    assert lr["chosen"] == 2.0 and not lr["at_edge"]
    assert lr["val"]["accuracy"][2.0] == pytest.approx(val[sched, "local"] + 0.02)
    assert lr["val"]["balanced"][2.0] == pytest.approx(balanced[sched, "local"] + 0.02)
    assert fb._val(lr) == {b: lr["val"][b][2.0] for b in ("accuracy", "balanced")}
    seeds = set(fb.SELECTION_SEEDS)
    assert {c[2] for c in calls} == seeds and len(seeds) == 2 and not seeds & set(fb.SEEDS)
    assert all(c[3] == sched for c in calls[8:])  # the server lr at the chosen schedule
    assert not any(c[4] for c in calls)
    del calls[:]
    against = {"accuracy": 0.92, "balanced": 0.80}
    nova = fb._select_fednova({}, "local", "none", against, None, Path("w"), True, by)
    assert nova["val"]["accuracy"] == pytest.approx(0.905)  # the mean over both selection seeds
    assert nova["val"]["balanced"] == pytest.approx(0.755)
    assert nova["against"] == against and len(nova["seconds"]) == 2
    assert [c[1:] for c in calls] == [("local", s, "none", True) for s in fb.SELECTION_SEEDS]


def test_central_schedule_is_chosen_by_the_criterion(monkeypatch):
    fb = _bench()
    scores = {"cosine": (0.93, 0.80), "none": (0.91, 0.84)}  # (accuracy, balanced)

    def central(extra, seed, root, work, quiet, scheduler="cosine", val=False):
        assert val and seed in fb.SELECTION_SEEDS
        acc, bal = scores[scheduler]
        return {"val": acc, "val_balanced": bal, "seconds": 1.0}

    monkeypatch.setattr(fb, "central_run", central)
    assert fb._select_central({}, None, Path("w"), True, "accuracy")["scheduler"] == "cosine"
    got = fb._select_central({}, None, Path("w"), True, "balanced")
    assert got["scheduler"] == "none" and got["val"]["accuracy"]["none"] == 0.91


def test_a_run_without_the_other_criterion_is_read_back():
    """A run from before ``pooled_val_balanced``: its accuracy still selects (balanced is NaN
    beside it); selecting by balanced accuracy asks for the run again."""
    fb = _bench()
    old = {"final_val": [0.9, 0.8], "final_val_balanced": [], "seconds": 1.0}
    got = fb._both([old], "old run", "accuracy")
    assert got["accuracy"] == pytest.approx(0.85) and got["balanced"] != got["balanced"]
    with pytest.raises(SystemExit, match="old run: the run recorded no validation balanced "):
        fb._both([old], "old run", "balanced")


def test_kernel_paths_gather_every_process_of_a_run(tmp_path):
    """The page states each stream's CPU kernel path from the run's and its sites' records."""
    runs = _bench("_federated_runs")
    (tmp_path / "sites" / "a").mkdir(parents=True)
    (tmp_path / "environment.json").write_text('[{"cpu_capability": "AVX2"}]')
    (tmp_path / "sites" / "a" / "environment.json").write_text(
        '[{"cpu_capability": "AVX512"}, {"cpu_capability": "AVX2"}]'  # resumed on another machine
    )
    assert runs.kernel_paths(tmp_path) == ["AVX2", "AVX512"]
    assert runs.kernel_paths(tmp_path / "sites" / "none") == []
