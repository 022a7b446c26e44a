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
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "ClinicalMetrics",
    "bootstrap_ci",
    "compute_discrimination",
    "confusion",
    "per_group_metrics",
    "site_heterogeneity",
]

import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import confusion_matrix, roc_auc_score

from medcl.errors import DataError, did_you_mean
from medcl.metrics.calibration import (
    _as_numpy,
    check_predictions,
    confidence_bins,
    expected_calibration_error,
    top_label,
)

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
#: Elements (resamples x samples) processed at once by the bootstrap; bounds peak memory.
_CHUNK_ELEMENTS = 2_000_000

MetricSpec = str | Callable[[NDArray[np.int64], NDArray[np.float64]], float]


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


class _AurocPlan:
    """Sorted negatives and tie ranges of one class, reused by every bootstrap chunk."""

    def __init__(self, positive: NDArray[np.bool_], scores: NDArray[np.float64]) -> None:
        self.pos = np.flatnonzero(positive)
        neg = np.flatnonzero(~positive)
        self.neg = neg[np.argsort(scores[neg], kind="stable")]
        sorted_neg = scores[self.neg]
        self.lo = np.searchsorted(sorted_neg, scores[self.pos], side="left")
        self.hi = np.searchsorted(sorted_neg, scores[self.pos], side="right")

    def __call__(self, counts: NDArray[np.int64]) -> NDArray[np.float64]:
        """Mann-Whitney AUROC of each resample given sample multiplicities ``(B, N)``.

        ``AUROC_b = sum_i w_bi (#neg below s_i + #neg tied / 2) / (W_pos W_neg)`` over
        positives ``i``, with negatives counted with their multiplicity ``w_b``.
        """
        b = counts.shape[0]
        if self.pos.size == 0 or self.neg.size == 0:
            return np.full(b, np.nan)
        cum = np.zeros((b, self.neg.size + 1), dtype=np.int32)  # counts <= N < 2**31
        np.cumsum(counts[:, self.neg], axis=1, out=cum[:, 1:])  # (B, N_neg + 1)
        w_pos = counts[:, self.pos]  # (B, N_pos)
        # accumulate in float64: an int32 sum of w * rank would overflow past ~2e9
        num = 0.5 * np.einsum(
            "bi,bi->b", w_pos, cum[:, self.lo] + cum[:, self.hi], dtype=np.float64
        )
        return _div(num, w_pos.sum(axis=1).astype(np.float64) * cum[:, -1])


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
    arg-max prediction (or ``p_1 >= threshold``). See the module docstring for the rows.

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


# ---------------------------------------------------------------------------------------------
# Bootstrap


def _strata(yt: NDArray[np.int64], stratified: bool) -> list[NDArray[np.int64]]:
    if not stratified:
        return [np.arange(yt.size)]
    return [np.flatnonzero(yt == c) for c in np.unique(yt)]


def _draw(rng: np.random.Generator, strata: list[np.ndarray], n: int, b: int) -> np.ndarray:
    """``(b, n)`` resample indices, each stratum resampled with replacement within itself."""
    idx = np.empty((b, n), dtype=np.int64)
    start = 0
    for members in strata:
        k = members.size
        idx[:, start : start + k] = members[rng.integers(0, k, size=(b, k))]
        start += k
    return idx


def _seed_key(seed: int | np.random.SeedSequence) -> tuple | None:
    if isinstance(seed, np.random.SeedSequence):
        entropy = seed.entropy if isinstance(seed.entropy, int) else tuple(seed.entropy)
        return ("ss", entropy, tuple(seed.spawn_key), seed.pool_size)
    return ("int", int(seed)) if isinstance(seed, int | np.integer) else None


#: (inputs digest, options) -> read-only replicates. A report bootstraps the same rows with
#: the same seed more than once (the model's table, then the paired comparison); the result is
#: a pure function of its inputs, so it is computed once.
_REPLICATE_CACHE: dict[tuple, NDArray[np.float64]] = {}
_CACHE_SIZE = 32


