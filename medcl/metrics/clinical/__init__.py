"""Clinical evaluation metrics: discrimination with bootstrap CIs, per-site tables, heterogeneity.

Pure functions on ``(y_true (N,), y_prob (N, C))`` plus a small accumulator,
:class:`ClinicalMetrics`, for evaluation loops. Every table is tidy: one row per
(``group``,) ``metric`` x ``class`` with ``value, ci_low, ci_high``.

Metric names and the ``class`` rows they produce (``C`` classes, one-vs-rest at the operating
point: the arg-max class, or ``p_1 >= threshold`` for a binary problem):

- per class (``class`` = the class name) and ``"macro"`` (unweighted mean over the classes where
  the metric is defined): ``auroc``, ``sensitivity`` (recall, TP/(TP+FN)), ``specificity``
  (TN/(TN+FP)), ``ppv`` (precision, TP/(TP+FP)), ``npv`` (TN/(TN+FN)), ``f1`` (2TP/(2TP+FP+FN));
- ``balanced_accuracy``: per class ``(sensitivity + specificity) / 2``, and ``"overall"`` as in
  :func:`sklearn.metrics.balanced_accuracy_score` (mean recall over the classes present);
  for a binary problem the positive class's value equals the overall one;
- ``"overall"`` only: ``accuracy``, and ``ece`` (top-label expected calibration error, on request).

A metric with a zero denominator, or an AUROC for a class that is absent (or alone) in
``y_true``, is NaN with an :class:`~sklearn.exceptions.UndefinedMetricWarning` that says which and
why: never a crash, never a silent 0.

The package is split by what each module holds:

- :mod:`~medcl.metrics.clinical.spec`: metric names, the rows they produce, argument checks;
- :mod:`~medcl.metrics.clinical.discrimination`: point estimates from confusion matrices;
- :mod:`~medcl.metrics.clinical.bootstrap`: vectorised bootstrap confidence intervals;
- :mod:`~medcl.metrics.clinical.groups`: per-site tables and heterogeneity across sites;
- :mod:`~medcl.metrics.clinical.accumulator`: :class:`ClinicalMetrics` for evaluation loops.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "BootstrapOptions",
    "ClinicalMetrics",
    "bootstrap_ci",
    "compute_discrimination",
    "confusion",
    "per_group_metrics",
    "site_heterogeneity",
]

from medcl.metrics.clinical.accumulator import ClinicalMetrics
from medcl.metrics.clinical.bootstrap import BootstrapOptions, bootstrap_ci
from medcl.metrics.clinical.discrimination import compute_discrimination, confusion
from medcl.metrics.clinical.groups import per_group_metrics, site_heterogeneity
from medcl.metrics.clinical.spec import DEFAULT_METRICS, METRICS
from medcl.metrics.clinical.spec import MetricSpec as MetricSpec

# isort: split
# Private names kept importable from their old module path (tests, benchmarks/report.py).
from medcl.metrics.clinical.bootstrap import _REPLICATE_CACHE as _REPLICATE_CACHE
from medcl.metrics.clinical.bootstrap import _AurocPlan as _AurocPlan
from medcl.metrics.clinical.bootstrap import _draw as _draw
from medcl.metrics.clinical.bootstrap import _replicates as _replicates
from medcl.metrics.clinical.bootstrap import _strata as _strata
from medcl.metrics.clinical.discrimination import _point as _point
