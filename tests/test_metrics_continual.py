from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning

from medcl.errors import DataError
from medcl.metrics.continual import (
    average_accuracy,
    average_incremental_accuracy,
    bwt,
    check_accuracy_matrix,
    final_accuracy,
    forgetting,
    forgetting_per_experience,
    fwt,
    matrix_to_frame,
    summarize,
)

# R[i, j]: accuracy on experience j after training experience i.
R = np.array(
    [
        [0.90, 0.10, 0.20],
        [0.95, 0.80, 0.30],
        [0.60, 0.60, 0.85],
    ]
)
B = np.array([0.10, 0.15, 0.20])

# Hand-computed:
ACC = (0.60 + 0.60 + 0.85) / 3  # 0.683333: last row mean
AIA = (0.90 + (0.95 + 0.80) / 2 + (0.60 + 0.60 + 0.85) / 3) / 3  # 0.819444
FORGET = [0.95 - 0.60, 0.80 - 0.60]  # max over rows 0..1 of each column minus the last row
BWT = ((0.60 - 0.90) + (0.60 - 0.80)) / 2  # -0.25
FWT = ((0.10 - 0.15) + (0.30 - 0.20)) / 2  # 0.025


def test_hand_computed_3x3() -> None:
    assert average_accuracy(R) == pytest.approx(0.683333, abs=1e-6)
    assert average_accuracy(R) == pytest.approx(ACC)
    assert final_accuracy(R) == pytest.approx(ACC)
    assert average_incremental_accuracy(R) == pytest.approx(0.819444, abs=1e-6)
    assert average_incremental_accuracy(R) == pytest.approx(AIA)
    np.testing.assert_allclose(forgetting_per_experience(R), [0.35, 0.20])
    np.testing.assert_allclose(forgetting_per_experience(R), FORGET)
    assert forgetting(R) == pytest.approx(0.275)
    assert bwt(R) == pytest.approx(-0.25)
    assert bwt(R) == pytest.approx(BWT)
    assert fwt(R, B) == pytest.approx(0.025)
    assert fwt(R, B) == pytest.approx(FWT)


def test_final_accuracy_weighted_by_test_size() -> None:
    # (0.6 * 100 + 0.6 * 200 + 0.85 * 100) / 400
    assert final_accuracy(R, weights=[100, 200, 100]) == pytest.approx(0.6625)
    with pytest.raises(DataError, match="one test-set size per experience"):
        final_accuracy(R, weights=[1, 2])


def test_summarize_has_every_metric() -> None:
    out = summarize(R, B)
    assert out == pytest.approx(
        {
            "average_accuracy": ACC,
            "average_incremental_accuracy": AIA,
            "final_accuracy": ACC,
            "forgetting": 0.275,
            "bwt": -0.25,
            "fwt": 0.025,
            "num_experiences": 3.0,
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no baseline: fwt NaN without a warning
        assert np.isnan(summarize(R)["fwt"])


def test_single_experience_gives_nan_with_reason() -> None:
    with pytest.warns(UndefinedMetricWarning, match="T=1") as record:
        out = summarize([[0.7]], b=[0.1])
    assert len(record) == 3  # forgetting, bwt, fwt
    assert out["average_accuracy"] == pytest.approx(0.7)
    assert out["average_incremental_accuracy"] == pytest.approx(0.7)
    assert np.isnan(out["forgetting"]) and np.isnan(out["bwt"]) and np.isnan(out["fwt"])


def test_not_evaluated_upper_triangle() -> None:
    r = R.copy()
    r[np.triu_indices(3, k=1)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert average_accuracy(r) == pytest.approx(ACC)
        assert average_incremental_accuracy(r) == pytest.approx(AIA)
        assert forgetting(r) == pytest.approx(0.275)
        assert bwt(r) == pytest.approx(-0.25)
    with pytest.warns(UndefinedMetricWarning, match="fwt is undefined"):
        assert np.isnan(fwt(r, B))


def test_partially_missing_term_is_left_out_with_warning() -> None:
    r = R.copy()
    r[2, 1] = np.nan
    with pytest.warns(UndefinedMetricWarning, match=r"left out R\[2, 1\]"):
        assert average_accuracy(r) == pytest.approx((0.60 + 0.85) / 2)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([0.1, 0.2], "2-D"),
        (np.zeros((2, 3)), "square"),
        (np.zeros((0, 0)), "non-empty"),
        ([[0.5, np.inf], [0.1, 0.2]], r"finite accuracies or NaN; got inf at \[0, 1\]"),
        ([["a", "b"], ["c", "d"]], "numeric"),
    ],
)
def test_validation_errors(bad: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        check_accuracy_matrix(bad)
    with pytest.raises(ValueError, match=match):  # DataError is a ValueError
        summarize(bad)


def test_fwt_baseline_shape() -> None:
    with pytest.raises(DataError, match=r"shape \(3,\)"):
        fwt(R, [0.1, 0.2])


def test_matrix_to_frame_is_tidy() -> None:
    frame = matrix_to_frame(R, ["a", "b", "c"], setting="task-agnostic", seed=0)
    assert list(frame.columns) == [
        "after_experience",
        "eval_experience",
        "after_name",
        "eval_name",
        "metric",
        "value",
        "setting",
        "seed",
    ]
    assert len(frame) == 9
    row = frame[(frame.after_experience == 1) & (frame.eval_experience == 0)].iloc[0]
    assert (row.after_name, row.eval_name, row.metric, row.value) == ("b", "a", "accuracy", 0.95)
    assert (frame.setting == "task-agnostic").all()
    default = matrix_to_frame(R, metric="balanced_accuracy")
    assert default.after_name.iloc[-1] == "exp2" and (default.metric == "balanced_accuracy").all()


def test_matrix_to_frame_errors() -> None:
    with pytest.raises(DataError, match="one name per experience"):
        matrix_to_frame(R, ["a", "b"])
    with pytest.raises(DataError, match="collide"):
        matrix_to_frame(R, None, value=1)