def _replicates(
    yt: NDArray[np.int64],
    yp: NDArray[np.float64],
    metrics: Sequence[MetricSpec],
    names: list[str],
    *,
    threshold: float | None,
    n_resamples: int,
    stratified: bool,
    seed: int | np.random.SeedSequence,
    n_bins: int,
) -> NDArray[np.float64]:
    """``(n_resamples, R)`` bootstrap replicates of every row of :func:`_row_labels` (cached)."""
    import hashlib

    seed_key = _seed_key(seed)
    if seed_key is None or any(callable(m) for m in metrics):
        return _compute_replicates(
            yt,
            yp,
            metrics,
            names,
            threshold=threshold,
            n_resamples=n_resamples,
            stratified=stratified,
            seed=seed,
            n_bins=n_bins,
        )
    digest = hashlib.blake2b(np.ascontiguousarray(yt).tobytes(), digest_size=16)
    digest.update(np.ascontiguousarray(yp).tobytes())
    digest.update(str(yp.shape).encode())
    key = (
        digest.hexdigest(),
        tuple(metrics),
        tuple(names),
        threshold,
        n_resamples,
        stratified,
        seed_key,
        n_bins,
    )
    if key not in _REPLICATE_CACHE:
        out = _compute_replicates(
            yt,
            yp,
            metrics,
            names,
            threshold=threshold,
            n_resamples=n_resamples,
            stratified=stratified,
            seed=seed,
            n_bins=n_bins,
        )
        out.flags.writeable = False
        if len(_REPLICATE_CACHE) >= _CACHE_SIZE:
            _REPLICATE_CACHE.pop(next(iter(_REPLICATE_CACHE)))
        _REPLICATE_CACHE[key] = out
    return _REPLICATE_CACHE[key]


def _compute_replicates(
    yt: NDArray[np.int64],
    yp: NDArray[np.float64],
    metrics: Sequence[MetricSpec],
    names: list[str],
    *,
    threshold: float | None,
    n_resamples: int,
    stratified: bool,
    seed: int | np.random.SeedSequence,
    n_bins: int,
) -> NDArray[np.float64]:
    """``(n_resamples, R)`` bootstrap replicates of every row of :func:`_row_labels`."""
    n, n_classes = yp.shape
    rng = np.random.default_rng(seed)
    rows = _row_labels(metrics, names)
    pred = _predict(yp, threshold)
    codes = yt * n_classes + pred  # (N,) cell of the confusion matrix
    plans = [_AurocPlan(yt == c, yp[:, c]) for c in range(n_classes)] if "auroc" in metrics else []
    if "ece" in metrics:
        confidence, correct = top_label(yt, yp)
        gap_by_bin = np.zeros((n, n_bins))  # (N, n_bins): correct - confidence in its bin
        gap_by_bin[np.arange(n), confidence_bins(confidence, n_bins)] = correct - confidence
    strata = _strata(yt, stratified)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty((n_resamples, len(rows)))
    for lo in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - lo)
        idx = _draw(rng, strata, n, b)  # (b, N)
        offsets = np.arange(b)[:, None]
        cm = np.bincount(
            (offsets * n_classes**2 + codes[idx]).ravel(), minlength=b * n_classes**2
        ).reshape(b, n_classes, n_classes)
        counts = np.bincount((offsets * n + idx).ravel(), minlength=b * n).reshape(b, n)
        counts = counts.astype(np.int32)  # halves the memory traffic of the AUROC cumsums
        auc = np.stack([plan(counts) for plan in plans], axis=1) if plans else None
        if auc is None:
            auc = np.full((b, n_classes), np.nan)
        extra = {}
        for m in metrics:
            if callable(m):
                extra[(getattr(m, "__name__", "custom"), "overall")] = np.array(
                    [float(m(yt[i], yp[i])) for i in idx]
                )
            elif m == "ece":
                per_bin = counts @ gap_by_bin  # (b, n_bins) sum of (correct - confidence)
                extra[("ece", "overall")] = np.abs(per_bin).sum(axis=1) / n
        out[lo : lo + b] = _assemble(_from_counts(cm, auc), rows, names, extra)
    return out


