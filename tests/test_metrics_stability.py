from __future__ import annotations

import io

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn.exceptions import UndefinedMetricWarning

from medcl.errors import DataError
from medcl.metrics.stability import plot_stability_curves, stability_metrics, summarize_stability

matplotlib.use("Agg")

NAN = np.nan


def make_curves() -> pd.DataFrame:
    """Three experiences evaluated every k=10 updates; each starts with an offset-0 evaluation.

    Experience 1 dips to 0.5 and recovers; experience 2 dips to 0.3 and never recovers.
    """
    rows = [
        # experience, update, old, new, all
        (0, 0, NAN, 0.5, 0.5),
        (0, 10, NAN, 0.8, 0.8),
        (0, 20, NAN, 0.9, 0.9),
        (1, 30, 0.90, 0.0, 0.45),
        (1, 40, 0.50, 0.6, 0.55),
        (1, 50, 0.70, 0.8, 0.75),
        (1, 60, 0.895, 0.9, 0.8975),
        (1, 70, 0.90, 0.9, 0.90),
        (2, 80, 0.85, 0.0, 0.60),
        (2, 90, 0.30, 0.5, 0.35),
        (2, 100, 0.60, 0.7, 0.62),
    ]
    return pd.DataFrame(rows, columns=["experience", "update", "old_acc", "new_acc", "all_acc"])


UPPER = {"old": {1: 0.95, 2: 1.0}, "new": {1: 0.8, 2: 1.0}, "all": {1: 0.86, 2: 1.0}}


def test_known_dip_and_recovery() -> None:
    table = stability_metrics(make_curves(), upper_bound=UPPER, tol=0.01)
    assert list(table.experience) == [1, 2]
    e1 = table.iloc[0]
    assert e1.n_evals == 5 and e1.start_update == 30
    assert e1.pre_old_acc == pytest.approx(0.90)  # experience 0's last all_acc
    assert e1.start_old_acc == pytest.approx(0.90) and e1.init_drop == pytest.approx(0.0)
    assert e1.min_old_acc == pytest.approx(0.50)
    assert e1.updates_to_min == 10
    assert e1.max_drop == pytest.approx(0.40)
    # first evaluation at/after the minimum with old >= 0.9 - 0.01: update 60 (0.895)
    assert bool(e1.recovered) and e1.updates_to_recover == 30
    # 10 * ((0.9-0.5) + (0.9-0.7) + (0.9-0.895) + 0)
    assert e1.gap_area == pytest.approx(6.05)
    # gaps average the evaluations after the offset-0 one: 1 - mean(old[1:])/0.95
    assert e1.stability_gap == pytest.approx(1 - (0.5 + 0.7 + 0.895 + 0.9) / 4 / 0.95)
    # 1 - mean(new[1:])/0.8 = 1 - 0.8/0.8
    assert e1.plasticity_gap == pytest.approx(0.0)
    # 1 - mean(all[1:])/0.86
    assert e1.continual_knowledge_gap == pytest.approx(1 - (0.55 + 0.75 + 0.8975 + 0.9) / 4 / 0.86)


def test_never_recovers() -> None:
    e2 = stability_metrics(make_curves(), upper_bound=UPPER).iloc[1]
    # deployed level = experience 1's last all_acc (0.90); offset 0 already lost 0.05
    assert e2.pre_old_acc == pytest.approx(0.90) and e2.start_old_acc == pytest.approx(0.85)
    assert e2.init_drop == pytest.approx(0.05) and e2.min_old_acc == pytest.approx(0.30)
    assert e2.max_drop == pytest.approx(0.60)
    assert not bool(e2.recovered) and np.isnan(e2.updates_to_recover)
    assert e2.gap_area == pytest.approx(10 * (0.60 + 0.30))
    assert e2.stability_gap == pytest.approx(1 - (0.30 + 0.60) / 2)


