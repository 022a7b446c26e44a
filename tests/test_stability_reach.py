"""updates_to_reach on a hand-made curve (the "updates to match vanilla" numbers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medcl.errors import DataError
from medcl.metrics.stability import updates_to_reach

CURVES = pd.DataFrame(
    [
        # experience, update, old, new, all
        (0, 0, np.nan, 0.5, 0.5),
        (0, 10, np.nan, 0.9, 0.9),
        (1, 10, 0.9, 0.0, 0.45),
        (1, 15, 0.6, 0.5, 0.55),
        (1, 20, 0.8, 0.8, 0.80),
        (1, 25, 0.9, 0.9, 0.90),
        (2, 25, 0.9, 0.0, 0.60),
        (2, 30, 0.7, 0.3, 0.58),
    ],
    columns=["experience", "update", "old_acc", "new_acc", "all_acc"],
)


def test_first_evaluation_at_or_above_the_target():
    got = updates_to_reach(CURVES, {1: 0.8, 2: 0.6})
    assert got == {1: 10.0, 2: 0.0}  # 20 - 10; experience 2 already there at offset 0
    assert updates_to_reach(CURVES, {1: 0.95}) == {1: float("inf")}
    assert updates_to_reach(CURVES, {1: 0.5}, column="new_acc") == {1: 5.0}


def test_errors_name_the_problem():
    with pytest.raises(DataError, match="column must be one of"):
        updates_to_reach(CURVES, {1: 0.5}, column="acc")
    with pytest.raises(DataError, match=r"experience\(s\) \[3\]"):
        updates_to_reach(CURVES, {3: 0.5})


def test_benchmark_targets_divide_by_vanillas_measured_updates():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    report = importlib.import_module("_stability_report")
    summary = {
        "sgm": {"stability_gap": 0.02, "final_acc": 0.8, "updates_to_vanilla_final": 30.0},
        "vanilla": {"stability_gap": 0.4, "final_acc": 0.7, "total_updates": 100.0},
    }
    got = {t["name"].split(": ")[1]: t for t in report.targets("s", {"summary": summary})}
    assert got["stability gap SGM / vanilla"]["value"] == pytest.approx(0.05)
    assert got["final accuracy SGM - vanilla"]["value"] == pytest.approx(0.1)
    reach = got["SGM updates to vanilla's final accuracy / vanilla's updates"]
    assert reach["value"] == pytest.approx(0.3) and reach["met"]
    assert not any(np.isfinite(t["value"]) for t in report.targets("s", {"summary": {}}))


@pytest.mark.parametrize("flag", ["--eval-every", "--updates", "--eval-samples"])
def test_benchmark_rejects_non_positive_budgets(flag, capsys):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("stability_gap")
    with pytest.raises(SystemExit) as e:
        bench.parse([flag, "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
