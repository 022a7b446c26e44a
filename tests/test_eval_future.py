"""``eval.future``: which test sets are scored after each experience, and what reads them.

A short real run on a 4-site synthetic domain-incremental stream (every later site is scorable)
with ``eval.future: next`` (the default) and ``all``: the unscored cells are NaN (null in
metrics.json, "—" in the report), the scored ones and the training are the same in both, and
everything that reads the predictions files of a ``next`` run still works.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _tiny import tiny_raw

from medcl.config import validate_config
from medcl.engine.evaluate import num_scored
from medcl.engine.run import run
from medcl.errors import ConfigError
from medcl.reports import RunResults, write_report

pytestmark = pytest.mark.usefixtures("one_thread")

T = 4  # experiences (sites): rows 0 and 1 of a `next` run leave cells out
SITES = tiny_raw(
    train={"epochs": 3, "batch_size": 8, "max_updates": 4, "lr": 0.05, "eval_every": 2},
    memory={"size": 0},
)
SITES["scenario"] = {
    "name": "synthetic-sites",
    "num_classes": 3,
    "n_sites": T,
    "n_train": 16,
    "n_val": 4,
    "n_test": 12,
    "image_size": 16,
}


def _config(out: Path, future: str | None) -> dict:
    raw = json.loads(json.dumps(SITES)) | {
        "output_dir": str(out),
        "name": f"future-{future or 'default'}",
    }
    if future is not None:
        raw["eval"]["future"] = future
    return raw


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _matrix(rows: list[list[float | None]]) -> np.ndarray:
    return np.array(rows, dtype=float)  # null -> NaN


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    return {
        "next": run(validate_config(_config(out, None)), quiet=True),  # the default
        "all": run(validate_config(_config(out, "all")), quiet=True),
    }


def test_num_scored_is_the_learned_and_the_next_experience():
    assert [num_scored(i, 4, "next") for i in range(4)] == [2, 3, 4, 4]
    assert [num_scored(i, 4, "all") for i in range(4)] == [4, 4, 4, 4]
    assert num_scored(0, 1, "next") == 1


def test_unknown_future_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.future.*'next' or 'all'.*sometimes"):
        validate_config(_config(tmp_path, "sometimes"))


def test_next_scores_up_to_the_next_experience(runs):
    m = _metrics(runs["next"])
    assert validate_config(_config(Path("."), None)).eval.future == "next"
    for key in ("accuracy_matrix", "task_accuracy_matrix"):
        rows = m[key]
        assert [len(r) for r in rows] == [T] * T  # one entry per experience, scored or not
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if j <= i + 1:
                    assert v is not None and math.isfinite(v), (key, i, j)
                else:
                    assert v is None, (key, i, j)  # NaN is written as null, as elsewhere
    assert math.isfinite(m["summary"]["fwt"])


def test_all_scores_every_experience(runs):
    m = _metrics(runs["all"])
    assert np.isfinite(_matrix(m["accuracy_matrix"])).all()
    assert np.isfinite(_matrix(m["task_accuracy_matrix"])).all()


def test_evaluation_does_not_change_training(runs):
    """Same seed, same training: the scored cells, FWT, the fit records and the curves agree."""
    nxt, full = _metrics(runs["next"]), _metrics(runs["all"])
    clock = ("seconds", "images_per_s")
    fit = [[{k: v for k, v in f.items() if k not in clock} for f in m["fit"]] for m in (nxt, full)]
    assert fit[0] == fit[1]  # updates, losses (first / highest / last), diagnostics
    assert nxt["baseline_accuracy"] == full["baseline_accuracy"]
    R_next, R_all = _matrix(nxt["accuracy_matrix"]), _matrix(full["accuracy_matrix"])
    scored = ~np.isnan(R_next)
    np.testing.assert_array_equal(R_next[scored], R_all[scored])
    assert nxt["summary"]["fwt"] == full["summary"]["fwt"]
    for key in ("average_accuracy", "forgetting", "bwt"):
        assert nxt["summary"][key] == full["summary"][key], key
    curves = [pd.read_csv(runs[k] / "curves.csv") for k in ("next", "all")]
    pd.testing.assert_frame_equal(*curves)


def test_predictions_hold_the_scored_experiences(runs):
    pred = runs["next"] / "predictions"
    for after in range(T):
        with np.load(pred / f"after-{after:03d}.npz") as z:
            experiences = sorted(set(z["experience"].tolist()))
        assert experiences == list(range(min(after + 2, T)))
        meta = pd.read_csv(pred / f"after-{after:03d}.csv")
        assert sorted(set(meta["experience"])) == experiences
    with np.load(runs["all"] / "predictions" / "after-000.npz") as z:
        assert sorted(set(z["experience"].tolist())) == list(range(T))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")  # 4 updates
def test_results_and_report_of_a_next_run(runs):
    run_dir = runs["next"]
    res = RunResults(run_dir)
    R = res.accuracy_matrix()
    assert R.shape == (T, T) and np.isnan(R[0, 2:]).all() and np.isfinite(R[-1]).all()
    frame = res.accuracy_frame()
    assert frame["value"].isna().sum() == np.isnan(R).sum()
    assert set(res.clinical(after=0, n_resamples=50)["experience"].dropna()) == {0, 1}
    assert set(res.predictions().experience) == set(range(T))
    assert len(res.forgetting()) == T - 1
    earlier = RunResults(run_dir, experience=1)  # a model whose file leaves experience 3 out
    assert set(earlier.predictions().experience) == {0, 1, 2}
    assert earlier.accuracy_matrix().shape == (2, 2)  # up to the model reported
    html = write_report(run_dir, run_dir, n_resamples=50, seed=1).read_text()
    data = json.loads((run_dir / "report.json").read_text())
    matrix = data["continual"]["accuracy_matrix"]
    assert matrix[0][2] is None and matrix[0][1] is not None
    assert data["continual"]["not_scored"] is True
    assert "<td>—</td>" in html and "not scored" in html


def test_resume_of_a_next_run_matches_the_uninterrupted_one(runs, tmp_path):
    cfg = validate_config(_config(tmp_path, None))
    run(cfg, quiet=True, stop_after=1)  # rows 0 and 1 hold unscored cells (null in state.json)
    resumed = _metrics(run(cfg, resume=True, quiet=True))
    full = _metrics(runs["next"])
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["summary"]["fwt"] == full["summary"]["fwt"]