def test_summary_means() -> None:
    out = summarize_stability(make_curves(), upper_bound=UPPER)
    e1_gap = 1 - (0.5 + 0.7 + 0.895 + 0.9) / 4 / 0.95
    assert out["stability_gap"] == pytest.approx((e1_gap + (1 - 0.9 / 2)) / 2)
    assert out["max_drop"] == pytest.approx((0.40 + 0.60) / 2)
    assert out["init_drop"] == pytest.approx((0.0 + 0.05) / 2)
    assert out["gap_area"] == pytest.approx((6.05 + 9.0) / 2)
    assert out["updates_to_recover"] == 30  # over the experiences that recovered
    assert out["n_not_recovered"] == 1 and out["n_experiences"] == 2


def test_no_dip_recovers_at_zero_and_default_upper_bound() -> None:
    curves = pd.DataFrame(
        {
            "experience": [0, 0, 1, 1, 1],
            "update": [0, 5, 5, 10, 15],
            "old_acc": [NAN, NAN, 0.8, 0.795, 0.81],
            "new_acc": [0.5, 0.7, 0.0, 0.4, 0.6],
            "all_acc": [0.5, 0.8, 0.4, 0.6, 0.7],
        }
    )
    row = stability_metrics(curves, tol=0.01).iloc[0]
    assert row.pre_old_acc == pytest.approx(0.8) and row.init_drop == pytest.approx(0.0)
    assert bool(row.recovered) and row.updates_to_recover == 0
    assert row.gap_area == pytest.approx(0.005 * 5)
    assert row.stability_gap == pytest.approx(1 - (0.795 + 0.81) / 2)  # upper bound 1.0


def test_drop_counts_set_up_before_the_first_update() -> None:
    """A head initialisation that costs old accuracy at offset 0 is part of the drop."""
    curves = pd.DataFrame(
        {
            "experience": [0, 1, 1, 1],
            "update": [10, 10, 15, 20],
            "old_acc": [NAN, 0.6, 0.85, 0.9],
            "new_acc": [0.9, 0.2, 0.5, 0.7],
            "all_acc": [0.9, 0.4, 0.7, 0.8],
        }
    )
    row = stability_metrics(curves).iloc[0]
    assert row.pre_old_acc == pytest.approx(0.9) and row.start_old_acc == pytest.approx(0.6)
    assert row.init_drop == pytest.approx(0.3) and row.max_drop == pytest.approx(0.3)
    assert row.updates_to_min == 0 and row.updates_to_recover == 10
    # without the previous experience's curve, offset 0 is the reference (and init_drop NaN)
    gap = stability_metrics(curves.assign(experience=[0, 2, 2, 2])).iloc[0]
    assert gap.pre_old_acc == pytest.approx(0.6) and np.isnan(gap.init_drop)
    assert gap.max_drop == 0 and gap.updates_to_recover == 0


def test_single_experience_is_empty_and_summary_warns() -> None:
    curves = make_curves().query("experience == 0")
    assert stability_metrics(curves).empty
    with pytest.warns(UndefinedMetricWarning, match="single experience"):
        out = summarize_stability(curves)
    assert np.isnan(out["stability_gap"])


def test_validation() -> None:
    curves = make_curves()
    with pytest.raises(DataError, match=r"missing column\(s\) \['all_acc'\]"):
        stability_metrics(curves.drop(columns="all_acc"))
    with pytest.raises(DataError, match="more than one evaluation"):
        stability_metrics(pd.concat([curves, curves.tail(1)]))
    with pytest.raises(DataError, match="did you mean 'old'"):
        stability_metrics(curves, upper_bound={"olds": 1.0, "new": 1.0, "all": 1.0})
    with pytest.raises(DataError, match=r"no value for experience\(s\) \[2\]"):
        stability_metrics(curves, upper_bound={"old": {1: 0.9}, "new": 1.0, "all": 1.0})
    with pytest.raises(DataError, match="positive finite"):
        stability_metrics(curves, upper_bound=0.0)


def test_plot_is_agg_safe_and_reusable() -> None:
    fig = plot_stability_curves(make_curves(), title="fine-tune")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 3 * 3 + 2  # 3 curves per experience + 2 boundaries
    fig.savefig(io.BytesIO(), format="png")
    other = Figure()
    ax2 = other.add_subplot()
    assert plot_stability_curves(make_curves(), ax2, boundaries=False) is other
    assert len(ax2.lines) == 9
