from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medcl.errors import DataError
from medcl.metrics.calibration import (
    expected_calibration_error,
    plot_reliability,
    reliability_table,
)
from medcl.metrics.clinical import (
    ClinicalMetrics,
    _AurocPlan,
    _draw,
    _replicates,
    _strata,
    bootstrap_ci,
    compute_discrimination,
    confusion,
    per_group_metrics,
    site_heterogeneity,
)


def multiclass(n: int = 300, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def values(table: pd.DataFrame, metric: str) -> pd.Series:
    sel = table[table.metric == metric]
    return pd.Series(sel.value.to_numpy(), index=sel["class"].to_numpy())


def test_discrimination_matches_sklearn() -> None:
    y, p = multiclass()
    pred = p.argmax(1)
    table = compute_discrimination(y, p)
    assert list(table.columns) == ["metric", "class", "value"]
    classes = ["0", "1", "2", "3"]
    for metric, fn in [
        ("sensitivity", recall_score),
        ("ppv", precision_score),
        ("f1", f1_score),
    ]:
        v = values(table, metric)
        np.testing.assert_allclose(v[classes], fn(y, pred, average=None))
        assert v["macro"] == pytest.approx(fn(y, pred, average="macro"))
    auroc = values(table, "auroc")
    np.testing.assert_allclose(auroc[classes], [roc_auc_score(y == c, p[:, c]) for c in range(4)])
    assert auroc["macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    ba = values(table, "balanced_accuracy")
    assert ba["overall"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert values(table, "accuracy")["overall"] == pytest.approx(accuracy_score(y, pred))
    # one-vs-rest specificity / NPV from sklearn's confusion matrix
    cm = confusion_matrix(y, pred)
    tp = np.diag(cm)
    fn_, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = cm.sum() - tp - fn_ - fp
    np.testing.assert_allclose(values(table, "specificity")[classes], tn / (tn + fp))
    np.testing.assert_allclose(values(table, "npv")[classes], tn / (tn + fn_))
    np.testing.assert_allclose(ba[classes], (tp / (tp + fn_) + tn / (tn + fp)) / 2)


def test_binary_by_hand_with_threshold() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.6, 0.65, 0.4, 0.2])
    # threshold 0.5 -> TP=4, FN=2, TN=3, FP=1
    table = compute_discrimination(y, p1, class_names=["normal", "pneumonia"], threshold=0.5)
    pos = table[table["class"] == "pneumonia"].set_index("metric").value
    assert pos["sensitivity"] == pytest.approx(4 / 6)
    assert pos["specificity"] == pytest.approx(3 / 4)
    assert pos["ppv"] == pytest.approx(4 / 5)
    assert pos["npv"] == pytest.approx(3 / 5)
    assert pos["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert pos["auroc"] == pytest.approx(roc_auc_score(y, p1))
    overall_ba = values(table, "balanced_accuracy")["overall"]
    assert pos["balanced_accuracy"] == pytest.approx(overall_ba)
    assert overall_ba == pytest.approx(balanced_accuracy_score(y, p1 >= 0.5))
    # a stricter threshold moves the operating point
    strict = compute_discrimination(y, p1, threshold=0.75)
    assert values(strict, "sensitivity")["1"] == pytest.approx(2 / 6)
    with pytest.raises(DataError, match="binary problems only"):
        compute_discrimination(*multiclass(), threshold=0.5)


def test_single_class_warns_and_returns_nan() -> None:
    y = np.zeros(6, dtype=int)
    p = np.tile([0.6, 0.3, 0.1], (6, 1))
    p[0] = [0.2, 0.7, 0.1]
    with pytest.warns(UndefinedMetricWarning, match=r"auroc\[0\]: y_true has no negatives"):
        table = compute_discrimination(y, p)
    auroc = values(table, "auroc")
    assert auroc.isna().all()  # every class: only one class present one-vs-rest
    sens = values(table, "sensitivity")
    assert sens["0"] == pytest.approx(5 / 6) and np.isnan(sens["1"]) and np.isnan(sens["2"])
    assert np.isnan(values(table, "ppv")["2"])  # never predicted: NaN, not 0
    assert values(table, "sensitivity")["macro"] == pytest.approx(5 / 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        ci = bootstrap_ci(y, p, ["auroc", "sensitivity"], n_resamples=50)
    assert ci[ci.metric == "auroc"].ci_low.isna().all()


def test_input_validation() -> None:
    y, p = multiclass(20)
    with pytest.raises(DataError, match="one-hot"):
        compute_discrimination(np.eye(4)[y], p)
    with pytest.raises(DataError, match="20 labels"):
        compute_discrimination(y, p[:10])
    with pytest.raises(DataError, match=r"class ids in \[0, 4\)"):
        compute_discrimination(y + 4, p)
    with pytest.raises(DataError, match="did you mean 'auroc'"):
        bootstrap_ci(y, p, ["auroc_macro"])
    with pytest.raises(DataError, match="one name per column"):
        compute_discrimination(y, p, class_names=["a", "b"])


def test_confusion_matches_sklearn_and_nan_rows() -> None:
    y, p = multiclass()
    pred = p.argmax(1)
    np.testing.assert_array_equal(confusion(y, pred, 4), confusion_matrix(y, pred))
    np.testing.assert_allclose(
        confusion(y, pred, 4, normalize="true"), confusion_matrix(y, pred, normalize="true")
    )
    with pytest.warns(UndefinedMetricWarning, match=r"class\(es\) \[2\]"):
        m = confusion([0, 1, 1], [0, 1, 0], 3, normalize="true")
    assert np.isnan(m[2]).all() and m[1].tolist() == [0.5, 0.5, 0.0]


def test_vectorised_auroc_equals_sklearn_with_ties() -> None:
    y, p = multiclass(500)
    scores = np.round(p[:, 2], 2)  # many ties
    plan = _AurocPlan(y == 2, scores)
    full = plan(np.ones((1, y.size), dtype=np.int64))[0]
    assert full == pytest.approx(roc_auc_score(y == 2, scores), abs=1e-12)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, y.size, size=(5, y.size))
    counts = np.stack([np.bincount(i, minlength=y.size) for i in idx])
    expected = [roc_auc_score(y[i] == 2, scores[i]) for i in idx]
    np.testing.assert_allclose(plan(counts), expected, atol=1e-12)


def test_replicates_equal_metrics_on_the_same_resample() -> None:
    y, p = multiclass(200, c=3)
    metrics = ["auroc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "ece"]
    names = ["0", "1", "2"]
    reps = _replicates(
        y, p, metrics, names, threshold=None, n_resamples=4, stratified=True, seed=7, n_bins=10
    )
    idx = _draw(np.random.default_rng(7), _strata(y, True), y.size, 4)
    for b in range(4):
        point = compute_discrimination(y[idx[b]], p[idx[b]]).set_index(["metric", "class"]).value
        ece = expected_calibration_error(y[idx[b]], p[idx[b]], n_bins=10)[0]
        table = bootstrap_ci(y, p, metrics, n_resamples=2).set_index(["metric", "class"])
        expected = [ece if k[0] == "ece" else point[k] for k in table.index]
        np.testing.assert_allclose(reps[b], expected, atol=1e-12)


def test_bootstrap_table_and_determinism() -> None:
    y, p = multiclass(400)
    a = bootstrap_ci(y, p, n_resamples=200, seed=3)
    b = bootstrap_ci(y, p, n_resamples=200, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["metric", "class", "value", "ci_low", "ci_high", "se"]
    assert ((a.ci_low <= a.value + 1e-9) & (a.value <= a.ci_high + 1e-9)).all()
    point = compute_discrimination(y, p)
    np.testing.assert_allclose(a.value, point.value)

    def top2(y_true: np.ndarray, y_prob: np.ndarray) -> float:
        return float(np.mean((np.argsort(y_prob, 1)[:, -2:] == y_true[:, None]).any(1)))

    c = bootstrap_ci(y, p, ["auroc", top2], n_resamples=50, stratified=False)
    row = c[c.metric == "top2"].iloc[0]
    assert row["class"] == "overall" and row.ci_low <= row.value <= row.ci_high


def test_bootstrap_coverage_of_known_auroc() -> None:
    """Negatives ~ N(0, 1), positives ~ N(d, 1): AUROC = Phi(d / sqrt(2))."""
    d, n_neg, n_pos, reps = 1.0, 40, 40, 200
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(2024)
    y = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    covered = 0
    for r in range(reps):
        s = np.r_[rng.normal(0, 1, n_neg), rng.normal(d, 1, n_pos)]
        prob = 1 / (1 + np.exp(-s))  # monotone: same AUROC as the scores
        ci = bootstrap_ci(y, prob, ["auroc"], n_resamples=200, seed=r)
        row = ci[(ci.metric == "auroc") & (ci["class"] == "1")].iloc[0]
        covered += row.ci_low <= truth <= row.ci_high
    assert 0.88 <= covered / reps <= 0.99


def test_ece_hand_computed() -> None:
    y = np.array([1, 0, 1, 1, 0])
    p1 = np.array([0.9, 0.9, 0.7, 0.3, 0.55])
    # top-label confidence 0.9, 0.9, 0.7, 0.7, 0.55; correct 1, 0, 1, 0, 0
    # bins of width 0.2: (0.8, 1] conf .9 acc .5 n=2; (0.6, 0.8] conf .7 acc .5 n=2;
    # (0.4, 0.6] conf .55 acc 0 n=1
    ece, mce = expected_calibration_error(y, p1, n_bins=5)
    assert ece == pytest.approx((2 * 0.4 + 2 * 0.2 + 1 * 0.55) / 5)
    assert mce == pytest.approx(0.55)
    table = reliability_table(y, p1, n_bins=5)
    assert list(table.columns) == ["bin", "bin_low", "bin_high", "confidence", "accuracy", "count"]
    assert table["count"].tolist() == [0, 0, 1, 2, 2]
    assert np.isnan(table.accuracy[0])
    assert table.accuracy[4] == pytest.approx(0.5)
    # a confidence on a bin edge goes to the lower bin: 0.6 -> (0.4, 0.6]
    assert reliability_table([0], [[0.6, 0.4]], n_bins=5)["count"].tolist() == [0, 0, 1, 0, 0]
    with pytest.raises(DataError, match=r"probabilities in \[0, 1\]"):
        expected_calibration_error(y, p1 * 3)
    fig = plot_reliability(y, p1, n_bins=5, title="val")
    fig.savefig(io.BytesIO(), format="png")


def test_per_group_table_and_heterogeneity() -> None:
    y, p = multiclass(600, c=3)
    sites = np.array(["site-a", "site-b", "site-c"])[np.arange(600) % 3]
    table = per_group_metrics(y, p, sites, ["auroc", "accuracy"], n_resamples=100)
    assert list(table.columns) == [
        "group",
        "n",
        "metric",
        "class",
        "value",
        "ci_low",
        "ci_high",
        "se",
    ]
    assert set(table.group) == {"site-a", "site-b", "site-c", "overall"}
    a = table[(table.group == "site-a") & (table.metric == "accuracy")].iloc[0]
    mask = sites == "site-a"
    assert a.n == 200
    assert a.value == pytest.approx(accuracy_score(y[mask], p[mask].argmax(1)))
    # a site's CI does not depend on which other sites are in the table
    alone = per_group_metrics(y[mask], p[mask], sites[mask], ["auroc", "accuracy"], n_resamples=100)
    pd.testing.assert_frame_equal(
        table[table.group == "site-a"].reset_index(drop=True),
        alone[alone.group == "site-a"].reset_index(drop=True),
    )
    het = site_heterogeneity(table, metric="auroc", class_name="macro")
    assert het["n_groups"] == 3 and het["df"] == 2
    assert 0 <= het["i2"] <= 1 and 0 <= het["p_value"] <= 1


def test_heterogeneity_by_hand() -> None:
    table = pd.DataFrame(
        {
            "group": ["a", "b", "overall"],
            "metric": "auroc",
            "class": "macro",
            "value": [0.8, 0.9, 0.85],
            "se": [0.05, 0.05, 0.01],
        }
    )
    het = site_heterogeneity(table)
    # w = 400 each; pooled 0.85; Q = 400 * 0.05^2 * 2 = 2; I^2 = (2 - 1) / 2
    assert het["pooled"] == pytest.approx(0.85)
    assert het["q"] == pytest.approx(2.0)
    assert het["i2"] == pytest.approx(0.5)
    assert het["p_value"] == pytest.approx(0.157299, abs=1e-6)
    assert het["tau2"] == pytest.approx(1 / (800 - 400))
    assert het["range"] == pytest.approx(0.1)
    with pytest.warns(UndefinedMetricWarning, match="need at least 2"):
        assert np.isnan(site_heterogeneity(table.iloc[[0, 2]])["q"])


def test_heterogeneity_leaves_out_a_constant_group_with_a_reason() -> None:
    # site c predicts one class for every sample: under stratified resampling its accuracy is
    # the same in every resample, so its bootstrap se is rounding noise (~1e-16). That used to
    # give an infinite weight and a `RuntimeWarning: divide by zero` from tau^2.
    rng = np.random.default_rng(0)
    n = 300
    y, p = rng.integers(0, 5, n), rng.dirichlet(np.ones(5), n)
    sites = np.array(["a", "b", "c"])[np.arange(n) % 3]
    p[sites == "c"] = [0.9, 0.025, 0.025, 0.025, 0.025]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        table = per_group_metrics(y, p, sites, ["accuracy"], n_resamples=200)
    row = table[(table.group == "c") & (table["class"] == "overall")]
    assert 0 <= float(row.se.iloc[0]) < 1e-12  # the degenerate case this test is about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        het = site_heterogeneity(table, metric="accuracy", class_name="overall")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    notes = [str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(notes) == 1 and "['c'] left out" in notes[0] and "se = 0" in notes[0]
    assert het["n_groups"] == 2 and all(np.isfinite(v) for v in het.values())
    without_c = site_heterogeneity(
        table[table.group != "c"], metric="accuracy", class_name="overall"
    )
    assert het == pytest.approx(without_c)


def test_accumulator_matches_functional_api() -> None:
    torch = pytest.importorskip("torch")
    y, p = multiclass(120, c=3)
    acc = ClinicalMetrics(["auroc", "f1"], n_resamples=50, seed=1)
    acc.update(torch.from_numpy(p[:60]), torch.from_numpy(y[:60]), group="site-a")
    acc.update(p[60:], y[60:], group=np.array(["site-b"] * 60))
    got = acc.compute()
    groups = np.array(["site-a"] * 60 + ["site-b"] * 60)
    expected = per_group_metrics(y, p, groups, ["auroc", "f1"], n_resamples=50, seed=1)
    pd.testing.assert_frame_equal(got, expected)
    with pytest.raises(DataError, match="every batch or for none"):
        acc.update(p[:5], y[:5])
    acc.reset()
    with pytest.raises(DataError, match="before any update"):
        acc.compute()
    acc.update(p, y)
    assert set(acc.compute().group) == {"overall"}
