"""Clinical metric names, the table rows they produce, and checks of the caller's choices.

See :mod:`medcl.metrics.clinical` for what each metric name means and which ``class`` rows it
produces. The checks word their errors scikit-learn style (rule, value received, fix).
"""

from __future__ import annotations

__all__ = ["DEFAULT_METRICS", "METRICS", "MetricSpec", "why_undefined"]

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from medcl.errors import DataError, did_you_mean

#: Every built-in metric name.
METRICS = (
    "auroc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
    "accuracy",
    "ece",
)
#: The metrics computed when none are named (the discrimination set).
DEFAULT_METRICS = METRICS[:-1]

_PER_CLASS = ("auroc", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy")
_MACRO = ("auroc", "sensitivity", "specificity", "ppv", "npv", "f1")
_OVERALL = ("balanced_accuracy", "accuracy", "ece")
_WHY = {
    "auroc": "y_true has no {neg_or_pos} for this class (only one class present one-vs-rest)",
    "sensitivity": "no sample of this class in y_true (TP+FN = 0)",
    "specificity": "every sample belongs to this class (TN+FP = 0)",
    "ppv": "the class is never predicted (TP+FP = 0)",
    "npv": "the class is predicted for every sample (TN+FN = 0)",
    "f1": "the class is neither present nor predicted (2TP+FP+FN = 0)",
    "balanced_accuracy": "sensitivity or specificity is undefined",
}

MetricSpec = str | Callable[[NDArray[np.int64], NDArray[np.float64]], float]


def why_undefined(metric: str, class_name: str) -> str:
    """Why the ``(metric, class)`` row of a table can be NaN, in words (for notes and reports).

    Args:
        metric: a name from :data:`METRICS`.
        class_name: a class name, ``"macro"`` or ``"overall"``.
    """
    if class_name == "macro":
        return f"{metric} is undefined for every class on these rows"
    if class_name == "overall" or metric not in _WHY:
        return "no rows to score"
    return _WHY[metric].format(neg_or_pos="positives or negatives")


# ---------------------------------------------------------------------------------------------
# Validation


def _class_names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(n_classes)]
    names = [str(c) for c in class_names]
    if isinstance(class_names, str) or len(names) != n_classes:
        raise DataError(
            f"class_names must list one name per column of y_prob ({n_classes}); got "
            f"{class_names!r}."
        )
    reserved = {"macro", "overall"} & set(names)
    if reserved or len(set(names)) != n_classes:
        raise DataError(
            f"class_names must be unique and must not use the reserved names 'macro'/'overall'; "
            f"got {names}."
        )
    return names


def _predict(yp: NDArray[np.float64], threshold: float | None) -> NDArray[np.int64]:
    """Operating point: arg-max, or ``p_1 >= threshold`` for a binary problem."""
    if threshold is None:
        return yp.argmax(axis=1)
    if yp.shape[1] != 2:
        raise DataError(
            f"threshold applies to binary problems only; y_prob has {yp.shape[1]} classes. "
            "Omit threshold to predict the arg-max class."
        )
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"threshold must lie in [0, 1]; got {threshold!r}.")
    return (yp[:, 1] >= threshold).astype(np.int64)


def _check_metrics(metrics: Sequence[MetricSpec]) -> list[MetricSpec]:
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    out: list[MetricSpec] = []
    for m in metrics:
        if isinstance(m, str):
            if m not in METRICS:
                raise DataError(f"unknown metric {m!r}; {did_you_mean(m, METRICS)}.")
        elif not callable(m):
            raise DataError(
                f"metrics must be names from {list(METRICS)} or callables "
                f"fn(y_true, y_prob) -> float; got {m!r}."
            )
        out.append(m)
    labels = [m if isinstance(m, str) else getattr(m, "__name__", "custom") for m in out]
    if len(set(labels)) != len(labels):
        raise DataError(
            f"metrics must have unique names; got {labels}. Give each callable its own __name__."
        )
    return out


def _row_labels(metrics: Sequence[MetricSpec], names: list[str]) -> list[tuple[str, str]]:
    """(metric, class) rows in table order."""
    rows: list[tuple[str, str]] = []
    for m in metrics:
        if not isinstance(m, str):
            rows.append((getattr(m, "__name__", "custom"), "overall"))
            continue
        if m in _PER_CLASS:
            rows += [(m, c) for c in names]
        if m in _MACRO:
            rows.append((m, "macro"))
        if m in _OVERALL:
            rows.append((m, "overall"))
    return rows
