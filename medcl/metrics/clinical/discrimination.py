"""Point estimates of the clinical metrics: discrimination from confusion matrices.

The vectorised core turns ``(B, C, C)`` confusion matrices and ``(B, C)`` AUROCs into every
metric at once (``B = 1`` for a point estimate, one per resample in
:mod:`medcl.metrics.clinical.bootstrap`); :func:`compute_discrimination` and :func:`confusion`
are the public entry points.
"""

from __future__ import annotations

__all__ = ["compute_discrimination", "confusion"]

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import confusion_matrix, roc_auc_score

from medcl.errors import DataError
from medcl.metrics.calibration import _as_numpy, check_predictions, expected_calibration_error
from medcl.metrics.clinical.spec import (
    _WHY,
    DEFAULT_METRICS,
    MetricSpec,
    _class_names,
    _predict,
    _row_labels,
)

# ---------------------------------------------------------------------------------------------
# Vectorised core: metrics from (B, C, C) confusion matrices and (B, C) AUROCs


def _div(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(x: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are NaN on purpose
        return np.nanmean(x, axis=axis)


def _from_counts(cm: NDArray[np.float64], auc: NDArray[np.float64]) -> dict[str, np.ndarray]:
    """Per-class ``(B, C)`` and overall ``(B,)`` metrics from ``cm[b, true, pred]``."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)  # (B, C)
    fn = cm.sum(axis=2) - tp
    fp = cm.sum(axis=1) - tp
    total = cm.sum(axis=(1, 2))[:, None]  # (B, 1)
    tn = total - tp - fn - fp
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    return {
        "auroc": auc,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,
        "overall/balanced_accuracy": _nanmean(sens, axis=1),
        "overall/accuracy": _div(tp.sum(axis=1), total[:, 0]),
    }


def _assemble(per: dict[str, np.ndarray], rows: list[tuple[str, str]], names: list[str], extra):
    """Stack the ``(B,)`` column of every row; ``extra[(metric, "overall")]`` fills the rest."""
    cols = []
    for metric, cls in rows:
        if (metric, cls) in extra:
            cols.append(extra[(metric, cls)])
        elif cls == "macro":
            cols.append(_nanmean(per[metric], axis=1))
        elif cls == "overall":
            cols.append(per[f"overall/{metric}"])
        else:
            cols.append(per[metric][:, names.index(cls)])
    return np.stack(cols, axis=1)  # (B, R)


# ---------------------------------------------------------------------------------------------
# Point estimates


def _point(
    yt: NDArray[np.int64],
    yp: NDArray[np.float64],
    metrics: Sequence[MetricSpec],
    names: list[str],
    threshold: float | None,
    n_bins: int,
) -> pd.DataFrame:
    n_classes = yp.shape[1]
    pred = _predict(yp, threshold)
    cm = confusion_matrix(yt, pred, labels=np.arange(n_classes))[None].astype(np.float64)
    auc = np.full((1, n_classes), np.nan)
    if "auroc" in metrics:
        for c in range(n_classes):
            positive = yt == c
            if 0 < positive.sum() < yt.size:
                auc[0, c] = roc_auc_score(positive, yp[:, c])
    extra = {}
    for m in metrics:
        if callable(m):
            extra[(getattr(m, "__name__", "custom"), "overall")] = np.array([float(m(yt, yp))])
        elif m == "ece":
            extra[("ece", "overall")] = np.array(
                [expected_calibration_error(yt, yp, n_bins=n_bins)[0]]
            )
    rows = _row_labels(metrics, names)
    values = _assemble(_from_counts(cm, auc), rows, names, extra)[0]
    table = pd.DataFrame(rows, columns=["metric", "class"])
    table["value"] = values
    table["why"] = pd.Series(np.nan, index=table.index, dtype=object)
    auroc_rows = table["metric"].eq("auroc") & table["value"].isna()
    if auroc_rows.any():  # say which side is missing
        for i in np.flatnonzero(auroc_rows.to_numpy()):
            cls = table.at[i, "class"]
            if cls != "macro":
                side = "positives" if (yt == names.index(cls)).sum() == 0 else "negatives"
                table.at[i, "why"] = _WHY["auroc"].format(neg_or_pos=side)
    return table


def compute_discrimination(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    *,
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
) -> pd.DataFrame:
    """Discrimination metrics at the operating point, per class and overall.

    AUROC is :func:`sklearn.metrics.roc_auc_score` one-vs-rest on each class's probability (for a
    binary problem the positive class uses ``p_1`` and the negative class ``1 - p_1``, giving the
    same value); the other metrics come from :func:`sklearn.metrics.confusion_matrix` at the
    arg-max prediction (or ``p_1 >= threshold``). See :mod:`medcl.metrics.clinical` for the rows.

    Args:
        y_true: ``(N,)`` integer class ids in ``[0, C)``.
        y_prob: ``(N, C)`` class probabilities, or ``(N,)`` positive-class probabilities.
        class_names: ``C`` names for the ``class`` column (default ``"0"``, ``"1"``, ...).
        threshold: binary only: predict class 1 when ``p_1 >= threshold``.

    Returns:
        Tidy frame with columns ``metric, class, value``.

    Warns:
        UndefinedMetricWarning: listing every metric that is NaN and why.
    """
    yt, yp = check_predictions(y_true, y_prob)
    names = _class_names(class_names, yp.shape[1])
    table = _point(yt, yp, list(DEFAULT_METRICS), names, threshold, n_bins=15)
    _warn_with_reasons(table)
    return table[["metric", "class", "value"]]


def _warn_with_reasons(table: pd.DataFrame, context: str = "") -> None:
    bad = table[table["value"].isna() & (table["class"] != "macro")]
    if bad.empty:
        return
    why = bad["why"] if "why" in bad else pd.Series(np.nan, index=bad.index)
    parts = [
        f"{m}[{c}]: {w if isinstance(w, str) else _WHY.get(m, 'undefined on this sample')}"
        for m, c, w in zip(bad["metric"], bad["class"], why, strict=True)
    ]
    warnings.warn(
        f"{context}undefined metric(s) set to NaN: " + "; ".join(parts) + ".",
        UndefinedMetricWarning,
        stacklevel=3,
    )


def confusion(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    n_classes: int,
    *,
    normalize: Literal["true", "pred", "all"] | None = None,
) -> NDArray[np.float64]:
    """Confusion matrix ``M[true, pred]`` over all ``n_classes`` (sklearn).

    Args:
        y_true: ``(N,)`` class ids.
        y_pred: ``(N,)`` predicted class ids.
        n_classes: number of classes; absent classes still get a row and a column.
        normalize: ``"true"`` (rows sum to 1), ``"pred"`` (columns), ``"all"`` or ``None``
            (counts). A row/column with no samples is NaN (with a warning), not 0.

    Returns:
        ``(n_classes, n_classes)`` array.
    """
    yt, _ = check_predictions(y_true, np.zeros((len(_as_numpy(y_true)), max(n_classes, 2))))
    ypred, _ = check_predictions(y_pred, np.zeros((len(yt), max(n_classes, 2))), name="y_pred")
    if normalize not in (None, "true", "pred", "all"):
        raise DataError(f"normalize must be None, 'true', 'pred' or 'all'; got {normalize!r}.")
    labels = np.arange(n_classes)
    counts = confusion_matrix(yt, ypred, labels=labels)
    if normalize is None:
        return counts
    out = confusion_matrix(yt, ypred, labels=labels, normalize=normalize).astype(np.float64)
    axis = {"true": 1, "pred": 0, "all": None}[normalize]
    if axis is not None:
        empty = counts.sum(axis=axis) == 0
        if empty.any():
            warnings.warn(
                f"confusion normalize={normalize!r}: class(es) {labels[empty].tolist()} have no "
                f"{'true' if axis == 1 else 'predicted'} samples; their "
                f"{'rows' if axis == 1 else 'columns'} are NaN.",
                UndefinedMetricWarning,
                stacklevel=2,
            )
            if axis == 1:
                out[empty, :] = np.nan
            else:
                out[:, empty] = np.nan
    return out