def bootstrap_ci(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
    *,
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    stratified: bool = True,
    seed: int | np.random.SeedSequence = 0,
    n_bins: int = 15,
) -> pd.DataFrame:
    """Point estimates with percentile bootstrap confidence intervals.

    All resample indices of a chunk are drawn at once; confusion matrices come from one
    ``bincount`` and AUROCs from a rank-based (Mann-Whitney) formula on sample multiplicities,
    so no metric is recomputed per resample in Python (callables excepted). 10k predictions x
    1000 resamples x 5 classes take about a second.

    Args:
        y_true: ``(N,)`` integer class ids.
        y_prob: ``(N, C)`` probabilities, or ``(N,)`` positive-class probabilities.
        metrics: names from :data:`METRICS` and/or callables ``fn(y_true (N,), y_prob (N, C))
            -> float`` (row ``class = "overall"``, ``metric = fn.__name__``; called per resample).
        class_names: ``C`` names for the ``class`` column.
        threshold: binary only: predict class 1 when ``p_1 >= threshold``.
        n_resamples: bootstrap resamples ``B``.
        alpha: 1 - confidence level (0.05 gives 95% intervals).
        stratified: resample within each class of ``y_true`` (keeps class counts fixed, so a
            class present in the sample is present in every resample).
        seed: seed of the resampling generator.
        n_bins: confidence bins for ``"ece"``.

    Returns:
        Tidy frame ``metric, class, value, ci_low, ci_high, se``: ``value`` on the full sample,
        the CI the ``alpha/2`` and ``1 - alpha/2`` percentiles of the replicates, ``se`` their
        standard deviation. Resamples where a metric is undefined are left out (with a warning).
    """
    yt, yp = check_predictions(y_true, y_prob)
    metrics = _check_metrics(metrics)
    names = _class_names(class_names, yp.shape[1])
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 2:
        raise DataError(f"n_resamples must be an integer >= 2; got {n_resamples!r}.")
    if not 0.0 < alpha < 1.0:
        raise DataError(f"alpha must lie in (0, 1), e.g. 0.05 for 95% intervals; got {alpha!r}.")
    table = _point(yt, yp, metrics, names, threshold, n_bins)
    _warn_with_reasons(table)
    reps = _replicates(
        yt,
        yp,
        metrics,
        names,
        threshold=threshold,
        n_resamples=n_resamples,
        stratified=stratified,
        seed=seed,
        n_bins=n_bins,
    )
    n_defined = np.isfinite(reps).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN on purpose
        lo, hi = np.nanpercentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
        se = np.nanstd(reps, axis=0, ddof=1)
    partial = (n_defined < n_resamples) & table["value"].notna().to_numpy()
    if partial.any():
        parts = [
            f"{m}[{c}] ({n_resamples - k}/{n_resamples})"
            for m, c, k in zip(
                table["metric"][partial], table["class"][partial], n_defined[partial], strict=True
            )
        ]
        warnings.warn(
            "bootstrap: metric undefined in some resamples, CI from the others: "
            + ", ".join(parts)
            + ".",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    table["ci_low"], table["ci_high"], table["se"] = lo, hi, se
    return table[["metric", "class", "value", "ci_low", "ci_high", "se"]]


# ---------------------------------------------------------------------------------------------
# Per-site tables and heterogeneity


def per_group_metrics(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    groups: ArrayLike | None,
    metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
    *,
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    stratified: bool = True,
    seed: int = 0,
    n_bins: int = 15,
    overall: bool = True,
) -> pd.DataFrame:
    """:func:`bootstrap_ci` for every group (site, cohort, scanner) and for all samples.

    Each group's random stream is seeded from ``seed`` and the group's name, so adding a site
    does not change the other sites' intervals.

    Args:
        y_true: ``(N,)`` class ids.
        y_prob: ``(N, C)`` probabilities, or ``(N,)`` positive-class probabilities.
        groups: ``(N,)`` group label of each sample; ``None`` for the overall rows only.
        metrics, class_names, threshold, n_resamples, alpha, stratified, n_bins: as in
            :func:`bootstrap_ci`.
        seed: root seed.
        overall: also add rows for all samples pooled, with ``group = "overall"``.

    Returns:
        Tidy frame ``group, n, metric, class, value, ci_low, ci_high, se`` (groups sorted).
    """
    yt, yp = check_predictions(y_true, y_prob)
    if groups is None:
        labels = np.full(yt.size, "overall", dtype=object)
        keys: list = []
        overall = True
    else:
        labels = _as_numpy(groups)
        if labels.shape != yt.shape:
            raise DataError(
                f"groups must give one label per sample, shape {yt.shape}; got {labels.shape}."
            )
        keys = sorted(pd.unique(labels), key=str)
        if overall and "overall" in {str(k) for k in keys}:
            raise DataError(
                "a group is named 'overall', which is reserved for the pooled rows; rename it or "
                "pass overall=False."
            )
    parts = [(k, labels == k) for k in keys]
    if overall:
        parts.append(("overall", np.ones(yt.size, dtype=bool)))
    tables = []
    for key, mask in parts:
        # The stream depends on the group's name only: adding a site leaves the others' CIs as is.
        child = np.random.SeedSequence([seed, zlib.crc32(str(key).encode())])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = bootstrap_ci(
                yt[mask],
                yp[mask],
                metrics,
                class_names=class_names,
                threshold=threshold,
                n_resamples=n_resamples,
                alpha=alpha,
                stratified=stratified,
                seed=child,
                n_bins=n_bins,
            )
        for w in caught:  # re-emit, naming the group
            warnings.warn(f"group {key!r}: {w.message}", w.category, stacklevel=2)
        t.insert(0, "n", int(mask.sum()))
        t.insert(0, "group", key)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def site_heterogeneity(
    table: pd.DataFrame, *, metric: str = "auroc", class_name: str = "macro"
) -> dict[str, float]:
    """Heterogeneity of one metric across groups (Cochran's Q, I², DerSimonian-Laird tau²).

    With per-group estimates ``theta_k`` and bootstrap standard errors ``se_k`` (the ``se``
    column of :func:`per_group_metrics`), weights ``w_k = 1 / se_k^2``:
    ``theta = sum w theta / sum w``, ``Q = sum w_k (theta_k - theta)^2`` (chi-squared with
    ``K - 1`` df under homogeneity), ``I^2 = max(0, (Q - (K-1)) / Q)`` (Higgins & Thompson 2002),
    ``tau^2 = max(0, (Q - (K-1)) / (sum w - sum w^2 / sum w))``. The unweighted ``range`` and
    ``sd`` of ``theta_k`` are given too. Groups with an undefined value or ``se = 0`` are left out.

    Args:
        table: output of :func:`per_group_metrics` (the ``"overall"`` rows are ignored).
        metric: metric to compare, e.g. ``"auroc"``.
        class_name: ``class`` row to compare, e.g. ``"macro"`` or a class name.

    Returns:
        ``{"n_groups", "pooled", "q", "df", "p_value", "i2", "tau2", "range", "sd"}``; NaN (with
        a warning) when fewer than two groups qualify.
    """
    need = {"group", "metric", "class", "value", "se"}
    if not need <= set(table.columns):
        raise DataError(
            f"site_heterogeneity needs a per_group_metrics table with columns {sorted(need)}; "
            f"got {list(table.columns)}."
        )
    sel = table[
        (table["metric"] == metric) & (table["class"] == class_name) & (table["group"] != "overall")
    ]
    if sel.empty:
        raise DataError(
            f"no rows for metric={metric!r}, class={class_name!r} in the table; available "
            f"metrics: {sorted(table['metric'].unique())}, classes: "
            f"{sorted(table['class'].unique())}."
        )
    ok = sel["value"].notna() & (sel["se"] > 0)
    theta = sel.loc[ok, "value"].to_numpy(np.float64)
    se = sel.loc[ok, "se"].to_numpy(np.float64)
    k = theta.size
    nan = float("nan")
    if k < 2:
        warnings.warn(
            f"site_heterogeneity: {k} group(s) with a defined {metric}[{class_name}] and a "
            "positive standard error; need at least 2. Returning NaN.",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return {"n_groups": float(k)} | dict.fromkeys(
            ("pooled", "q", "df", "p_value", "i2", "tau2", "range", "sd"), nan
        )
    w = 1.0 / se**2
    pooled = float(np.sum(w * theta) / np.sum(w))
    q = float(np.sum(w * (theta - pooled) ** 2))
    df = k - 1
    return {
        "n_groups": float(k),
        "pooled": pooled,
        "q": q,
        "df": float(df),
        "p_value": float(stats.chi2.sf(q, df)),
        "i2": max(0.0, (q - df) / q) if q > 0 else 0.0,
        "tau2": max(0.0, (q - df) / (w.sum() - np.sum(w**2) / w.sum())),
        "range": float(theta.max() - theta.min()),
        "sd": float(theta.std(ddof=1)),
    }


# ---------------------------------------------------------------------------------------------
# Accumulator


class ClinicalMetrics:
    """Accumulate predictions batch by batch, then compute the per-group table (MONAI style).

    Example:
        >>> acc = ClinicalMetrics(class_names=["normal", "pneumonia"], n_resamples=200)
        >>> for probs, labels, site in batches:  # doctest: +SKIP
        ...     acc.update(probs, labels, group=site)
        >>> table = acc.compute()  # doctest: +SKIP

    Args:
        metrics, class_names, threshold, n_resamples, alpha, stratified, seed, n_bins: as in
            :func:`per_group_metrics`.
    """

    def __init__(
        self,
        metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
        *,
        class_names: Sequence[str] | None = None,
        threshold: float | None = None,
        n_resamples: int = 1000,
        alpha: float = 0.05,
        stratified: bool = True,
        seed: int = 0,
        n_bins: int = 15,
    ) -> None:
        self.metrics = _check_metrics(metrics)
        self.options = {
            "class_names": class_names,
            "threshold": threshold,
            "n_resamples": n_resamples,
            "alpha": alpha,
            "stratified": stratified,
            "seed": seed,
            "n_bins": n_bins,
        }
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated prediction."""
        self._prob: list[np.ndarray] = []
        self._true: list[np.ndarray] = []
        self._group: list[np.ndarray] | None = None

    def update(self, y_prob: ArrayLike, y_true: ArrayLike, *, group: object = None) -> None:
        """Add a batch.

        Args:
            y_prob: ``(B, C)`` probabilities or ``(B,)`` positive-class probabilities (numpy or
                torch, any device).
            y_true: ``(B,)`` class ids.
            group: one label for the whole batch, a ``(B,)`` array of labels, or ``None``. Give
                it for every batch or for none.
        """
        yt, yp = check_predictions(y_true, y_prob)
        if self._true and yp.shape[1] != self._prob[0].shape[1]:
            raise DataError(
                f"ClinicalMetrics.update got {yp.shape[1]} classes; earlier batches had "
                f"{self._prob[0].shape[1]}."
            )
        if self._true and (group is None) != (self._group is None):
            raise DataError(
                "ClinicalMetrics.update: give `group` for every batch or for none; got a mix."
            )
        if group is not None:
            g = _as_numpy(group)
            g = np.full(yt.size, group, dtype=object) if g.ndim == 0 else g.astype(object)
            if g.shape != yt.shape:
                raise DataError(
                    f"group must be one label or one per sample, shape {yt.shape}; got {g.shape}."
                )
            self._group = [*(self._group or []), g]
        self._true.append(yt)
        self._prob.append(yp)

    def compute(self) -> pd.DataFrame:
        """Per-group (and overall) table of :func:`per_group_metrics` on everything seen."""
        if not self._true:
            raise DataError("ClinicalMetrics.compute called before any update; add a batch first.")
        groups = None if self._group is None else np.concatenate(self._group)
        return per_group_metrics(
            np.concatenate(self._true),
            np.concatenate(self._prob),
            groups,
            self.metrics,
            **self.options,
        )
