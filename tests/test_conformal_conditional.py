"""Training-conditional conformal thresholds (``calibration.confidence``): the order statistic,
its guarantee over calibration draws, the record, and the run's use of it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _tiny import tiny_raw

from medcl.config import RunConfig, validate_config
from medcl.engine.posthoc import read_posthoc
from medcl.engine.run import run
from medcl.errors import ConfigError
from medcl.metrics.conformal import ConformalSets, conformal_quantile, fit_conformal


def _binomial_tail(n: int, p: float, k: int) -> float:
    """``P(Binomial(n, p) >= k)`` summed term by term (independent of scipy)."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


def test_the_threshold_is_the_smallest_order_statistic_with_the_binomial_guarantee():
    scores = np.arange(1, 101) / 100  # the k-th smallest is k / 100
    k = round(100 * conformal_quantile(scores, 0.1, confidence=0.9))
    assert _binomial_tail(100, 0.9, k) <= 0.1 < _binomial_tail(100, 0.9, k - 1)
    assert k > round(100 * conformal_quantile(scores, 0.1))  # above the marginal ceil(0.9 * 101)
    assert k > round(100 * conformal_quantile(scores, 0.1, confidence=0.5))
    # (1 - alpha)^n <= 1 - c needs n >= 22 at alpha = c = 0.1: below it, no finite threshold
    assert conformal_quantile(np.ones(21), 0.1, confidence=0.9) == math.inf
    assert conformal_quantile(np.ones(22), 0.1, confidence=0.9) == 1.0
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"confidence must lie in \(0, 1\)"):
            conformal_quantile(scores, 0.1, confidence=bad)


def test_coverage_holds_per_calibration_with_the_stated_probability():
    """Uniform scores: a threshold ``q`` covers exactly ``q`` of new inputs, so each of 4000
    calibration draws of 60 rows gives its coverage. Marginal thresholds cover ``>= 0.9`` on
    average but fall below it in about 40 % of the draws (Beta(55, 6)); training-conditional
    ones at 0.9 in at most 10 % (4000 draws: Monte-Carlo sd 0.005)."""
    rng = np.random.default_rng(0)
    draws = rng.random((4000, 60))
    marginal = np.array([conformal_quantile(d, 0.1) for d in draws])
    conditional = np.array([conformal_quantile(d, 0.1, confidence=0.9) for d in draws])
    assert marginal.mean() >= 0.9 - 0.005 and np.mean(marginal < 0.9) > 0.3
    assert np.mean(conditional < 0.9) <= 0.1 + 0.015
    assert (conditional >= marginal).all()


def test_per_group_thresholds_and_the_record_keep_the_confidence():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), size=300)
    y = np.array([rng.choice(3, p=row) for row in p])
    sites = ["a"] * 150 + ["b"] * 150
    marginal = fit_conformal(y, p, alpha=0.1, mondrian="site_class", sites=sites)
    conditional = fit_conformal(y, p, alpha=0.1, mondrian="site_class", sites=sites, confidence=0.9)
    for site in ("a", "b"):
        assert (conditional.thresholds(site) >= marginal.thresholds(site)).all()
    assert conditional.sets(p, sites).sum() >= marginal.sets(p, sites).sum()
    record = json.loads(json.dumps(conditional.to_dict()))
    assert record["confidence"] == 0.9 and "training-conditional at 0.9" in record["method"]
    again = ConformalSets.from_dict(record)
    np.testing.assert_array_equal(again.sets(p, sites), conditional.sets(p, sites))
    old = {k: v for k, v in marginal.to_dict().items() if k != "confidence"}  # older records
    assert ConformalSets.from_dict(old).confidence is None


def test_a_run_calibrates_with_the_configured_confidence(tmp_path):
    raw = tiny_raw(output_dir=str(tmp_path), calibration={"alpha": 0.2, "confidence": 0.8})
    run_dir = run(RunConfig.model_validate(raw), quiet=True)
    record = read_posthoc(run_dir, 1)
    assert record.conformal is not None and record.conformal.confidence == 0.8
    assert record.record["conformal"]["confidence"] == 0.8
    with pytest.raises(ConfigError, match=r"calibration\.confidence"):
        validate_config(tiny_raw(output_dir=str(tmp_path), calibration={"confidence": 1.5}))
